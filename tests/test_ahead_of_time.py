"""The decode step compiled ahead of time (AOTInductor) on the CPU: the tokens of `generate`, one compile per
signature, given the model's and the cache's own tensors (and keeping none), its disk cache, and the fallbacks to
the `torch.compile` step."""

import concurrent.futures
import copy
import gc
import os
import weakref
from pathlib import Path

import pytest
import torch

from modeling_llama2 import Llama2ForCausalLM, torch_internals
from modeling_llama2.inference import ahead_of_time, decoding
from modeling_llama2.inference.decoding import decode, generate, prefill
from modeling_llama2.inference.quantization import quantize_int8

from .alignment_helpers import greedy_reference, prompts, tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama2ForCausalLM(tiny_config()).eval()


@pytest.fixture
def cheap_torch_compile(monkeypatch):
    """The `torch.compile` step without inductor (`cheap_compile`), the step compiled ahead of time left on."""
    step = torch.compile(decoding.decode_step, backend="eager", fullgraph=True, dynamic=False)
    monkeypatch.setattr(decoding, "compiled_decode_step", step)
    monkeypatch.setattr(decoding, "cpu_compiled_decode_step", step)


@pytest.fixture
def aot_calls(monkeypatch) -> list:
    """The flat inputs of every call of a step compiled ahead of time."""
    calls = []
    run = torch_internals.aoti_run
    monkeypatch.setattr(
        torch_internals, "aoti_run", lambda runner, inputs: calls.append(len(inputs)) or run(runner, inputs)
    )
    return calls


def test_greedy_matches_generate_with_one_compile_for_every_prompt_and_cache(model, aot_compiles, aot_calls):
    for seed in range(3):  # new prompts and caches of the same shape reuse the compiled step
        ids = prompts(2, 7, seed)
        out = generate(model, ids, max_new_tokens=20, max_cache_len=64)
        assert torch.equal(out, greedy_reference(model, ids, 20))
    assert len(aot_compiles) == 1
    # The weights, tokens, the filled length and each layer's keys and values, each step but the first token's.
    weights = len(ahead_of_time.model_tensors(model))
    assert aot_calls == [weights + 2 + 2 * model.config.num_hidden_layers] * 19 * 3


def test_left_padded_prompts_match_generate(model, aot_calls):
    ids = prompts(3, 9, seed=4)
    mask = torch.ones_like(ids)
    for row, pads in enumerate([0, 4, 2]):
        ids[row, :pads], mask[row, :pads] = 0, 0
    out = generate(model, ids, max_new_tokens=16, attention_mask=mask)
    assert torch.equal(out, greedy_reference(model, ids, 16, attention_mask=mask))
    weights = len(ahead_of_time.model_tensors(model))
    assert aot_calls == [weights + 4 + 2 * model.config.num_hidden_layers] * 15  # the positions and slots' mask too


def test_decode_leaves_the_cache_filled_as_the_eager_step_does(model):
    ids = prompts(1, 6, seed=2)
    caches = []
    for compile in (True, False):
        logits, cache = prefill(model, ids, 20)
        out = decode(model, logits, cache, max_new_tokens=9, compile=compile)
        caches.append(cache)
    for aot, eager in zip(caches[0].layers, caches[1].layers, strict=True):
        assert int(aot.cumulative_length) == int(eager.cumulative_length) == 6 + 8
        torch.testing.assert_close(aot.keys, eager.keys, atol=1e-5, rtol=1e-5)
    assert out.shape == (1, 9)


def test_seeded_samples_repeat_and_follow_the_settings(model):
    ids = prompts(2, 5, seed=3)
    outs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        outs.append(generate(model, ids, max_new_tokens=24, temperature=1.0))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert not torch.equal(outs[0], generate(model, ids, max_new_tokens=24))  # sampled, not greedy
    # A nucleus below the most likely token's probability is greedy.
    assert torch.equal(
        generate(model, ids, max_new_tokens=24, temperature=1.0, top_p=1e-6), generate(model, ids, max_new_tokens=24)
    )


def test_new_weights_of_the_same_shapes_are_read_not_the_old_ones(model, aot_compiles):
    changed = copy.deepcopy(model)
    ids = prompts(1, 6, seed=5)
    generate(changed, ids, max_new_tokens=10)
    with torch.no_grad():  # new tensors, not an in-place copy: the compiled step must not keep the old ones
        changed.lm_head.weight = torch.nn.Parameter(torch.randn_like(changed.lm_head.weight))
        changed.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(
            torch.randn_like(changed.model.layers[0].mlp.down_proj.weight)
        )
    assert torch.equal(
        generate(changed, ids, max_new_tokens=10), generate(changed, ids, max_new_tokens=10, compile=False)
    )
    assert len(aot_compiles) == 1  # same shapes: the same compiled step, given the new tensors


