"""Int8 linears: per-channel quantization error, the logit error bound, each activations mode's numerics on every
path (eager and compiled, one row and several), and the safetensors round trip with its mode."""

import copy
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modeling_llama2 import Llama2ForCausalLM
from modeling_llama2.inference import cpu_kernels
from modeling_llama2.inference.quantization import (
    DEFAULT_ACTIVATIONS,
    WEIGHTS_NAME,
    Int8Linear,
    load_quantized,
    quantize_int8,
    round_activations,
    save_quantized,
)
from modeling_llama2.torch_internals import FBGEMM_REDUCE_RANGE

from .conftest import tiny_config

FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines


@pytest.fixture(scope="module")
def fp32_and_int8():
    torch.manual_seed(0)
    model = Llama2ForCausalLM(tiny_config(vocab_size=256, tie_word_embeddings=True)).eval()
    return model, {mode: quantize_int8(copy.deepcopy(model), activations=mode) for mode in ("float", "int8")}


def test_every_linear_is_quantized_with_scales_that_reconstruct_the_weight(fp32_and_int8):
    model, quantized = fp32_and_int8
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    int8 = {n: m for n, m in quantized["float"].named_modules() if isinstance(m, Int8Linear)}
    assert set(int8) == set(linears) and "lm_head" in int8
    for name, module in int8.items():
        assert module.weight.dtype == torch.int8 and module.weight.abs().max() == 127
        error = (module.weight.float() * module.weight_scale[:, None] - linears[name].weight).abs()
        assert (error <= module.weight_scale[:, None] / 2 + 1e-7).all()  # round to nearest


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_int8_logits_stay_close_to_fp32(fp32_and_int8, activations):
    model, quantized = fp32_and_int8
    ids = torch.randint(1, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(ids).logits, quantized[activations](ids).logits
    assert (out - ref).norm() / ref.norm() < 0.05
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def torch_rounding(x: torch.Tensor, reduce_range: bool = FBGEMM_REDUCE_RANGE) -> torch.Tensor:
    """torch's own dynamic per-tensor quantization of `x` (the parameters fbgemm's linear picks on this CPU)."""
    with warnings.catch_warnings():  # quantized tensors are deprecated
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor_dynamic(x, torch.quint8, reduce_range).dequantize()


@pytest.mark.parametrize("reduce_range", [False, True])  # 8 bits with VNNI, 7 without
@pytest.mark.parametrize("shape", [(1, 1, 48), (3, 5, 48), (2, 48)])
@pytest.mark.parametrize("scale", [3.0, 1e-5])  # 1e-5: a range below fbgemm's smallest scale
def test_round_activations_matches_torch_dynamic_quantization(shape, scale, reduce_range):
    torch.manual_seed(0)
    for x in (torch.randn(*shape) * scale + scale / 2, torch.randn(*shape).abs() * scale, torch.zeros(*shape)):
        assert torch.equal(round_activations(x, reduce_range=reduce_range), torch_rounding(x, reduce_range))


def references(quantized: Llama2ForCausalLM) -> dict[str, Llama2ForCausalLM]:
    """The fp32 model holding `quantized`'s dequantized weights ("float"), and the same with every linear's input
    rounded by torch's dynamic quantization ("int8")."""
    ref = copy.deepcopy(quantized)
    for name, module in list(ref.named_modules()):
        if isinstance(module, Int8Linear):
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data = module.weight.float() * module.weight_scale[:, None]
            if module.bias is not None:
                linear.bias.data = module.bias.data.clone()
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, linear)
    rounded = copy.deepcopy(ref)
    for module in rounded.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda module, args: (torch_rounding(args[0]),))
    return {"float": ref, "int8": rounded}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="module")
def one_layer():
    """Untied (a dequantized reference must not change the embedding), one layer: inductor compiles it quickly."""
    torch.manual_seed(0)
    return Llama2ForCausalLM(tiny_config(vocab_size=256, num_hidden_layers=1)).eval()


# Within: float rounding; int8's also a rare activation landing the other side of a rounding tie. Apart: the modes.
TOLERANCE = {"float": 1e-5, "int8": 1e-4}
APART = 1e-3


def assert_mode(logits: torch.Tensor, refs: dict[str, torch.Tensor], activations: str, path: str) -> None:
    other = "int8" if activations == "float" else "float"
    within, apart = relative_error(logits, refs[activations]), relative_error(logits, refs[other])
    assert within < TOLERANCE[activations], f"{path}: {within:.2e} from its {activations!r} reference"
    assert apart > APART, f"{path}: {apart:.2e} from the {other!r} reference, so not measurably {activations!r}"


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_every_path_computes_its_modes_numerics(one_layer, activations):
    """Eager and compiled (dynamo, eager backend), one row (an LM head's or a decode step's), a decode batch's few
    rows and many (prefill): each within float rounding of its mode's reference, and measurably apart from the other
    mode's."""
    quantized = quantize_int8(copy.deepcopy(one_layer), activations=activations)
    refs = references(quantized)
    gen = torch.Generator().manual_seed(0)
    several, single = torch.randint(1, 256, (2, 12), generator=gen), torch.randint(1, 256, (1, 1), generator=gen)
    batch = torch.randint(1, 256, (4, 1), generator=gen)  # a decode step's rows: the several-row kernel
    torch._dynamo.reset()
    compiled = torch.compile(quantized, backend="eager", fullgraph=True)
    with torch.no_grad():
        for ids, rows in ((several, "several rows"), (single, "one row"), (batch, "a decode batch")):
            expected = {mode: ref(ids).logits for mode, ref in refs.items()}
            assert_mode(quantized(ids).logits, expected, activations, f"eager, {rows}")
            assert_mode(compiled(ids).logits, expected, activations, f"compiled, {rows}")
    packed = [m._packed is not None for m in quantized.modules() if isinstance(m, Int8Linear)]
    assert all(packed) if activations == "int8" and FBGEMM else not any(packed)  # fbgemm ran, or did not


