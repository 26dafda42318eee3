"""Fast decoding: the compiled static-cache step against `generate`, EOS handling, and shared-prefix best-of-N.

Compiling on a CPU takes seconds, so one test compiles the real `torch.compile` step with inductor (the CPU's step
compiled ahead of time has its own tests, `test_ahead_of_time.py`); the tests of the loop's logic compile it without
inductor's code generation (`cheap_compile`) or run it eagerly (`compile=False`)."""

import contextlib
import warnings

import pytest
import torch

from modeling_llama2 import Llama2ForCausalLM, modeling_llama2
from modeling_llama2.inference import decoding
from modeling_llama2.inference.decoding import (
    SAMPLE_BLOCK,
    SharedPrefixCache,
    decode,
    generate,
    inverse_cdf_sample,
    padded_step_inputs,
    prefill,
    run_prompt,
    sample_n,
    select_next,
)

from .alignment_helpers import greedy_reference, prompts, tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama2ForCausalLM(tiny_config()).eval()


def test_compiled_greedy_matches_generate_without_recompiling(model, every_guard, torch_compile_step):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()  # reset() keeps the counts of earlier tests
    for seed in range(3):  # new prompts and caches of the same shape reuse the graph
        ids = prompts(2, 7, seed)
        out = generate(model, ids, max_new_tokens=20, max_cache_len=64)
        assert torch.equal(out, greedy_reference(model, ids, 20))
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("compile", [False, True])
def test_left_padded_prompts_of_different_lengths_match_generate(model, compile, cheap_compile):
    ids = prompts(3, 9, seed=4)
    mask = torch.ones_like(ids)
    for row, pads in enumerate([0, 4, 2]):  # prompts of 9, 5 and 7 tokens
        ids[row, :pads], mask[row, :pads] = 0, 0
    out = generate(model, ids, max_new_tokens=16, compile=compile, attention_mask=mask)
    assert torch.equal(out, greedy_reference(model, ids, 16, attention_mask=mask))
    # Each row continues as it would alone, unpadded.
    alone = generate(model, ids[1:2, 4:], max_new_tokens=16, compile=False)
    assert torch.equal(out[1, 9:], alone[0, 5:])


@pytest.mark.parametrize("batch", [1, 3])
def test_eager_greedy_matches_generate_and_static_generate(model, batch):
    ids = prompts(batch, 9)
    out = generate(model, ids, max_new_tokens=16, compile=False)
    assert torch.equal(out, greedy_reference(model, ids, 16))
    assert torch.equal(out, greedy_reference(model, ids, 16, cache_implementation="static"))


def test_eos_pads_finished_rows_and_stops_like_generate(model):
    ids = prompts(2, 6, seed=1)
    free = greedy_reference(model, ids, 40)[:, 6:]
    eos = int(free[0, 3])  # row 0 stops early; row 1 when (if ever) it meets the same token
    out = generate(model, ids, max_new_tokens=40, eos_token_id=eos, compile=False)
    expected = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, expected)
    assert (out[0, 6 + 4 :] == 0).all()


def test_on_cpu_decoding_stops_at_the_step_that_finishes_the_last_row(model):
    ids = prompts(1, 6, seed=2)
    eos = int(greedy_reference(model, ids, 8)[0, 6 + 2])  # the third new token
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        out = generate(model, ids, max_new_tokens=40, eos_token_id=eos, compile=False)
    finally:
        hook.remove()
    assert out.shape == (1, 6 + 3) and len(calls) == 1 + 2  # the prefill and two steps, not 39


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # multi-query, grouped, multi-head
def test_greedy_samples_of_one_prompt_match_generate_on_every_row(kv_heads, attn_implementation, monkeypatch):
    # the prompt's keys and values held once (in more slots than it fills) for all rows: the tokens of `generate`
    # on n copies of the prompt
    torch.manual_seed(0)
    config = tiny_config(num_key_value_heads=kv_heads)
    config._attn_implementation = attn_implementation
    model = Llama2ForCausalLM(config).eval()
    ids = prompts(1, 9, seed=3)
    seen, original = [], modeling_llama2.shared_prefix_attention
    monkeypatch.setattr(modeling_llama2, "shared_prefix_attention", lambda *a, **k: seen.append(1) or original(*a, **k))
    out = sample_n(model, ids, n=3, max_new_tokens=14, temperature=0.0, max_cache_len=40, compile=False)
    assert len(seen) == 13 * config.num_hidden_layers  # every decode step's attention read the shared prompt
    assert torch.equal(out, greedy_reference(model, ids.expand(3, -1), 14))


