"""Prepacked CPU linears: the same products as `nn.Linear`, the size rule, and the custom op inside a compiled
decode step, for oneDNN fp32 weights and fbgemm int8 weights."""

import copy

import pytest
import torch

from modeling_llama2 import Llama2ForCausalLM
from modeling_llama2.decoding import generate
from modeling_llama2.packing import PackedLinear, pack_linears
from modeling_llama2.quantization import Int8Linear, quantize_int8

from .conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 48)])
def test_packed_linear_computes_the_linear(bias, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        torch.testing.assert_close(PackedLinear(linear)(x), linear(x), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama2ForCausalLM(tiny_config(vocab_size=256)).eval()


def test_only_weights_of_the_minimum_size_are_packed(model):
    # tiny_config: hidden 64, intermediate 128, vocab 256 -> q/o 4096, k/v 2048, MLP 8192, LM head 16384 elements
    packed = pack_linears(copy.deepcopy(model), min_elements=8192)
    kinds = {name: type(m).__name__ for name, m in packed.named_modules() if "proj" in name or name == "lm_head"}
    assert kinds["lm_head"] == "PackedLinear" and kinds["model.layers.0.mlp.down_proj"] == "PackedLinear"
    assert kinds["model.layers.0.self_attn.q_proj"] == "Linear" and kinds["model.layers.1.self_attn.k_proj"] == "Linear"
    assert not hasattr(packed.lm_head, "weight")  # the fp32 copy is gone, not duplicated


def test_saving_a_packed_model_is_refused_rather_than_missing_weights(model, tmp_path):
    packed = pack_linears(copy.deepcopy(model), min_elements=8192)
    with pytest.raises(RuntimeError, match="save the model before `pack_linears`"):
        packed.save_pretrained(tmp_path)


def test_packed_model_logits_and_compiled_greedy_tokens_match(model):
    packed = pack_linears(copy.deepcopy(model), min_elements=0)
    assert all(not isinstance(m, torch.nn.Linear) for m in packed.modules())
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()  # reset() keeps the counts of earlier tests
    out = generate(packed, ids, max_new_tokens=12)  # fullgraph: the custom op compiles without a graph break
    assert counters["stats"]["unique_graphs"] == 1
    assert torch.equal(out, generate(model, ids, max_new_tokens=12, compile=False))
    assert torch.equal(generate(copy.deepcopy(packed), ids, max_new_tokens=12, compile=False), out)


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm")
def test_int8_compiled_step_runs_fbgemm_and_matches_eager(model):
    quantized = quantize_int8(copy.deepcopy(model))
    ids = torch.randint(1, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    eager = generate(quantized, ids, max_new_tokens=12, compile=False)
    assert all(m._packed is not None for m in quantized.modules() if isinstance(m, Int8Linear))
    torch._dynamo.reset()
    assert torch.equal(generate(quantized, ids, max_new_tokens=12), eager)
