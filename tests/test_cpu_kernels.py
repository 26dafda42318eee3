"""CPU kernels for inference: each `CPULinear` path (MKL, oneDNN, the compiled reduction, the several-row kernel)
computes the linear, the model keeps its parameters (saves, loads, copies), and the compiled decode step with fp32
or int8 weights runs without a graph break and agrees with the eager model."""

import copy
import warnings

import pytest
import torch

from modeling_llama2 import Llama2ForCausalLM, torch_internals
from modeling_llama2.inference import cpu_kernels, decoding, quantization
from modeling_llama2.inference.cpu_kernels import (
    CPULinear,
    onednn_linear,
    reduction_linear,
    rows_linear,
    use_cpu_kernels,
)
from modeling_llama2.inference.decoding import generate
from modeling_llama2.inference.quantization import Int8Linear, quantize_int8, round_activations
from modeling_llama2.modeling_llama2 import Llama2Attention, joint_products, one_query_sdpa_attention

from .conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("shape", [(5, 48), (2, 3, 48), (1, 1, 48)])
def test_each_kernel_computes_the_linear(shape):
    torch.manual_seed(0)
    weight, x = torch.randn(80, 48), torch.randn(*shape)
    expected = x @ weight.T
    torch.testing.assert_close(onednn_linear(x, weight), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.compile(reduction_linear)(x, weight), expected, atol=1e-5, rtol=1e-5)
    int8 = torch.randint(-127, 128, (80, 48), dtype=torch.int8)
    torch.testing.assert_close(torch.compile(reduction_linear)(x, int8), x @ int8.float().T, atol=1e-3, rtol=1e-5)


needs_rows_kernel = pytest.mark.skipif(not cpu_kernels.rows_kernel(), reason="no C++ compiler for the rows kernel")


@needs_rows_kernel
# one-row loop; tiles of 4, 2 and 1 rows; from 8 rows, weight rows streamed past 8 and 4 rows of x while x fits in
# 24 KB (300 inputs), tiles again past it (520 inputs, 12 and 16 rows)
@pytest.mark.parametrize("rows", [1, 2, 3, 6, 12, 16])
# tails of `in` (not a multiple of 8) and of `out` (not a multiple of the 3- and 8-row weight tiles); 64: no tail
@pytest.mark.parametrize("out_features, in_features", [(7, 13), (33, 300), (35, 64), (19, 520)])
def test_rows_kernel_computes_the_fp32_and_weight_only_int8_linear(rows, out_features, in_features):
    torch.manual_seed(rows)
    x, weight = torch.randn(rows, in_features), torch.randn(out_features, in_features)
    # sums of up to 520 products, in another order than MKL's
    torch.testing.assert_close(rows_linear(x, [weight]), x @ weight.T, atol=5e-5, rtol=1e-5)
    int8, scale = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8), torch.rand(out_features)
    expected = x @ (int8.float() * scale[:, None]).T  # x is not rounded: weight-only
    torch.testing.assert_close(rows_linear(x, [int8], [scale]), expected, atol=1e-3, rtol=1e-4)  # sums of 127s
    compiled = torch.compile(lambda x, w: rows_linear(x.relu(), [w]) + 1, fullgraph=True)  # an op inside a graph
    torch.testing.assert_close(compiled(x, weight), x.relu() @ weight.T + 1, atol=1e-5, rtol=1e-5)