def test_a_model_with_hooks_takes_the_torch_compile_step(model, aot_compiles, cheap_torch_compile):
    hooked = copy.deepcopy(model)  # a capture would run the hook once, at capture time, and never in a step
    hooked.model.layers[0].register_forward_hook(lambda module, args, output: None)
    assert not ahead_of_time.exportable(hooked) and ahead_of_time.exportable(model)
    ids = prompts(1, 4, seed=1)
    assert torch.equal(generate(hooked, ids, max_new_tokens=5), greedy_reference(model, ids, 5))
    assert aot_compiles == []


def test_a_step_export_refuses_falls_back_with_a_warning(model, monkeypatch, cheap_torch_compile):
    other = copy.deepcopy(model)  # its own compiled steps

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot capture this")

    monkeypatch.setattr(torch.export, "export", refuse)
    ids = prompts(1, 4, seed=6)
    logits, cache = prefill(other, ids, 10)
    keys = [layer.keys for layer in cache.layers]
    with pytest.warns(UserWarning, match="could not be compiled ahead of time .*cannot capture this"):
        out = decode(other, logits, cache, max_new_tokens=6)
    assert torch.equal(torch.cat([ids, out], 1), greedy_reference(model, ids, 6))
    assert all(layer.keys is k for layer, k in zip(cache.layers, keys, strict=True))  # tracing's stand-ins undone


def test_two_caches_of_one_compiled_step_keep_their_own_tensors(model, aot_compiles):
    loops = []
    for seed in (8, 9):
        prompt = prompts(1, 5, seed=seed)
        logits, cache = prefill(model, prompt, 16)
        tokens = decoding.select_next(logits, 0.0)
        step = decoding.ahead_of_time_step(model, cache, tokens, 0.0, 1.0, None, None)
        want = greedy_reference(model, prompt, 6)[0, 5:]
        loops.append({"step": step, "cache": cache, "tokens": [tokens], "want": want})
    for _ in range(5):  # the two loops' steps interleaved, one compiled step between them
        for loop in loops:
            loop["tokens"].append(loop["step"](model, loop["tokens"][-1], loop["cache"], 0.0, 1.0, None, None))
    for loop in loops:
        assert torch.equal(torch.cat(loop["tokens"]), loop["want"])
    assert len(aot_compiles) == 1


def test_a_later_process_loads_the_compiled_step_from_disk(model, aot_compiles, monkeypatch):
    ids = prompts(1, 5, seed=10)
    want = greedy_reference(model, ids, 7)
    fresh = copy.deepcopy(model)  # no step compiled in this process yet
    assert torch.equal(generate(fresh, ids, max_new_tokens=7), want)
    assert len(aot_compiles) == 1 and len(list(ahead_of_time.cache_dir().glob("*.pt2"))) == 1
    monkeypatch.setattr(ahead_of_time, "_steps", weakref.WeakKeyDictionary())  # as in a new process
    assert torch.equal(generate(copy.deepcopy(model), ids, max_new_tokens=7), want)
    assert len(aot_compiles) == 1  # loaded, not compiled
    # Another signature (a sampling setting), another package.
    generate(copy.deepcopy(model), ids, max_new_tokens=7, temperature=0.5)
    assert len(aot_compiles) == 2 and len(list(ahead_of_time.cache_dir().glob("*.pt2"))) == 2


def test_an_unreadable_compiled_step_is_compiled_again(model, aot_compiles, monkeypatch):
    ids = prompts(1, 5, seed=11)
    generate(copy.deepcopy(model), ids, max_new_tokens=4)
    (package,) = ahead_of_time.cache_dir().glob("*.pt2")
    package.write_bytes(b"not a package")  # a disk error, or a package of an incompatible build
    monkeypatch.setattr(ahead_of_time, "_steps", weakref.WeakKeyDictionary())
    with pytest.warns(UserWarning, match="could not be loaded .*compiling it again"):
        out = generate(copy.deepcopy(model), ids, max_new_tokens=4)
    assert torch.equal(out, greedy_reference(model, ids, 4)) and len(aot_compiles) == 2
    assert package.stat().st_size > 1000 and list(ahead_of_time.cache_dir().iterdir()) == [
        package
    ]  # no work files left


def test_the_source_of_a_compiled_step_is_part_of_its_key(model, monkeypatch):
    key = ahead_of_time.signature(
        model, ahead_of_time.model_tensors(model), torch.zeros(1, dtype=torch.long), settings=(0.0, 1.0)
    )
    path = ahead_of_time.package_path(key)
    monkeypatch.setattr(ahead_of_time, "_source_digest", "an edited checkout")
    assert ahead_of_time.package_path(key) != path


def test_models_that_differ_in_a_plain_attribute_get_steps_of_their_own(model, aot_compiles):
    # Same tensors, same layouts: only the int8 linears' activations mode (a Python attribute) tells them apart.
    ids = prompts(1, 5, seed=12)
    for activations in ("float", "int8"):
        quantized = quantize_int8(copy.deepcopy(model), activations=activations)
        eager = generate(quantized, ids, max_new_tokens=8, compile=False)
        assert torch.equal(generate(quantized, ids, max_new_tokens=8), eager)
    assert len(aot_compiles) == 2 and len(list(ahead_of_time.cache_dir().glob("*.pt2"))) == 2
    with torch.no_grad():  # a long prompt: fbgemm's packs, which no step calls, keep the step
        quantized(prompts(1, 40, seed=13))
    assert quantized.model.layers[0].mlp.down_proj._packed is not None
    generate(quantized, ids, max_new_tokens=8)
    assert len(aot_compiles) == 2


