"""Weight-only int8: per-channel quantization error, the fbgemm and dequantize paths, safetensors round trip."""

import copy

import pytest
import torch
from safetensors import safe_open

from modeling_llama2 import Llama2ForCausalLM
from modeling_llama2.inference.quantization import (
    WEIGHTS_NAME,
    Int8Linear,
    load_quantized,
    quantize_int8,
    save_quantized,
)

from .conftest import tiny_config


@pytest.fixture(scope="module")
def fp32_and_int8():
    torch.manual_seed(0)
    model = Llama2ForCausalLM(tiny_config(vocab_size=256, tie_word_embeddings=True)).eval()
    return model, quantize_int8(copy.deepcopy(model))


def test_every_linear_is_quantized_with_scales_that_reconstruct_the_weight(fp32_and_int8):
    model, quantized = fp32_and_int8
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    int8 = {n: m for n, m in quantized.named_modules() if isinstance(m, Int8Linear)}
    assert set(int8) == set(linears) and "lm_head" in int8
    for name, module in int8.items():
        assert module.weight.dtype == torch.int8 and module.weight.abs().max() == 127
        error = (module.weight.float() * module.weight_scale[:, None] - linears[name].weight).abs()
        assert (error <= module.weight_scale[:, None] / 2 + 1e-7).all()  # round to nearest


def test_int8_logits_stay_close_to_fp32(fp32_and_int8):
    model, quantized = fp32_and_int8
    ids = torch.randint(1, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(ids).logits, quantized(ids).logits
    assert (out - ref).norm() / ref.norm() < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_fbgemm_and_dequantize_paths_agree():
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("no fbgemm")
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    module = Int8Linear.from_linear(linear)
    x = torch.randn(3, 5, 64)
    fast = module(x)
    assert module._packed is not None  # the fbgemm kernel ran
    slow = module(x.double()).float()  # not fp32: the dequantize-matmul fallback
    assert fast.shape == slow.shape == (3, 5, 48)
    # fbgemm also rounds the activations to 8 bits; both stay near the fp32 layer.
    torch.testing.assert_close(fast, slow, atol=0.03, rtol=0)
    torch.testing.assert_close(slow, linear(x), atol=0.01, rtol=0)


def test_loading_new_weights_repacks():
    torch.manual_seed(0)
    module = Int8Linear.from_linear(torch.nn.Linear(16, 8, bias=False))
    other = Int8Linear.from_linear(torch.nn.Linear(16, 8, bias=False))
    x = torch.randn(2, 16)
    module(x)
    module.load_state_dict(other.state_dict())
    torch.testing.assert_close(module(x), other(x))


def test_safetensors_round_trip_keeps_names_and_logits(fp32_and_int8, tmp_path):
    model, quantized = fp32_and_int8
    save_quantized(quantized, tmp_path)
    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8
    assert keys == set(quantized.state_dict())
    assert {k for k in keys if not k.endswith("weight_scale")} == set(model.state_dict())  # Llama's names
    loaded = load_quantized(tmp_path)
    assert isinstance(loaded.lm_head, Int8Linear) and isinstance(loaded.model.layers[1].mlp.down_proj, Int8Linear)
    ids = torch.randint(1, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, quantized(ids).logits)