def test_compiled_samples_of_prompts_of_different_lengths_share_one_graph(model, cheap_compile, every_guard):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for seed, length in [(0, 9), (1, 13), (2, 6)]:  # one `max_cache_len`: one graph
        ids = prompts(1, length, seed)
        out = sample_n(model, ids, n=3, max_new_tokens=10, temperature=0.0, max_cache_len=32)
        assert torch.equal(out, greedy_reference(model, ids.expand(3, -1), 10))
    assert counters["stats"]["unique_graphs"] == 1


def test_a_step_over_shared_prompts_equals_a_step_over_their_copies(model):
    ids, mask = prompts(2, 11), torch.ones(2, 11, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0  # a left-padded second prompt
    logits, prompt = run_prompt(model, ids, mask)
    shared = SharedPrefixCache(
        prompt, config=model.config, samples=3, max_new_tokens=5, prefix_slots=16, attention_mask=mask
    )
    _, copies = prefill(model, ids.repeat_interleave(3, dim=0), 16, attention_mask=mask.repeat_interleave(3, dim=0))
    positions, slots_mask = padded_step_inputs(mask.repeat_interleave(3, dim=0), copies)
    assert torch.equal(shared.next_positions, positions)
    tokens = torch.tensor([[3], [5], [7], [3], [9], [2]])
    with torch.no_grad():
        for _ in range(3):  # each row its own continuation, attending over its earlier own tokens
            expected = model(input_ids=tokens, cache=copies, position_ids=positions, attention_mask=slots_mask).logits
            got = model(input_ids=tokens, cache=shared, position_ids=positions).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            tokens, positions = tokens + 1, positions + 1


def test_compiled_prefill_matches_eager_for_every_prompt_length_in_one_graph(model):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for length in (20, 33, 27):  # past the rows kernel's 16 rows: one graph with a symbolic length
        ids = prompts(2, length, seed=length)
        logits, compiled = run_prompt(model, ids, compile=True)
        expected_logits, expected = run_prompt(model, ids)
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
        for (keys, values), (expected_keys, expected_values) in zip(compiled, expected, strict=True):
            torch.testing.assert_close(keys, expected_keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(values, expected_values, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    ids = prompts(2, 20, seed=20)
    out = generate(model, ids, max_new_tokens=8, compile=False, compile_prefill=True)
    assert torch.equal(out, greedy_reference(model, ids, 8))


def test_shared_prefix_cache_equals_prefilling_every_row(model):
    ids = prompts(1, 11)
    logits, shared = prefill(model, ids, max_cache_len=32, batch_size=4)
    repeated_logits, repeated = prefill(model, ids.expand(4, -1), max_cache_len=32)
    torch.testing.assert_close(logits.expand(4, -1), repeated_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(shared.layers, repeated.layers, strict=False):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
        assert int(a.cumulative_length) == int(b.cumulative_length) == 11


def test_sample_n_at_temperature_zero_is_greedy_on_every_row(model):
    ids = prompts(1, 8)
    samples = sample_n(model, ids, n=5, max_new_tokens=12, temperature=0.0, compile=False)
    assert samples.shape == (5, 20)
    assert torch.equal(samples, greedy_reference(model, ids, 12).expand(5, -1))


def test_sample_n_draws_distinct_samples_from_the_shared_prompt(model):
    ids = prompts(1, 8)
    torch.manual_seed(0)
    samples = sample_n(model, ids, n=8, max_new_tokens=12, temperature=1.0, compile=False)
    assert samples.shape == (8, 20)
    assert torch.equal(samples[:, :8], ids.expand(8, -1))
    assert len({tuple(row.tolist()) for row in samples[:, 8:]}) > 1


def test_sampled_tokens_follow_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, -1)
    counts = torch.bincount(select_next(logits, temperature=1.0), minlength=4).float() / 20000
    torch.testing.assert_close(counts, torch.softmax(logits[0], -1), atol=0.015, rtol=0)
    counts = torch.bincount(select_next(logits, temperature=0.5), minlength=4).float() / 20000
    torch.testing.assert_close(counts, torch.softmax(logits[0] / 0.5, -1), atol=0.015, rtol=0)


def test_a_sample_at_the_total_takes_a_possible_token(monkeypatch):
    # u at the very end of the distribution, where a block's running sum can round below its end (probabilities
    # of widely different sizes): every row still draws a token of nonzero probability, never the zeros after it
    probs = torch.randn(2000, SAMPLE_BLOCK, generator=torch.Generator().manual_seed(0)).mul(8).exp()
    probs[:, -7:] = 0
    monkeypatch.setattr(torch, "rand", lambda *size, **kwargs: torch.zeros(size, **kwargs))
    tokens = inverse_cdf_sample(probs)
    assert tokens.lt(SAMPLE_BLOCK - 7).all() and probs.gather(1, tokens[:, None]).gt(0).all()


def test_samples_over_many_blocks_of_the_vocabulary_follow_the_softmax():
    # likely tokens at both ends of a block, across blocks and at the vocabulary's end; all others impossible
    likely = torch.tensor([5, 127, 128, 400, 999])
    logits = torch.full((20000, 1000), -float("inf"))
    logits[:, likely] = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5])
    torch.manual_seed(0)
    tokens = select_next(logits, temperature=1.0)
    assert set(tokens.tolist()) <= set(likely.tolist())
    counts = torch.bincount(tokens, minlength=1000)[likely].float() / 20000
    torch.testing.assert_close(counts, torch.softmax(logits[0, likely], -1), atol=0.015, rtol=0)


@pytest.mark.parametrize("uniform", [0.0, 1.0 - 2.0**-53])  # the ends of torch.rand's range
def test_sampling_never_takes_a_token_of_probability_zero(monkeypatch, uniform):
    # zero-probability tokens at both ends of the vocabulary and between the two likely ones: whatever the uniform
    # number drawn, the sample is the token whose interval of the cumulative distribution holds it
    logits = torch.tensor([[-float("inf"), -float("inf"), 0.1, -float("inf"), 0.0, -float("inf")]])
    monkeypatch.setattr(torch, "rand", lambda *size, **kwargs: torch.full(size, uniform, **kwargs))
    assert select_next(logits, temperature=1.0).tolist() == [4 if uniform == 0.0 else 2]
    assert select_next(logits, temperature=1.0, top_p=0.4).tolist() == [2]


def test_top_p_samples_only_the_nucleus_in_proportion():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, -1)
    torch.manual_seed(0)
    tokens = select_next(logits, temperature=1.0, top_p=0.7)  # 0.5 + 0.3 reach 0.7: tokens 2 and 3 are cut
    assert set(tokens.tolist()) == {0, 1}
    assert abs((tokens == 0).float().mean().item() - 0.5 / 0.8) < 0.03