def test_a_finished_decode_leaves_its_cache_to_be_freed(model):
    ids = prompts(1, 5, seed=14)
    # The first decode compiles the step, and torch keeps the tensors it exported with (as torch.compile's graphs
    # keep theirs); the second takes the compiled step.
    for _ in range(2):
        logits, cache = prefill(model, ids, 12)
        decode(model, logits, cache, max_new_tokens=6)
        keys = weakref.ref(cache.layers[0].keys)
        del cache, logits
        gc.collect()
    assert keys() is None  # the compiled step, kept with the model, holds no cache of a finished decode


@pytest.mark.parametrize("from_disk", [False, True])
def test_a_deleted_model_is_freed_after_its_compiled_decode(from_disk, aot_compiles, monkeypatch):
    ids = prompts(1, 5, seed=15)
    for _ in range(1 + from_disk):  # the second model of the same signature loads the first one's step from disk
        monkeypatch.setattr(ahead_of_time, "_steps", weakref.WeakKeyDictionary())  # as in a new process
        torch.manual_seed(0)
        doomed = Llama2ForCausalLM(tiny_config()).eval()
        generate(doomed, ids, max_new_tokens=6)
        weight = weakref.ref(doomed.model.layers[0].mlp.down_proj.weight)
        del doomed
        gc.collect()
        assert weight() is None  # nothing of the compiled step (compiler, runner, disk load) keeps the weights
    assert len(aot_compiles) == 1


def test_a_tied_model_passes_its_shared_weight_once_and_gets_a_step_of_its_own(model, aot_compiles, aot_calls):
    torch.manual_seed(0)
    tied = Llama2ForCausalLM(tiny_config(tie_word_embeddings=True)).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    ids = prompts(1, 5, seed=16)
    for each in (copy.deepcopy(model), tied):  # a copy: no step compiled for it yet
        assert torch.equal(generate(each, ids, max_new_tokens=6), greedy_reference(each, ids, 6))
    assert len(aot_compiles) == 2  # one weight fewer: not the untied model's step
    untied_inputs, tied_inputs = aot_calls[0], aot_calls[-1]
    assert tied_inputs == untied_inputs - 1


def test_the_disk_cache_deletes_its_least_recently_used_steps_beyond_its_limit(tmp_path, monkeypatch):
    def compile_program(program, path):  # a package of 100 bytes, without compiling
        Path(path).write_bytes(b"x" * 100)
        return str(path)

    def no_compile():
        raise AssertionError("a step on disk is loaded, not compiled")

    monkeypatch.setattr(torch_internals, "aoti_compile", compile_program)
    monkeypatch.setattr(torch_internals, "aoti_load", lambda path: f"runner of {Path(path).name}")
    monkeypatch.setattr(ahead_of_time, "CACHE_LIMIT", 250)  # two packages
    packages = [tmp_path / f"{name}.pt2" for name in "abcd"]
    for seconds, package in enumerate(packages[:3]):
        ahead_of_time.load_or_compile(lambda: "program", package)
        os.utime(package, (seconds, seconds))  # used in this order
    assert [p.exists() for p in packages] == [False, True, True, False]  # c's write made room: a went
    assert ahead_of_time.load_or_compile(no_compile, packages[1]) == "runner of b.pt2"  # b used again
    ahead_of_time.load_or_compile(lambda: "program", packages[3])
    assert [p.exists() for p in packages] == [False, True, False, True]  # c, now the least recently used, went


def test_threads_decoding_through_one_compiled_step_each_get_their_own_tokens(model, aot_compiles):
    shared = copy.deepcopy(model)  # its own compiled step, compiled below before the threads start
    ids = [prompts(1, 6, seed=20 + i) for i in range(4)]
    want = [greedy_reference(model, prompt, 24) for prompt in ids]
    assert torch.equal(generate(shared, ids[0], max_new_tokens=24), want[0])
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda prompt: generate(shared, prompt, max_new_tokens=24), ids * 3))
    assert all(torch.equal(out, want[i % 4]) for i, out in enumerate(got))
    assert len(aot_compiles) == 1  # all through the one step


def test_a_lora_model_decodes_through_the_compiled_step_with_its_current_adapters(model, aot_compiles, aot_calls):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(copy.deepcopy(model), config).eval()
    ids = prompts(1, 6, seed=3)
    outs = []
    for _ in range(2):  # new adapter weights of the same shapes: the same step, given them
        outs.append(generate(lora, ids, max_new_tokens=8))
        assert torch.equal(outs[-1], greedy_reference(lora, ids, 8))
        with torch.no_grad():
            for name, parameter in lora.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(generator=torch.Generator().manual_seed(len(name)))
    assert not torch.equal(outs[0], outs[1])  # the adapters' change reached the tokens
    assert len(aot_compiles) == 1 and len(aot_calls) == 2 * 7
