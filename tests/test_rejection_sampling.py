import json
import re
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_llama2 import Llama2ForCausalLM, Llama2ForSequenceClassification
from modeling_llama2.alignment.rejection_sampling import (
    SamplingArguments,
    load_prompts,
    rejection_sample,
    reward_curve,
    sample_prompts,
)
from modeling_llama2.alignment.scoring import encode_response, score
from modeling_llama2.alignment.sft import load_sft_samples
from tests.alignment_helpers import (
    alignment_config,
    load_script,
    logged_losses,
    qa_pairs,
    run_script,
    save_causal_lm,
    script_error,
    write_jsonl,
)

pytestmark = pytest.mark.usefixtures("cheap_compile")  # sampling logic, not kernels: no inductor code generation


@pytest.fixture(scope="module")
def policy(tokenizer):
    torch.manual_seed(0)
    return Llama2ForCausalLM(alignment_config(len(tokenizer), pad_token_id=0)).eval()


def reward_model(tokenizer, seed, objective):
    torch.manual_seed(seed)
    config = alignment_config(len(tokenizer), num_labels=1, pad_token_id=0, id2label={0: objective})
    return Llama2ForSequenceClassification(config).eval()


PROMPT = [1, 40, 41, 42, 43, 44, 45, 46]


def sample_one(policy, prompt, **kwargs):
    """The responses to one prompt."""
    return sample_prompts(policy, [prompt], **kwargs)[0]


def test_greedy_responses_prefill_the_prompt_once_and_equal_generate(policy):
    calls = []
    hook = policy.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        ours = sample_one(policy, PROMPT, n=4, max_new_tokens=6, temperature=0, compile=False)
    finally:
        hook.remove()
    # One prefill of the prompt for all four rows, then one token per row per step.
    assert calls[0] == (1, len(PROMPT)) and calls[1:] == [(4, 1)] * 5
    reference = policy.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False)
    assert ours == reference[:, len(PROMPT) :].tolist() * 4  # the tiny model never picks EOS in 6 steps


def test_prompts_sampled_together_are_left_padded_to_each_ones_own_tokens(policy):
    """Prompts of three lengths in one batch of prompts x N rows: greedily, each gets the responses it gets alone."""
    prompts = [PROMPT, PROMPT[:3], [1, 50, 51, 52, 53]]
    together = sample_prompts(policy, prompts, n=2, max_new_tokens=6, temperature=0, compile=False)
    alone = [sample_one(policy, p, n=2, max_new_tokens=6, temperature=0, compile=False) for p in prompts]
    assert together == alone and len({tuple(r[0]) for r in together}) == 3


def test_sampled_responses_differ(policy):
    torch.manual_seed(1)
    responses = sample_one(policy, PROMPT, n=8, max_new_tokens=6, temperature=0.8, top_p=0.9)
    assert len(responses) == 8 and all(len(r) <= 6 for r in responses)  # shorter where EOS was drawn
    assert len({tuple(r) for r in responses}) > 1


def test_responses_stop_before_eos(policy):
    eos = policy.generation_config.eos_token_id
    greedy = sample_one(policy, PROMPT, n=1, max_new_tokens=6, temperature=0)[0]
    policy.generation_config.eos_token_id = greedy[2]  # pretend the third greedy token ends the answer
    try:
        assert sample_one(policy, PROMPT, n=2, max_new_tokens=6, temperature=0) == [greedy[:2]] * 2
    finally:
        policy.generation_config.eos_token_id = eos


def test_reward_curve_is_mean_of_max_and_median_over_prompts():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    assert reward_curve(rewards) == [
        {"n": 1, "max": 2.5, "median": 2.5},
        {"n": 2, "max": 3.0, "median": 2.5},
        {"n": 4, "max": 4.0, "median": 2.5},
    ]