@needs_rows_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 12, 16])
@pytest.mark.parametrize("in_features", [77, 288, 520])  # tiles, streamed rows (from 8 rows), tiles again
def test_rows_kernels_with_several_weights_give_each_weights_product_exactly(rows, in_features):
    """One call for a layer's q, k and v: each weight's outputs are its own call's bit for bit (parts of 50, 7 and
    13 rows: tails of the 3-row tiles inside the call)."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen)
    sizes = (50, 7, 13)
    fp32 = [torch.randn(n, in_features, generator=gen) for n in sizes]
    int8 = [torch.randint(-127, 128, (n, in_features), dtype=torch.int8, generator=gen) for n in sizes]
    scales = [torch.rand(n, generator=gen) for n in sizes]
    joint = rows_linear(x, fp32)
    assert joint.shape == (rows, sum(sizes))
    assert torch.equal(joint, torch.cat([rows_linear(x, [w]) for w in fp32], dim=-1))
    single = [rows_linear(x, [w], [s]) for w, s in zip(int8, scales, strict=True)]
    assert torch.equal(rows_linear(x, int8, scales), torch.cat(single, dim=-1))
    single = [cpu_kernels.int8_rows_linear(x, [w], [s]) for w, s in zip(int8, scales, strict=True)]
    assert torch.equal(cpu_kernels.int8_rows_linear(x, int8, scales), torch.cat(single, dim=-1))


@needs_rows_kernel
def test_rows_kernels_refuse_weights_that_do_not_go_together():
    x, fp32, int8 = torch.randn(2, 16), torch.randn(4, 16), torch.ones(4, 16, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="all float32 or all int8"):
        rows_linear(x, [fp32, int8], [])
    with pytest.raises(RuntimeError, match="with x's 16 inputs expected, got \\[4, 8\\]"):
        rows_linear(x, [fp32, torch.randn(4, 8)])
    with pytest.raises(RuntimeError, match="one float32 scale per output row"):
        rows_linear(x, [int8, int8], [torch.ones(4), torch.ones(3)])
    with pytest.raises(RuntimeError, match="one scale tensor for each"):
        cpu_kernels.int8_rows_linear(x, [int8, int8], [torch.ones(4)])


@needs_rows_kernel
def test_cpu_linear_takes_the_rows_kernel_up_to_its_row_limit():
    torch.manual_seed(0)
    fast = use_cpu_kernels(torch.nn.Linear(48, 80, bias=False))
    with torch.no_grad():
        for rows in (1, cpu_kernels.MAX_KERNEL_ROWS):
            x = torch.randn(rows, 48)
            assert torch.equal(fast(x), rows_linear(x, [fast.weight]))
        x = torch.randn(cpu_kernels.MAX_KERNEL_ROWS + 1, 48)  # beyond the limit: the library kernels
        assert torch.equal(fast(x), torch.nn.functional.linear(x, fast.weight))


def test_a_rows_kernel_that_cannot_be_built_warns_and_leaves_the_library_kernels(monkeypatch):
    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension: c++: not found")

    monkeypatch.setattr(cpu_kernels, "_rows_kernel", None)
    monkeypatch.setattr(cpu_kernels.cpp_extension, "load", no_compiler)
    with pytest.warns(UserWarning, match="could not be built .*c\\+\\+: not found.*falls back to MKL and oneDNN"):
        fast = use_cpu_kernels(torch.nn.Linear(48, 80))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        x = torch.randn(4, 48)
        with torch.no_grad():
            assert torch.equal(fast(x), torch.nn.functional.linear(x, fast.weight, fast.bias))


def test_the_rows_kernel_build_is_named_for_this_cpu(monkeypatch, tmp_path):
    names = []
    monkeypatch.setattr(cpu_kernels, "_rows_kernel", None)
    monkeypatch.setattr(cpu_kernels.cpp_extension, "load", lambda **kwargs: names.append(kwargs["name"]))
    monkeypatch.setattr(cpu_kernels.torch.library, "register_fake", lambda name: lambda fn: fn)
    assert cpu_kernels.rows_kernel()
    assert names == [f"modeling_llama2_rows_linear_{cpu_kernels.cpu_tag()}"]
    # another CPU (other instruction-set flags) gets another name, so a shared build cache never mixes them
    other = tmp_path / "cpuinfo"
    other.write_text("processor : 0\nflags : fpu sse2 avx2\n")
    monkeypatch.setattr(cpu_kernels, "CPUINFO", str(other))
    assert cpu_kernels.cpu_tag() != names[0].rsplit("_", 1)[1]


@pytest.mark.parametrize("min_onednn", [0, 2**40])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_linear_matches_nn_linear_eagerly_and_compiled(monkeypatch, min_onednn, bias):
    monkeypatch.setattr(cpu_kernels, "MIN_ONEDNN_ELEMENTS", min_onednn)  # oneDNN, or MKL
    monkeypatch.setattr(cpu_kernels, "MIN_ONEDNN_PRODUCTS", min_onednn)
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80, bias=bias)
    fast = use_cpu_kernels(copy.deepcopy(linear))
    assert type(fast) is CPULinear and not fast.weight.requires_grad
    torch._dynamo.reset()
    with torch.no_grad():
        for x in (torch.randn(4, 3, 48), torch.randn(1, 1, 48)):  # compiled: oneDNN or MKL, then the reduction
            torch.testing.assert_close(fast(x), linear(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.compile(fast, fullgraph=True)(x), linear(x), atol=1e-5, rtol=1e-5)


def test_a_prefills_rows_take_onednn_also_for_a_small_weight(monkeypatch):
    """Many rows pay back oneDNN's cost per call on any weight (fp32 and int8 weight-only); a few rows over a small
    weight stay on MKL. Both equal nn.Linear to float rounding."""
    rows = []
    kernel = cpu_kernels.onednn_linear
    record = lambda x, w: rows.append(x.shape[0]) or kernel(x, w)  # noqa: E731
    monkeypatch.setattr(cpu_kernels, "onednn_linear", record)
    monkeypatch.setattr(quantization, "onednn_linear", record)
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80)
    many = cpu_kernels.MIN_ONEDNN_PRODUCTS // linear.weight.numel() + 1
    int8 = Int8Linear.from_linear(linear, activations="float")
    dequantized = torch.nn.Linear(48, 80)
    dequantized.load_state_dict({"weight": int8.weight * int8.weight_scale[:, None], "bias": linear.bias})
    with torch.no_grad():
        for fast, reference in ((use_cpu_kernels(copy.deepcopy(linear)), linear), (int8, dequantized)):
            for n in (many, cpu_kernels.MAX_KERNEL_ROWS + 1):
                x = torch.randn(n, 48)
                torch.testing.assert_close(fast(x), reference(x), atol=1e-5, rtol=1e-5)
    assert rows == [many, many]


def test_gradients_reach_the_input_of_a_frozen_cpu_linear(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "MIN_ONEDNN_ELEMENTS", 0)  # oneDNN's op has no backward: MKL must take over
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 80)
    fast = use_cpu_kernels(copy.deepcopy(linear))
    x = torch.randn(3, 48, requires_grad=True)
    fast(x).square().sum().backward()
    expected = torch.autograd.grad(linear(x).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
    assert fast.weight.grad is None


@pytest.fixture(scope="module")
def model():
    """One layer: every kernel path runs in it, and inductor compiles a layer's graph in seconds (the decode loop's
    use of several layers' caches is tested in test_decoding.py)."""
    torch.manual_seed(0)
    return Llama2ForCausalLM(tiny_config(vocab_size=256, num_hidden_layers=1)).eval()