def test_generate_with_a_tiny_top_p_keeps_only_the_most_likely_token(model):
    ids = prompts(2, 7, seed=5)
    torch.manual_seed(0)
    nucleus = generate(model, ids, max_new_tokens=12, temperature=1.0, top_p=1e-6, compile=False)
    assert torch.equal(nucleus, greedy_reference(model, ids, 12))


@pytest.mark.parametrize("shared", [True, False])  # each prompt kept once, or copied to its rows (other kernels)
def test_samples_of_left_padded_prompts_match_generate_on_their_rows(model, shared, monkeypatch):
    ids = prompts(3, 9, seed=6)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0  # prompts of 9, 5 and 7 tokens
    ids[2, :2], mask[2, :2] = 0, 0
    if not shared:
        monkeypatch.setattr(decoding, "SHARED_PREFIX_ATTENTION", ())
    out = sample_n(model, ids, n=2, max_new_tokens=12, temperature=0.0, attention_mask=mask, compile=False)
    rows, row_mask = ids.repeat_interleave(2, dim=0), mask.repeat_interleave(2, dim=0)
    assert torch.equal(out, greedy_reference(model, rows, 12, attention_mask=row_mask))


def test_sample_n_refuses_a_mask_of_another_shape_or_an_empty_prompt(model):
    ids = prompts(2, 4)
    with pytest.raises(ValueError, match="at least one token"):
        sample_n(model, ids, n=3, max_new_tokens=2, attention_mask=torch.ones(2, 5), compile=False)
    with pytest.raises(ValueError, match="at least one token"):
        sample_n(model, ids, n=3, max_new_tokens=2, attention_mask=torch.tensor([[1] * 4, [0] * 4]), compile=False)