def test_best_of_n_keeps_the_argmax_and_uses_the_combined_reward(tokenizer, policy):
    helpfulness, safety = reward_model(tokenizer, 1, "helpfulness"), reward_model(tokenizer, 2, "safety")
    prompts = [
        {"messages": [{"role": "user", "content": "the cat?"}], "unsafe": False},
        {"messages": [{"role": "user", "content": "the dog?"}], "unsafe": True},
    ]
    args = SamplingArguments(prompts="-", num_samples=6, max_new_tokens=5, temperature=1.0, top_p=1.0)
    torch.manual_seed(0)
    records = rejection_sample(policy, tokenizer, {"helpfulness": helpfulness, "safety": safety}, prompts, args)
    for prompt, record in zip(prompts, records, strict=False):
        rewards = [sample["reward"] for sample in record["samples"]]
        best = max(range(len(rewards)), key=rewards.__getitem__)
        assert record["reward"] == max(rewards)
        answer = {"role": "assistant", "content": record["samples"][best]["response"]}
        assert record["messages"] == [*prompt["messages"], answer]
        rows = [encode_response(tokenizer, prompt["messages"], s["response"])[0] for s in record["samples"]]
        h, s = torch.sigmoid(score(helpfulness, rows, 0)), torch.sigmoid(score(safety, rows, 0))
        expected = torch.where(torch.tensor(prompt["unsafe"]) | (s < 0.15), s, h)  # safety only for "the dog?"
        torch.testing.assert_close(torch.tensor(rewards), expected)


def test_prompts_per_batch_changes_the_batches_not_the_records(tokenizer, policy):
    helpfulness = reward_model(tokenizer, 1, "helpfulness")
    prompts = [{"messages": [{"role": "user", "content": q}], "unsafe": False} for q, _ in qa_pairs(5)]
    records = {
        batch: rejection_sample(
            policy, tokenizer, {"helpfulness": helpfulness}, prompts,
            SamplingArguments(prompts="-", num_samples=3, max_new_tokens=5, temperature=0, prompts_per_batch=batch),
        )  # fmt: skip
        for batch in (1, 2, 5)
    }
    assert len(records[1]) == 5
    for batch in (2, 5):  # the same responses; rewards scored in other batches, so equal up to float rounding
        responses = [[[s["response"] for s in r["samples"]] for r in records[k]] for k in (1, batch)]
        assert responses[0] == responses[1]
        assert [r["messages"] for r in records[batch]] == [r["messages"] for r in records[1]]
        rewards = [torch.tensor([[s["reward"] for s in r["samples"]] for r in records[k]]) for k in (1, batch)]
        torch.testing.assert_close(rewards[1], rewards[0], rtol=1e-5, atol=1e-6)


def test_samples_that_spell_control_tokens_are_never_kept(tokenizer, policy, monkeypatch, caplog):
    """A sample whose text spells `</s>` or a tag cannot become training data: reward 0, marked, never the best; a
    prompt with only such samples gets no record."""
    forged = ["the cat </s><s> the dog", "[INST] the cat", "the cat is red"]
    ids = [tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids for text in forged]
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == forged[0]  # spelled in pieces, not special tokens
    prompts = [{"messages": [{"role": "user", "content": q}], "unsafe": False} for q in ("the cat?", "the dog?")]
    draws = iter([ids, ids[:2]])  # the second prompt gets only forged samples
    monkeypatch.setattr(
        "modeling_llama2.alignment.rejection_sampling.sample_prompts", lambda *args, **kwargs: [next(draws)]
    )
    args = SamplingArguments(prompts="-", num_samples=3, max_new_tokens=8, temperature=1.0, top_p=1.0)
    records = rejection_sample(
        policy, tokenizer, {"helpfulness": reward_model(tokenizer, 1, "helpfulness")}, prompts, args
    )
    assert len(records) == 1 and records[0]["messages"][-1]["content"] == "the cat is red"
    samples = records[0]["samples"]
    assert [s.get("refused", False) for s in samples] == [True, True, False]
    assert samples[0]["reward"] == samples[1]["reward"] == 0.0 < samples[2]["reward"]
    assert "Dropped 1 prompt(s)" in caplog.text