def test_only_fp32_cpu_linears_change_and_the_model_still_saves(model, tmp_path):
    fast = use_cpu_kernels(copy.deepcopy(model))
    assert all(type(m) is not torch.nn.Linear for m in fast.modules())
    assert fast.state_dict().keys() == model.state_dict().keys()
    fast.save_pretrained(tmp_path)
    reloaded = Llama2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)
    half = use_cpu_kernels(copy.deepcopy(model).to(torch.bfloat16))
    assert all(type(m) is not CPULinear for m in half.modules())  # only fp32 is measured faster


@pytest.mark.parametrize("ahead_of_time", [True, False])
def test_compiled_greedy_tokens_match_the_eager_model(model, every_guard, aot_compiles, request, ahead_of_time):
    if not ahead_of_time:  # the `torch.compile` step
        request.getfixturevalue("torch_compile_step")
    fast = use_cpu_kernels(copy.deepcopy(model))
    for batch in (1, 2):  # the reduction at one row; the rows kernel at two (the prompt: oneDNN and MKL)
        ids = torch.randint(1, 256, (batch, 12), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            torch.testing.assert_close(fast(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
        torch._dynamo.reset()
        counters = torch._dynamo.utils.counters
        counters.clear()  # reset() keeps the counts of earlier tests
        out = generate(fast, ids, max_new_tokens=12)  # fullgraph: each path compiles without a graph break
        assert (len(aot_compiles), counters["stats"]["unique_graphs"]) == ((batch, 0) if ahead_of_time else (0, 1))
        assert torch.equal(out, generate(model, ids, max_new_tokens=12, compile=False))
        assert torch.equal(generate(copy.deepcopy(fast), ids, max_new_tokens=12, compile=False), out)


def test_weight_only_int8_compiled_step_at_one_row_is_the_dequantized_model(model):
    quantized = quantize_int8(copy.deepcopy(model), activations="float")
    dequantized = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, Int8Linear):
                dequantized.get_submodule(name).weight.copy_(module.weight.float() * module.weight_scale[:, None])
    ids = torch.randint(1, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    # The compiled batch-1 step (the rows kernel, activations not rounded): the fp32 model holding the dequantized
    # weights.
    assert torch.equal(generate(quantized, ids, max_new_tokens=12), generate(dequantized, ids, max_new_tokens=12))


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm")
def spy_rows_kernel(monkeypatch, activations: str | None) -> list[int]:
    """The number of weights of each call to the rows kernel that linears of `activations` take (None: fp32 CPU
    kernels), recorded as they run."""
    owner = cpu_kernels if activations is None else quantization
    name = "int8_rows_linear" if activations == "int8" else "rows_linear"
    kernel, weights = getattr(owner, name), []
    monkeypatch.setattr(owner, name, lambda x, w, *a, **kw: weights.append(len(w)) or kernel(x, w, *a, **kw))
    return weights


@needs_rows_kernel
@pytest.mark.parametrize("activations", [None, "float", "int8"])  # fp32 CPU kernels, int8 weight-only, int8 acts
def test_decode_steps_take_q_k_v_and_gate_up_in_one_kernel_call_each(model, monkeypatch, activations):
    fast = use_cpu_kernels(copy.deepcopy(model))
    if activations is not None:
        fast = quantize_int8(fast, activations=activations)
    weights = spy_rows_kernel(monkeypatch, activations)
    ids = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        step = fast(ids[:, :1]).logits  # two rows: the rows kernels
        tokens = generate(fast, ids, max_new_tokens=4, compile=False)
    assert weights[:5] == [3, 1, 2, 1, 1]  # q, k, v; o; gate, up; down; the LM head
    # One by one (as a model whose linears have no `joint_forward`): the same outputs, bit for bit.
    monkeypatch.delattr(type(fast.lm_head), "joint_forward")
    with torch.no_grad():
        assert torch.equal(fast(ids[:, :1]).logits, step)
        assert torch.equal(generate(fast, ids, max_new_tokens=4, compile=False), tokens)


def test_joint_products_of_linears_of_different_kinds_run_one_by_one():
    """A LoRA-wrapped q_proj beside plain CPU linears, say: each layer's own forward."""
    torch.manual_seed(0)
    fast, plain = use_cpu_kernels(torch.nn.Linear(16, 8, bias=False)), torch.nn.Linear(16, 4)
    x = torch.randn(2, 16)
    with torch.no_grad():
        outputs = joint_products(x, fast, plain)
        assert torch.equal(outputs[0], fast(x)) and torch.equal(outputs[1], plain(x))
        both = joint_products(x, fast, use_cpu_kernels(plain))  # a bias is added to its own part
        torch.testing.assert_close(both[1], plain(x), atol=1e-6, rtol=1e-6)


@needs_rows_kernel
@pytest.mark.parametrize("hook", ["forward", "forward_pre", "global"])
@pytest.mark.parametrize("activations", [None, "int8"])
def test_linears_with_hooks_run_through_their_own_calls(monkeypatch, hook, activations):
    """accelerate's offloading hooks (or a user's) run only in a layer's own call: no joint call skips them."""
    torch.manual_seed(0)
    linears = [use_cpu_kernels(torch.nn.Linear(16, n, bias=False)) for n in (8, 4)]
    if activations is not None:
        linears = [Int8Linear.from_linear(linear, activations=activations) for linear in linears]
    seen = []
    register = {
        "forward": lambda: linears[1].register_forward_hook(lambda m, args, out: seen.append(m)),
        "forward_pre": lambda: linears[1].register_forward_pre_hook(lambda m, args: seen.append(m)),
        "global": lambda: torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: seen.append(m)),
    }[hook]
    weights = spy_rows_kernel(monkeypatch, activations)
    x = torch.randn(2, 16)
    with torch.no_grad():
        joint = joint_products(x, *linears)
        assert weights == [2] and not seen
        handle = register()
        try:
            assert all(torch.equal(a, b) for a, b in zip(joint_products(x, *linears), joint, strict=True))
        finally:
            handle.remove()
    assert weights == [2, 1, 1] and linears[1] in seen


def test_int8_activations_prefill_calls_fbgemm_and_the_compiled_steps_match_eager(model, monkeypatch):
    quantized = quantize_int8(copy.deepcopy(model), activations="int8")
    ids = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(1))
    rows = []
    kernel = quantization.int8_rows_linear
    monkeypatch.setattr(
        quantization, "int8_rows_linear", lambda x, w, *a: rows.append((x.shape[0], len(w))) or kernel(x, w, *a)
    )
    eager = generate(quantized, ids, max_new_tokens=12, compile=False)
    monkeypatch.undo()
    # The prompt's LM head (its last position), then 11 steps of the layer's q, k and v in one call, o, gate and up
    # in one call, down, and the head, 2 rows each.
    assert rows == [(2, 1)] + [(2, 3), (2, 1), (2, 2), (2, 1), (2, 1)] * 11
    # The prompt's 20 rows took fbgemm; the LM head's 2 rows and every step's the int8 rows kernel.
    assert quantized.model.layers[0].mlp.down_proj._packed is not None and quantized.lm_head._packed is None
    torch._dynamo.reset()
    assert torch.equal(generate(quantized, ids, max_new_tokens=12), eager)
    # fbgemm's packs are opaque objects, which inductor's C++ wrapper cannot pass: the Python wrapper's step where a
    # step would take fbgemm (more rows than the int8 kernel's); the C++ wrapper's for these 2 rows and the others.
    many = cpu_kernels.MAX_KERNEL_ROWS + 1
    assert decoding.compiled_step(quantized, ids.device, many) is decoding.compiled_decode_step
    assert decoding.compiled_step(quantized, ids.device, 2) is decoding.cpu_compiled_decode_step
    assert decoding.compiled_step(model, ids.device, many) is decoding.cpu_compiled_decode_step
    torch._dynamo.reset()
    wide = torch.randint(1, 256, (many, 3), generator=torch.Generator().manual_seed(2))
    assert torch.equal(
        generate(quantized, wide, max_new_tokens=4), generate(quantized, wide, max_new_tokens=4, compile=False)
    )


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="no fbgemm")
@pytest.mark.parametrize("rows", [1, 3, 8, 13, 16])  # the 8-, 4-, 2- and 1-row loops
# A tail of 13 after the 32-wide blocks; 8237 inputs: sums of w carried over from int16 four times (with none, the
# widest rows would overflow int16), then a lone block and a tail.
@pytest.mark.parametrize("shape", [(50, 77), (288, 288), (96, 768), (24, 8237)])
def test_int8_rows_kernel_is_fbgemms_dynamic_int8_linear_exactly(rows, shape):
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randint(-127, 128, shape, dtype=torch.int8, generator=gen)
    weight[0], weight[1] = 127, -127  # the widest sums of w
    weight[2, ::3] = -128  # outside absmax rounding's range, but an int8 file may hold it
    scale, bias = torch.rand(shape[0], generator=gen) / 100, torch.randn(shape[0], generator=gen)
    packed, packed_bias = (torch_internals.fbgemm_pack_int8(weight, scale, b) for b in (None, bias))
    for x in (torch.randn(rows, shape[1], generator=gen) * 3 + 1, torch.rand(rows, shape[1], generator=gen)):
        y = cpu_kernels.int8_rows_linear(x, [weight], [scale])
        assert torch.equal(y, torch_internals.fbgemm_int8_linear_2d(x, packed))
        # fbgemm adds its bias in one fused step, `Int8Linear` after the product: a rounding apart
        torch.testing.assert_close(
            y + bias, torch_internals.fbgemm_int8_linear_2d(x, packed_bias), rtol=1e-6, atol=1e-6
        )


