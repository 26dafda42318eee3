"""A torch without one of the private APIs the fast paths use: the package and the converter still import, and the
feature that needs it fails with one message naming the supported torch versions."""

import subprocess
import sys
import textwrap


def test_a_missing_private_api_fails_only_the_feature_that_needs_it():
    script = textwrap.dedent(
        """
        import importlib
        import sys
        import torch
        import modeling_llama2  # torch and transformers themselves import the module removed below
        sys.modules["torch._opaque_base"] = None  # as if this torch had no opaque objects
        importlib.reload(modeling_llama2.torch_internals)  # the package imported it: look for them again
        import llama2_convert.meta, llama2_convert.llama2c
        from modeling_llama2.inference.quantization import quantize_int8
        config = modeling_llama2.Llama2Config(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        weight_only = quantize_int8(modeling_llama2.Llama2ForCausalLM(config))  # needs no fbgemm
        print("weight-only logits", tuple(weight_only(torch.ones(1, 3, dtype=torch.long)).logits.shape))
        model = quantize_int8(modeling_llama2.Llama2ForCausalLM(config), activations="int8")
        try:
            model(torch.ones(1, 3, dtype=torch.long))
        except RuntimeError as error:
            print(error)
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "weight-only logits (1, 3, 32)" in run.stdout
    assert "fbgemm's int8 linear" in run.stdout and "torch >= 2.13, < 2.15" in run.stdout