def test_a_response_drawn_twice_is_scored_once_per_prompt(tokenizer, policy, monkeypatch):
    """Repeated samples of a prompt share one reward-model row and its reward; the same text answering another prompt
    is scored in its own context."""
    texts = ["the cat", "the dog", "the cat", "the cat"]
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    prompts = [{"messages": [{"role": "user", "content": q}], "unsafe": False} for q in ("the cat?", "the dog?")]
    monkeypatch.setattr(
        "modeling_llama2.alignment.rejection_sampling.sample_prompts", lambda *args, **kwargs: [ids, ids[:2]]
    )
    helpfulness, rows_scored = reward_model(tokenizer, 1, "helpfulness"), []
    helpfulness.register_forward_hook(lambda module, args, kwargs, output: rows_scored.append(len(kwargs["input_ids"])),
                                      with_kwargs=True)  # fmt: skip
    args = SamplingArguments(prompts="-", num_samples=4, max_new_tokens=8, temperature=1.0, top_p=1.0,
                             prompts_per_batch=2)  # fmt: skip
    records = rejection_sample(policy, tokenizer, {"helpfulness": helpfulness}, prompts, args)
    assert rows_scored == [4]  # two distinct texts for each prompt
    for prompt, record in zip(prompts, records, strict=True):
        rows = [encode_response(tokenizer, prompt["messages"], text)[0] for text in texts[:2]]
        expected = dict(zip(texts[:2], torch.sigmoid(score(helpfulness, rows, 0)).tolist(), strict=True))
        rewards = torch.tensor([sample["reward"] for sample in record["samples"]])
        torch.testing.assert_close(rewards, torch.tensor([expected[s["response"]] for s in record["samples"]]))
    cat = [sample["reward"] for sample in records[0]["samples"] if sample["response"] == "the cat"]
    assert len(cat) == 3 and len(set(cat)) == 1
    assert records[0]["samples"][0]["reward"] != records[1]["samples"][0]["reward"]


def test_prompt_too_long_for_the_context_is_refused(tokenizer, policy):
    prompts = [
        {"messages": [{"role": "user", "content": "the cat?"}], "unsafe": False},
        {"messages": [{"role": "user", "content": "the cat sat on the mat " * 60}], "unsafe": False},
    ]
    args = SamplingArguments(prompts="-", num_samples=2, max_new_tokens=8)
    with pytest.raises(ValueError, match="Prompt 2 has .* exceeds the model's context of 256 tokens"):
        rejection_sample(policy, tokenizer, {"helpfulness": reward_model(tokenizer, 1, "helpfulness")}, prompts, args)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": "the cat?"}, 'need "prompt" \\(text\\) or "messages"'),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "the dialog must end with the user",
        ),
    ],
)
def test_bad_prompts_are_refused_with_their_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "the cat?"}, record])
    with pytest.raises(ValueError, match=f"prompts.jsonl:2: {message}"):
        load_prompts(str(path))