def test_int8_rows_kernel_turns_a_nan_into_nan_outputs_as_round_activations():
    x = torch.randn(2, 40)
    x[1, 7] = float("nan")
    weight, scale = torch.ones(3, 40, dtype=torch.int8), torch.ones(3)
    assert round_activations(x).isnan().all() and cpu_kernels.int8_rows_linear(x, [weight], [scale]).isnan().all()


def test_int8_rows_kernel_refuses_rows_too_wide_for_its_int32_sums():
    with pytest.raises(RuntimeError, match="at most 65536 inputs, got 65537"):
        cpu_kernels.int8_rows_linear(torch.ones(1, 65537), [torch.ones(1, 65537, dtype=torch.int8)], [torch.ones(1)])


@pytest.mark.parametrize("reduce_range", [False, True])  # 8 bits (sums in int32) and 7 (maddubs's int16 pairs)
def test_int8_rows_kernel_rounds_as_round_activations(reduce_range):
    """An identity weight of scale 1 returns the rounded activations themselves: bit for bit
    `round_activations`, also where fbgemm's rounding would not be the one on this CPU."""
    gen = torch.Generator().manual_seed(0)
    identity = torch.eye(77, dtype=torch.int8)
    for rows in (1, 3, 16):
        for x in (torch.randn(rows, 77, generator=gen) * 3 + 1, torch.randn(rows, 77, generator=gen) * 1e-6):
            y = cpu_kernels.int8_rows_linear(x, [identity], [torch.ones(77)], reduce_range=reduce_range)
            assert torch.equal(y, round_activations(x, reduce_range=reduce_range))


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 6, 48), (12, 4, 64), (4, 1, 20)])  # MHA, GQA, MQA; a tail
@pytest.mark.parametrize("masked", [False, True])
def test_one_token_attention_equals_sdpa(heads, kv_heads, head_dim, masked):
    gen = torch.Generator().manual_seed(heads)
    batch, slots = 3, 37
    q = torch.randn(batch, heads, 1, head_dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, slots + 5, head_dim, generator=gen) for _ in range(2))  # a longer cache
    mask = None
    if masked:  # (batch, 1, 1, slots), as transformers' sdpa mask of a decode step; slot 0 always attended
        mask = (torch.rand(batch, 1, 1, slots, generator=gen) > 0.4) | (torch.arange(slots) == 0)
    k, v = k[:, :, :slots], v[:, :, :slots]  # not contiguous: the kernel copies them
    module = torch.nn.Module()
    out, weights = cpu_kernels.one_token_attention(module, q, k, v, mask, head_dim**-0.5)
    expected, _ = one_query_sdpa_attention(module, q, k, v, mask, head_dim**-0.5)
    assert weights is None and out.shape == (batch, 1, heads, head_dim)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # The kernel itself (`one_token_attention` would fall back to SDPA without it).
    assert cpu_kernels.rows_kernel()
    slots_mask = None if mask is None else mask[:, 0, 0]
    kernel = torch.ops.modeling_llama2_kernels.one_query_attention(q, k, v, slots_mask, head_dim**-0.5)
    torch.testing.assert_close(kernel[:, None], expected, atol=1e-5, rtol=1e-5)