@pytest.mark.parametrize("rows_kernel", [True, False])
@pytest.mark.parametrize("activations", ["float", "int8"])
def test_inductors_one_row_step_computes_its_modes_numerics(monkeypatch, one_layer, activations, rows_kernel):
    """The compiled batch-1 step: the rows kernel, or inductor's one-row loop where that kernel cannot be built;
    "int8" rounds in tensor ops first, as where fbgemm's weight is not packed yet."""
    if not rows_kernel:
        monkeypatch.setattr(cpu_kernels, "_rows_kernel", False)
    elif not cpu_kernels.rows_kernel():
        pytest.skip("the rows kernel cannot be built here")
    quantized = quantize_int8(copy.deepcopy(one_layer), activations=activations)
    refs = references(quantized)
    ids = torch.randint(1, 256, (1, 1), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        logits = torch.compile(quantized, fullgraph=True)(ids).logits
        assert_mode(logits, {mode: ref(ids).logits for mode, ref in refs.items()}, activations, "inductor, one row")
    assert all(m._packed is None for m in quantized.modules() if isinstance(m, Int8Linear))


@pytest.mark.skipif(not FBGEMM, reason="no fbgemm")
def test_loading_new_weights_repacks():
    torch.manual_seed(0)
    module = Int8Linear.from_linear(torch.nn.Linear(16, 8, bias=False), activations="int8")
    other = Int8Linear.from_linear(torch.nn.Linear(16, 8, bias=False), activations="int8")
    x = torch.randn(cpu_kernels.MAX_KERNEL_ROWS + 1, 16)  # more rows than the int8 rows kernel takes: fbgemm
    module(x)
    assert module._packed is not None
    module.load_state_dict(other.state_dict())
    torch.testing.assert_close(module(x), other(x))


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_safetensors_round_trip_keeps_names_mode_and_logits(fp32_and_int8, tmp_path, activations):
    model, quantized = fp32_and_int8
    save_quantized(quantized[activations], tmp_path)
    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8
        assert f.metadata()["activations"] == activations
    assert keys == set(quantized[activations].state_dict())
    assert {k for k in keys if not k.endswith("weight_scale")} == set(model.state_dict())  # Llama's names
    loaded = load_quantized(tmp_path)
    assert isinstance(loaded.lm_head, Int8Linear) and isinstance(loaded.model.layers[1].mlp.down_proj, Int8Linear)
    assert {m.activations for m in loaded.modules() if isinstance(m, Int8Linear)} == {activations}
    ids = torch.randint(1, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, quantized[activations](ids).logits)
    other = "int8" if activations == "float" else "float"
    assert load_quantized(tmp_path, activations=other).lm_head.activations == other


def test_a_file_without_a_mode_loads_with_the_default(fp32_and_int8, tmp_path):
    save_quantized(fp32_and_int8[1]["int8"], tmp_path)
    path = tmp_path / WEIGHTS_NAME
    save_file(load_file(path), path, metadata={"format": "pt", "quantization": "int8"})  # as saved before modes
    assert load_quantized(tmp_path).lm_head.activations == DEFAULT_ACTIVATIONS


def test_bad_modes_are_refused_in_one_line(fp32_and_int8, tmp_path):
    model, quantized = fp32_and_int8
    with pytest.raises(ValueError, match=r"^activations='fp8' is not an int8 mode: pass 'float' .* or 'int8'") as e:
        quantize_int8(copy.deepcopy(model), activations="fp8")
    assert "\n" not in str(e.value)
    save_quantized(quantized["float"], tmp_path)
    with pytest.raises(ValueError, match="activations='int4'"):
        load_quantized(tmp_path, activations="int4")
    path = tmp_path / WEIGHTS_NAME
    save_file(load_file(path), path, metadata={"format": "pt", "quantization": "int8", "activations": "bf16"})
    with pytest.raises(ValueError, match=r"records activations='bf16', which is not an int8 mode: pass"):
        load_quantized(tmp_path)
    mixed = copy.deepcopy(quantized["float"])
    mixed.lm_head.activations = "int8"
    with pytest.raises(ValueError, match=r"one int8 activations mode .* \['float', 'int8'\]"):
        save_quantized(mixed, tmp_path)
