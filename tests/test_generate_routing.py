"""`generate(cache_implementation="static")` through the static-cache step: the same tokens as transformers' default
loop (greedy, and sampled at one seed), the route shown by which caches the forwards see, and transformers' loop
for what the route declines."""

import copy
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, CompileConfig, StaticCache, pipeline
from transformers.generation.streamers import BaseStreamer

from modeling_llama2 import Llama2ForCausalLM, torch_internals
from modeling_llama2.inference import ahead_of_time, generate_routing

from .alignment_helpers import alignment_config, prompts, tiny_config

SAMPLED = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama2ForCausalLM(tiny_config()).eval()


def left_padded(pads: list[int], length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    ids = prompts(len(pads), length, seed=4)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = 0, 0
    return ids, mask


def forwards(model, fn, *args, **kwargs) -> tuple[object, list[tuple[str, int]]]:
    """`fn(*args, **kwargs)` and, for each forward it ran, the type of its cache and its number of input tokens: the
    route's prefill sees a DynamicCache, its steps a StaticCache; transformers' static loop prefills into the latter."""
    seen = []

    def record(module, args, kwargs):
        seen.append((type(kwargs.get("cache")).__name__, kwargs["input_ids"].shape[1]))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        return fn(*args, **kwargs), seen
    finally:
        hook.remove()


def routed(seen: list[tuple[str, int]], prompt_length: int) -> bool:
    # Samples of one prompt (`num_return_sequences`) step over a cache that keeps the prompt once.
    steps = {("StaticCache", 1), ("SharedPrefixCache", 1)}
    return seen[0] == ("DynamicCache", prompt_length) and all(s in steps for s in seen[1:])


def default_and_static(model, input_ids, seed: int = 0, **kwargs):
    """The default `generate`'s tokens, the static one's, and the forwards the static one ran; both from one seed."""
    torch.manual_seed(seed)
    default = model.generate(input_ids, **kwargs)
    torch.manual_seed(seed)
    static, seen = forwards(model, model.generate, input_ids, cache_implementation="static", **kwargs)
    return default, static, seen


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("settings", [dict(do_sample=False), SAMPLED], ids=["greedy", "sampled"])
def test_static_generate_takes_the_route_and_matches_the_default(model, batch, settings):
    # Through the private `GenerationMixin._sample` override: this fails if transformers stops calling it.
    ids = prompts(batch, 7)
    default, static, seen = default_and_static(model, ids, max_new_tokens=20, pad_token_id=0, **settings)
    assert torch.equal(static, default)
    assert static.shape == (batch, 27)
    assert routed(seen, 7) and len(seen) == 20  # the prefill, then a step for each new token but the last


@pytest.mark.parametrize(
    "settings",
    [
        dict(do_sample=True, temperature=1.3, top_k=0),
        dict(do_sample=True, top_k=5),
        dict(do_sample=True, top_k=0, top_p=0.5, min_p=0.05),
        dict(do_sample=True, repetition_penalty=1.5, no_repeat_ngram_size=2, num_return_sequences=3),
        dict(do_sample=False, repetition_penalty=1.5, min_new_tokens=12, eos_token_id=[5, 7]),
    ],
)
def test_every_logits_processor_gives_the_default_tokens(model, settings):
    default, static, seen = default_and_static(model, prompts(2, 6, seed=1), seed=3, max_new_tokens=16, **settings)
    assert torch.equal(static, default)
    assert routed(seen, 6)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("settings", [SAMPLED, dict(do_sample=True, top_k=0)], ids=["nucleus", "full"])
def test_return_sequences_prefill_each_prompt_once_and_match_the_default(model, settings, padded):
    ids, mask = left_padded([0, 3] if padded else [0, 0])
    batches = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append((type(kwargs["cache"]).__name__, *kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        default, static, _ = default_and_static(
            model, ids, attention_mask=mask, max_new_tokens=10, num_return_sequences=4, pad_token_id=0, **settings
        )
    finally:
        hook.remove()
    assert torch.equal(static, default) and static.shape == (8, 19)
    steps = batches[-10:]  # the routed call's: its prefill, then 9 steps
    assert steps[0] == ("DynamicCache", 2, 9) and set(steps[1:]) == {("SharedPrefixCache", 8, 1)}


def test_compiled_steps_over_shared_prompts_match_the_default_in_one_graph(model, every_guard):
    ids, mask = left_padded([0, 3])
    compiled = CompileConfig(backend="eager", fullgraph=True)  # no graph break over the shared prompts
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for seed in (0, 1):
        default, static, _ = default_and_static(
            model, ids, seed=seed, attention_mask=mask, max_new_tokens=10, num_return_sequences=4, pad_token_id=0,
            compile_config=compiled, **SAMPLED,
        )  # fmt: skip
        assert torch.equal(static, default)
    assert counters["stats"]["unique_graphs"] == 1


def test_repeated_rows_without_return_sequences_each_keep_their_prompt(model):
    ids = prompts(1, 6).repeat(3, 1)  # the same prompt three times, not samples of it
    default, static, seen = default_and_static(model, ids, max_new_tokens=8, pad_token_id=0, do_sample=False)
    assert torch.equal(static, default) and set(seen[1:]) == {("StaticCache", 1)}


@pytest.mark.parametrize("settings", [dict(do_sample=False), SAMPLED], ids=["greedy", "sampled"])
def test_left_padded_prompts_match_the_default(model, settings):
    ids, mask = left_padded([0, 4, 2])
    default, static, seen = default_and_static(
        model, ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0, **settings
    )
    assert torch.equal(static, default)
    assert routed(seen, 9)


@pytest.mark.parametrize("pad", [0, None], ids=["pad", "no-pad"])
@pytest.mark.parametrize("settings", [dict(do_sample=False), SAMPLED], ids=["greedy", "sampled"])
def test_eos_stops_rows_and_pads_them_like_the_default(model, settings, pad):
    ids = prompts(2, 6, seed=1)
    torch.manual_seed(0)
    free = model.generate(ids, max_new_tokens=40, pad_token_id=0, eos_token_id=None, **settings)[:, 6:]
    eos = [int(free[0, 3]), int(free[1, 5])]  # each row meets one of them early
    default, static, seen = default_and_static(
        model, ids, max_new_tokens=40, eos_token_id=eos, pad_token_id=pad, **settings
    )
    assert torch.equal(static, default)
    assert routed(seen, 6) and len(seen) == static.shape[1] - 6 < 40
    first_eos = next(i for i, t in enumerate(static[0, 6:].tolist()) if t in eos)
    after = static[0, 6 + first_eos + 1 :].tolist()
    assert after and after == [eos[0] if pad is None else pad] * len(after)  # without a pad id, the first EOS id


def test_a_static_cache_in_the_saved_generation_config_routes_the_pipeline(tmp_path, tokenizer):
    torch.manual_seed(0)
    Llama2ForCausalLM(alignment_config(len(tokenizer), pad_token_id=0)).save_pretrained(tmp_path / "default")
    static = AutoModelForCausalLM.from_pretrained(tmp_path / "default")
    static.generation_config.cache_implementation = "static"
    static.save_pretrained(tmp_path / "static")
    static = AutoModelForCausalLM.from_pretrained(tmp_path / "static")
    assert static.generation_config.cache_implementation == "static"

    texts = ["the cat sat on the", "a big dog"]
    for settings in [dict(do_sample=False), SAMPLED]:
        outs = []
        for path in ["default", "static"]:
            generator = pipeline("text-generation", model=str(tmp_path / path), tokenizer=tokenizer)
            generator.tokenizer.padding_side = "left"
            torch.manual_seed(0)
            out, seen = forwards(
                generator.model, generator, texts, max_new_tokens=12, batch_size=2, return_full_text=False, **settings
            )
            outs.append(out)
        assert outs[0] == outs[1]
        assert routed(seen, seen[0][1])


def test_stop_strings_and_streamers_run_on_the_route(tokenizer):
    torch.manual_seed(0)
    lm = Llama2ForCausalLM(alignment_config(len(tokenizer), pad_token_id=0)).eval()
    ids = tokenizer(["the cat sat"], return_tensors="pt").input_ids
    free = lm.generate(ids, max_new_tokens=20, do_sample=False)
    stop = tokenizer.decode(free[0, ids.shape[1] + 4 : ids.shape[1] + 6])
    default, static, seen = default_and_static(
        lm, ids, max_new_tokens=20, do_sample=False, stop_strings=[stop], tokenizer=tokenizer
    )
    assert torch.equal(static, default) and static.shape[1] < free.shape[1]
    assert routed(seen, ids.shape[1])

    class Collect(BaseStreamer):
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.tolist())

        def end(self):
            self.ended = True

    streams = [Collect(), Collect()]
    for streamer, cache in zip(streams, [None, "static"], strict=True):
        lm.generate(ids, max_new_tokens=8, do_sample=False, streamer=streamer, cache_implementation=cache)
    assert streams[0].puts == streams[1].puts and streams[1].ended


def transformers_static(model, input_ids, **kwargs):
    """`generate(cache_implementation="static")` with the route unset: transformers' static loop."""
    sampler = Llama2ForCausalLM.static_cache_sampler
    Llama2ForCausalLM.static_cache_sampler = None
    try:
        torch.manual_seed(0)
        return forwards(model, model.generate, input_ids, cache_implementation="static", **kwargs)
    finally:
        Llama2ForCausalLM.static_cache_sampler = sampler


@pytest.mark.parametrize(
    "settings",
    [
        dict(num_beams=2),
        dict(return_dict_in_generate=True, output_scores=True),
        dict(output_attentions=True, return_dict_in_generate=True),
        dict(use_cache=False),
        dict(prefill_chunk_size=4),
        dict(position_ids=torch.arange(3, 10)[None].expand(2, -1)),
    ],
    ids=["beams", "scores", "attentions", "no-cache", "chunked-prefill", "position-ids"],
)
def test_what_the_route_declines_runs_transformers_loop(model, settings):
    ids = prompts(2, 7, seed=2)
    kwargs = dict(max_new_tokens=10, pad_token_id=0, do_sample=True, **settings)
    expected, expected_seen = transformers_static(model, ids, **kwargs)
    torch.manual_seed(0)
    out, seen = forwards(model, model.generate, ids, cache_implementation="static", **kwargs)
    sequences = [o.sequences if hasattr(o, "sequences") else o for o in (out, expected)]
    assert torch.equal(*sequences)
    assert seen == expected_seen and not routed(seen, 7)


def test_training_mode_and_remote_code_run_transformers_loop(model):
    ids = prompts(1, 5)
    model.train()
    try:
        out, seen = forwards(model, model.generate, ids, max_new_tokens=6, cache_implementation="static")
    finally:
        model.eval()
    assert seen[0][0] == "StaticCache"  # transformers' static loop prefills into it
    expected, _ = transformers_static(model, ids, max_new_tokens=6)  # as a remote-code copy, with no route set
    assert torch.equal(out, expected)


def test_the_step_is_eager_unless_compile_config_asks(model, every_guard):
    ids = prompts(2, 7, seed=5)
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    default, static, _ = default_and_static(model, ids, max_new_tokens=12, pad_token_id=0, do_sample=False)
    assert torch.equal(static, default) and not counters["stats"]["unique_graphs"]
    eager_backend = CompileConfig(backend="eager", fullgraph=True)
    for compile_config in [eager_backend, eager_backend]:  # the second call reuses the graph
        compiled, seen = forwards(
            model, model.generate, ids, max_new_tokens=12, pad_token_id=0, do_sample=False,
            cache_implementation="static", compile_config=compile_config,
        )  # fmt: skip
        assert torch.equal(compiled, default) and routed(seen, 7)
    assert counters["stats"]["unique_graphs"] == 1
    model.generate(
        ids, max_new_tokens=12, cache_implementation="static", compile_config=eager_backend, disable_compile=True
    )
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_steps_after_the_first_check_only_the_guards_that_tell_graphs_apart(model, monkeypatch):
    skipped = []
    set_stance = torch.compiler.set_stance

    def recording_set_stance(*args, skip_guard_eval_unsafe=False, **kwargs):
        skipped.append(skip_guard_eval_unsafe)
        return set_stance(*args, skip_guard_eval_unsafe=skip_guard_eval_unsafe, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", recording_set_stance)
    ids = prompts(2, 7, seed=6)
    kwargs = dict(max_new_tokens=12, pad_token_id=0, do_sample=False, cache_implementation="static")
    default = model.generate(ids, max_new_tokens=12, pad_token_id=0, do_sample=False)
    assert torch.equal(model.generate(ids, **kwargs), default) and not skipped  # eager steps have no guards
    compiled = model.generate(ids, **kwargs, compile_config=CompileConfig(backend="eager", fullgraph=True))
    assert torch.equal(compiled, default) and skipped == [True] * 10  # 11 steps, the first checks every guard


def test_the_step_compiles_once_eager_steps_took_what_a_compile_costs(monkeypatch):
    monkeypatch.setattr(generate_routing, "COMPILE_AFTER_SECONDS", 1e-9)  # the first call's loop takes longer
    monkeypatch.setattr(generate_routing, "AUTO_COMPILE_CONFIG", CompileConfig(backend="eager", fullgraph=True))
    torch.manual_seed(0)
    model = Llama2ForCausalLM(tiny_config()).eval()
    ids = prompts(1, 6, seed=6)
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    kwargs = dict(max_new_tokens=10, do_sample=False, cache_implementation="static")
    default = model.generate(ids, max_new_tokens=10, do_sample=False)
    eager = model.generate(ids, **kwargs)
    assert not counters["stats"]["unique_graphs"]
    assert torch.equal(model.generate(ids, disable_compile=True, **kwargs), default)
    assert not counters["stats"]["unique_graphs"]
    compiled, seen = forwards(model, model.generate, ids, **kwargs)
    assert counters["stats"]["unique_graphs"] == 1 and routed(seen, 6)
    assert torch.equal(eager, default) and torch.equal(compiled, default)


def test_the_route_sizes_its_cache_as_transformers_does(monkeypatch):
    # `max_cache_len` (or an earlier, longer call) sizes the cache, so that a compiled step keeps its shapes.
    torch.manual_seed(0)
    model = Llama2ForCausalLM(tiny_config()).eval()
    sizes = []
    original = StaticCache.__init__

    def record(self, *args, max_cache_len, **kwargs):
        sizes.append(max_cache_len)
        original(self, *args, max_cache_len=max_cache_len, **kwargs)

    monkeypatch.setattr(StaticCache, "__init__", record)
    model.generate(prompts(1, 5), max_new_tokens=8, cache_implementation="static", max_cache_len=40)
    model.generate(prompts(1, 5), max_new_tokens=8, cache_implementation="static")
    assert sizes == [40, 40, 40, 40]  # transformers' cache, then the route's copy, in each call


@pytest.fixture
def aot_runs(monkeypatch) -> list:
    """One entry per call of a step compiled ahead of time."""
    runs = []
    run = torch_internals.aoti_run
    monkeypatch.setattr(torch_internals, "aoti_run", lambda runner, inputs: runs.append(1) or run(runner, inputs))
    return runs


def test_on_a_cpu_the_rule_compiles_the_step_ahead_of_time(monkeypatch, aot_compiles, aot_runs):
    monkeypatch.setattr(generate_routing, "COMPILE_AFTER_SECONDS", 1e-9)  # the first call's loop takes longer
    torch.manual_seed(0)
    model = Llama2ForCausalLM(tiny_config()).eval()
    ids = prompts(2, 6, seed=7)
    kwargs = dict(max_new_tokens=10, cache_implementation="static", pad_token_id=0)
    model.generate(ids, do_sample=False, **kwargs)  # eager, and long enough
    assert aot_runs == []
    for settings in ({"do_sample": False}, SAMPLED):  # one compiled step: the sampling stays in Python
        outs = []
        for static in ({}, {"cache_implementation": "static"}):  # no hook to see the route: it would stop the export
            torch.manual_seed(3)
            outs.append(model.generate(ids, max_new_tokens=10, pad_token_id=0, **settings, **static))
        assert torch.equal(*outs), settings
    assert len(aot_compiles) == 1 and len(aot_runs) == 2 * 9
    # A `compile_config` is torch.compile's (here its eager backend), and `disable_compile` runs eagerly.
    eager_backend = CompileConfig(backend="eager", fullgraph=True)
    greedy = model.generate(ids, do_sample=False, max_new_tokens=10, pad_token_id=0)
    assert torch.equal(model.generate(ids, do_sample=False, compile_config=eager_backend, **kwargs), greedy)
    model.generate(ids, do_sample=False, disable_compile=True, **kwargs)
    assert len(aot_runs) == 2 * 9


def test_a_step_compiled_in_an_earlier_process_is_loaded_at_the_first_call(monkeypatch, aot_compiles, aot_runs):
    torch.manual_seed(0)
    first = Llama2ForCausalLM(tiny_config()).eval()
    ids = prompts(1, 5, seed=8)
    kwargs = dict(max_new_tokens=8, do_sample=False, cache_implementation="static", pad_token_id=0)
    rule = generate_routing.COMPILE_AFTER_SECONDS
    monkeypatch.setattr(generate_routing, "COMPILE_AFTER_SECONDS", 0.0)  # compiled at once
    want = first.generate(ids, **kwargs)
    assert len(aot_compiles) == 1 and len(aot_runs) == 7
    monkeypatch.setattr(generate_routing, "COMPILE_AFTER_SECONDS", rule)  # a new model: eager for a minute first
    monkeypatch.setattr(ahead_of_time, "_steps", weakref.WeakKeyDictionary())  # as in a new process
    second = copy.deepcopy(first)
    assert torch.equal(second.generate(ids, **kwargs), want)
    assert len(aot_compiles) == 1 and len(aot_runs) == 14  # loaded from disk, not compiled
    assert torch.equal(want, first.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0))