def test_one_token_attention_keeps_sdpa_for_a_float_mask_and_for_gradients(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_kernels, "one_query_sdpa_attention", lambda *a, **kw: calls.append(a[4]) or (None, None))
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 4, 5, 8)
    cpu_kernels.one_token_attention(torch.nn.Module(), q, k, k, torch.zeros(2, 1, 1, 5), 1.0)  # additive
    cpu_kernels.one_token_attention(torch.nn.Module(), q.requires_grad_(), k, k, None, 1.0)
    assert len(calls) == 2


@pytest.mark.parametrize("prepare", [use_cpu_kernels, lambda m: quantize_int8(m, activations="float")])
def test_decode_steps_take_the_one_token_kernel_and_match_sdpa(model, prepare):
    fast = prepare(copy.deepcopy(model))
    seen = []
    for module in fast.modules():
        if isinstance(module, Llama2Attention):
            assert module.one_token_attention is cpu_kernels.one_token_attention
            module.one_token_attention = lambda *a, **kw: (
                seen.append(a[1].shape) or cpu_kernels.one_token_attention(*a, **kw)
            )
    reference = copy.deepcopy(fast)
    for module in reference.modules():
        if isinstance(module, Llama2Attention):
            module.one_token_attention = None  # SDPA, the rest equal
    ids = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    out = generate(fast, ids, max_new_tokens=6, compile=False)
    assert torch.equal(out, generate(reference, ids, max_new_tokens=6, compile=False))
    assert len(seen) == 5 * model.config.num_hidden_layers and all(s[2] == 1 for s in seen)