def test_more_compiled_variants_than_dynamos_default_limit(model, cheap_compile):
    # batch sizes x cache lengths: 9 graphs of the one step function, where dynamo's default stops at 8
    for batch in (1, 2, 3):
        for max_cache_len in (24, 32, 40):
            ids = prompts(batch, 5, seed=batch)
            assert generate(model, ids, max_new_tokens=4, max_cache_len=max_cache_len).shape == (batch, 9)


def test_steps_after_the_first_check_only_the_guards_that_tell_graphs_apart(model, cheap_compile, monkeypatch):
    stance = []

    @contextlib.contextmanager
    def set_stance(stance_name="default", *, skip_guard_eval_unsafe=False):
        stance.append(skip_guard_eval_unsafe)
        yield
        stance.pop()

    step = decoding.cpu_compiled_decode_step
    calls = []
    monkeypatch.setattr(torch.compiler, "set_stance", set_stance)
    monkeypatch.setattr(decoding, "cpu_compiled_decode_step", lambda *a: calls.append(any(stance)) or step(*a))
    generate(model, prompts(1, 5), max_new_tokens=5)
    assert calls == [False, True, True, True] and not stance  # the first step checks every guard


def test_a_later_call_that_needs_a_new_graph_compiles_it_with_every_guard_checked():
    graphs = []

    def backend(graph, example_inputs):
        graphs.append([tuple(x.shape) for x in example_inputs])
        return graph.forward

    step = decoding.guarded_once(torch.compile(lambda x: x * 2, backend=backend, dynamic=False))
    assert step(torch.ones(2)).tolist() == [2, 2] and step(torch.ones(2)).tolist() == [2, 2]
    assert step(torch.ones(3)).tolist() == [2, 2, 2]  # a new shape: a recompile, refused under the stance alone
    assert step(torch.ones(3)).tolist() == [2, 2, 2] and graphs == [[(2,)], [(3,)]]


def test_graphs_that_differ_in_settings_alone_are_told_apart_after_the_first_step(model, cheap_compile):
    # Temperature and top-p are constants of each graph, not tensors: a step that skipped every guard but the
    # tensors' from the first step on would reuse the greedy graph for the samples.
    ids = prompts(2, 6, seed=3)
    for temperature, top_p in [(0.0, 1.0), (1.0, 1.0), (1.0, 0.5), (0.0, 1.0), (1.0, 1.0)]:
        outs = []
        for compile in (True, False):
            torch.manual_seed(7)
            outs.append(generate(model, ids, max_new_tokens=12, temperature=temperature, top_p=top_p, compile=compile))
        assert torch.equal(*outs), (temperature, top_p)
    assert not torch.equal(outs[0], generate(model, ids, max_new_tokens=12, compile=False))  # sampled, not greedy