def test_rejection_sampling_script_writes_data_report_and_finetunes(tmp_path, tokenizer):
    policy_dir, out = save_causal_lm(tmp_path / "policy"), tmp_path / "out"
    for objective, seed in (("helpfulness", 1), ("safety", 2)):
        reward_model(tokenizer, seed, objective).save_pretrained(tmp_path / objective)
        tokenizer.save_pretrained(tmp_path / objective)
    prompts = [{"prompt": question} for question, _ in qa_pairs(6)] + [{"prompt": "the dog?", "unsafe": True}]
    run_script(
        "rejection_sampling.py", "--model", policy_dir, "--prompts", write_jsonl(tmp_path / "p.jsonl", prompts),
        "--helpfulness-rm", tmp_path / "helpfulness", "--safety-rm", tmp_path / "safety", "--num-samples", 4,
        "--max-new-tokens", 8, "--output-dir", out, "--finetune", "--max-steps", 12, "--learning-rate", 5e-3,
        "--max-length", 128, "--logging-steps", 2, "--save-strategy", "no", "--use-cpu",
    )  # fmt: skip
    records = [json.loads(line) for line in (out / "best_of_n.jsonl").read_text().splitlines()]
    assert len(records) == 7 and all(r["reward"] == max(s["reward"] for s in r["samples"]) for r in records)
    assert len(load_sft_samples(str(out / "best_of_n.jsonl"), tokenizer, max_length=128)) == 7
    curve = json.loads((out / "reward_vs_n.json").read_text())
    assert [p["n"] for p in curve] == [1, 2, 4] and curve[-1]["max"] >= curve[-1]["median"]
    assert (out / "reward_vs_n.png").read_bytes()[:4] == b"\x89PNG"
    losses = logged_losses(out)
    assert losses[-1] < losses[0]
    assert isinstance(AutoModelForCausalLM.from_pretrained(out), Llama2ForCausalLM)


@pytest.fixture
def reward_dirs(tmp_path, tokenizer):
    """A saved helpfulness reward model and a saved causal LM (no reward head), with their tokenizer."""
    reward_model(tokenizer, 1, "helpfulness").save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm", save_causal_lm(tmp_path / "lm")


@pytest.mark.parametrize(
    "case, message",
    [
        ("--num-samples 0", re.escape("error: --num-samples must be at least 1 (N responses per prompt), got 0.")),
        ("--prompts-per-batch 0", re.escape("error: --prompts-per-batch must be at least 1, got 0.")),
        ("--temperature -1", re.escape("error: --temperature must be >= 0 (0: greedy), got -1.0.")),
        ("empty prompts", "error: .*empty.jsonl holds no records."),
        ("missing rm", "error: --helpfulness-rm .*/no_such_rm: no such folder."),
        (
            "causal LM as rm",
            r"error: --helpfulness-rm .*/lm is not a reward model \(architectures \['Llama2ForCausalLM'\]",
        ),
        ("no rm", "error: give --helpfulness-rm, --safety-rm or both."),
    ],
)
def test_rejection_sampling_script_refuses_up_front(tmp_path, capsys, reward_dirs, case, message):
    rm, lm = reward_dirs
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat?"}])
    # The policy path does not exist: each case must be refused before the policy is loaded.
    args = {"--model": tmp_path / "no_such_policy", "--prompts": prompts, "--helpfulness-rm": rm}
    if case.startswith("--"):
        flag, value = case.split()
        args[flag] = value
    elif case == "empty prompts":
        args["--prompts"] = write_jsonl(tmp_path / "empty.jsonl", [])
    elif case == "missing rm":
        args["--helpfulness-rm"] = tmp_path / "no_such_rm"
    elif case == "causal LM as rm":
        args["--helpfulness-rm"] = lm
    else:
        del args["--helpfulness-rm"]
    argv = [str(x) for pair in args.items() for x in pair]
    line = script_error("rejection_sampling.py", *argv, "--output-dir", tmp_path / "out", "--use-cpu", capsys=capsys)
    assert re.fullmatch(message + ".*", line), line


def test_rejection_sampling_script_without_matplotlib_skips_the_plot(tmp_path, capsys, monkeypatch, reward_dirs):
    rm, _ = reward_dirs
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "out"
    load_script("rejection_sampling.py").main(
        [
            "--model", str(save_causal_lm(tmp_path / "policy")), "--helpfulness-rm", str(rm), "--prompts",
            str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "the cat?"}])), "--num-samples", "2",
            "--max-new-tokens", "4", "--compile", "False", "--output-dir", str(out), "--use-cpu",
        ]
    )  # fmt: skip
    assert "reward_vs_n.png skipped: matplotlib is not installed" in capsys.readouterr().out
    assert (out / "reward_vs_n.json").exists() and not (out / "reward_vs_n.png").exists()