def test_top_p_zero_keeps_the_most_likely_token():
    logits = torch.tensor([[0.1, 3.0, 0.5, -1.0], [2.0, -1.0, 0.0, 5.0]])
    assert select_next(logits, temperature=1.0, top_p=0.0).tolist() == [1, 3]  # not token 0 every time


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), r"at least one token, got shape \(1, 0\)"),
        (dict(max_new_tokens=-1), "`max_new_tokens` must be >= 0, got -1"),
        (dict(input_ids=torch.tensor([[1, 96, 5]])), r"token ids from 1 to 96, outside the vocabulary \[0, 96\)"),
        (dict(input_ids=torch.tensor([[1, -1]])), r"token ids from -1 to 1, outside the vocabulary"),
        (dict(temperature=-0.5), r"`temperature` must be >= 0 \(0: greedy\), got -0.5"),
        (dict(temperature=float("nan")), "`temperature` must be >= 0 .*got nan"),
        (dict(temperature=1.0, top_p=1.5), r"`top_p` must be in \[0, 1\] .*got 1.5"),
        (dict(max_new_tokens=200), "A prompt of 4 tokens plus 200 new tokens does not fit the model's context of 128"),
        (dict(max_cache_len=6), "`max_cache_len` 6 is too small for a prompt of 4 tokens plus 4 new ones"),
    ],
)
@pytest.mark.parametrize("entry", ["generate", "sample_n"])
def test_bad_requests_are_refused_before_any_compute(model, entry, kwargs, message):
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    request = {"input_ids": prompts(1, 4), "max_new_tokens": 4, "compile": False, **kwargs}
    try:
        with pytest.raises(ValueError, match=message):
            generate(model, **request) if entry == "generate" else sample_n(model, n=2, **request)
    finally:
        hook.remove()
    assert not calls


def test_decode_refuses_more_tokens_than_the_cache_or_context_holds(model):
    logits, cache = prefill(model, prompts(1, 10), max_cache_len=16)
    with pytest.raises(ValueError, match="The cache has 6 free slots after its 10 prompt tokens, too few for 7"):
        decode(model, logits, cache, max_new_tokens=7, compile=False)
    with pytest.raises(ValueError, match="`max_new_tokens` must be >= 0, got -2"):
        decode(model, logits, cache, max_new_tokens=-2, compile=False)
    logits, cache = prefill(model, prompts(1, 120), max_cache_len=256)
    with pytest.raises(ValueError, match="A prompt of 120 tokens plus 9 new tokens .* ask for at most 8 new tokens"):
        decode(model, logits, cache, max_new_tokens=9, compile=False)


def test_decode_refuses_a_mask_beside_a_shared_prefix_cache(model):
    ids = prompts(1, 6)
    logits, prompt = run_prompt(model, ids)
    cache = SharedPrefixCache(prompt, config=model.config, samples=2, max_new_tokens=4, prefix_slots=6)
    with pytest.raises(ValueError, match="masks its prompts' padding itself"):
        decode(model, logits.expand(2, -1), cache, max_new_tokens=4, attention_mask=torch.ones(2, 6), compile=False)


def test_sample_n_refuses_zero_samples(model):
    with pytest.raises(ValueError, match="`n` must be at least 1 sample, got 0"):
        sample_n(model, prompts(1, 4), n=0, max_new_tokens=2, compile=False)


def test_rope_scaling_stretches_the_context_generation_may_fill():
    torch.manual_seed(0)
    linear = Llama2ForCausalLM(tiny_config(max_position_embeddings=16, rope_scaling={"type": "linear", "factor": 2.0}))
    ids = prompts(1, 10)
    assert generate(linear.eval(), ids, max_new_tokens=22, compile=False).shape == (1, 32)  # 2 x 16
    with pytest.raises(ValueError, match="context of 32 tokens .*RoPE type 'linear'"):
        generate(linear, ids, max_new_tokens=23, compile=False)
    dynamic = Llama2ForCausalLM(
        tiny_config(max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0})
    )
    eager = generate(dynamic.eval(), ids, max_new_tokens=40, compile=False)
    assert eager.shape == (1, 50)  # NTK: any length
    # Its frequencies grow with the positions, which no fixed graph computes: its steps run eagerly, with no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(generate(dynamic, ids, max_new_tokens=40), eager)
