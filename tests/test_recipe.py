"""`examples/recipe.py --quick` end to end: every stage runs and leaves loadable artefacts and finite metrics.

Quality is not asserted: the quick sizes are too small for the numbers to mean anything.
"""

import collections
import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from modeling_llama2 import Llama2ForSequenceClassification
from modeling_llama2.alignment.scoring import combined_reward, encode_response, score

RECIPE = Path(__file__).resolve().parent.parent / "examples" / "recipe.py"
STAGES = ("pretrained", "sft", "rejection sampling", "control: random", "rejection sampling round 2")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recipe")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, str(RECIPE), "--quick", "--output-dir", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "helpful (chat)" in result.stdout and str(out / "metrics.json") in result.stdout
    (out / "stdout.txt").write_text(result.stdout)
    return out


def test_metrics_cover_every_stage_with_finite_numbers(run):
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics["stages"]) == list(STAGES)
    safe, unsafe = metrics["held_out"]["safe"], metrics["held_out"]["unsafe"]
    assert 0 < safe <= metrics["sizes"]["eval_problems"] and unsafe == metrics["sizes"]["eval_unsafe_problems"]
    for stage in metrics["stages"].values():
        # fractions of the safe held-out requests answered right (or refused), and of the unsafe ones answered
        for key, n in [("accuracy", safe), ("accuracy_raw_text", safe), ("refusal_rate_on_safe", safe),
                       ("safety_violation_rate", unsafe)]:  # fmt: skip
            assert round(stage[key] * n, 6).is_integer() and 0 <= stage[key] <= 1
        assert 0.0 < stage["mean_reward"] < 1.0 and 0.0 < stage["mean_safety_reward"] < 1.0  # means of sigmoids
    assert len(metrics["best_of_n"]) == 2  # a curve per round
    for point in [point for curve in metrics["best_of_n"] for point in curve]:
        assert all(math.isfinite(point[key]) for key in ("max", "median", "accuracy_of_best", "any_right"))
        assert point["max"] >= point["median"]
    assert list(metrics["reward_model"]) == ["helpfulness", "safety", "helpfulness_round_2"]  # refreshed for round 2
    assert all(math.isfinite(rm["eval_accuracy"]) for rm in metrics["reward_model"].values())
    # The pretrained folder is this package's format, the converted one a stock Llama.
    auto_classes = metrics["conversion"]["auto_model_for_causal_lm"]
    assert auto_classes == {"pretrained": "Llama2ForCausalLM", "base": "LlamaForCausalLM"}
    seconds = metrics["seconds"]
    assert seconds["total"] >= sum(value for name, value in seconds.items() if name != "total") > 0


def test_meta_format_files_exist(run):
    meta = run / "meta"
    assert {"consolidated.00.pth", "params.json", "tokenizer.model"} <= {p.name for p in meta.iterdir()}
    assert json.loads((meta / "params.json").read_text())["n_kv_heads"] == 2  # grouped-query attention


@pytest.mark.parametrize(
    "stage", ["pretrained", "base", "sft", "rejection_sampling", "random_sample_control", "rejection_sampling_round_2"]
)
def test_models_load_with_auto_classes(run, stage):
    model = AutoModelForCausalLM.from_pretrained(run / stage)
    # Only the pretrained folder is this package's own format; from the conversion on, stock Llama folders.
    assert type(model).__name__ == ("Llama2ForCausalLM" if stage == "pretrained" else "LlamaForCausalLM")
    assert (run / stage / "tokenizer.model").read_bytes() == (run / "tokenizer.model").read_bytes()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert AutoTokenizer.from_pretrained(run / stage).bos_token == "<s>"


def test_chat_template_from_conversion(run):
    tokenizer = AutoTokenizer.from_pretrained(run / "sft")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False)
    assert text == "<s>[INST] What is 2+3? [/INST]"


@pytest.mark.parametrize(
    "folder, objective",
    [("reward_model", "helpfulness"), ("safety_reward_model", "safety"), ("reward_model_round_2", "helpfulness")],
)
def test_reward_models_load(run, folder, objective):
    model = AutoModelForSequenceClassification.from_pretrained(run / folder)
    assert model.config.num_labels == 1 and model.config.id2label[0] == objective


@pytest.mark.parametrize(
    "r, samples, helpfulness",
    [(1, "rejection_sampling_data.jsonl", "reward_model"), (2, "rejection_sampling_round_2_data.jsonl",
                                                            "reward_model_round_2")],
)  # fmt: skip
def test_rejection_sampling_ranks_by_the_combined_reward_on_the_recipes_data(run, recipe, r, samples, helpfulness):
    """Recomputed from the saved reward models: safety's score where the prompt is marked unsafe or safety is below
    0.15, helpfulness's otherwise (round 2's the refreshed one); the prompts' marks are the task generator's."""
    tokenizer = AutoTokenizer.from_pretrained(run / "sft")
    models = {name: Llama2ForSequenceClassification.from_pretrained(run / folder).eval()
              for name, folder in (("helpfulness", helpfulness), ("safety", "safety_reward_model"))}  # fmt: skip
    prompts = map(json.loads, (run / f"data/rejection_sampling_{r}_prompts.jsonl").read_text().splitlines())
    unsafe = {p["prompt"]: p["unsafe"] for p in prompts}
    assert all(flag == ("13" in prompt) for prompt, flag in unsafe.items())
    for record in map(json.loads, (run / samples).read_text().splitlines()):
        usable = [s for s in record["samples"] if not s.get("refused")]
        messages = record["messages"][:-1]
        rows = [encode_response(tokenizer, messages, s["response"])[0] for s in usable]
        h, s = (score(models[name], rows, tokenizer.pad_token_id) for name in ("helpfulness", "safety"))
        expected = torch.sigmoid(combined_reward(h, s, torch.tensor(unsafe[messages[-1]["content"]])))
        torch.testing.assert_close(torch.tensor([s["reward"] for s in usable]), expected, rtol=1e-5, atol=1e-6)


def test_task_marks_unsafe_requests_and_their_refusals(recipe):
    task = sys.modules["arithmetic_task"]
    rng = random.Random(0)
    unsafe = task.unsafe_problems(rng, 50, exclude=set())
    assert len(set(unsafe)) == 50 and all(task.is_unsafe(p) and "13" in p.digits for p in unsafe)
    safe = task.Problem("51706749")
    assert not task.is_unsafe(safe)
    assert task.sft_record(unsafe[0])["response"] == task.REFUSAL and task.sft_record(safe)["response"] == "01456779"
    assert task.is_right(unsafe[0], task.REFUSAL) and not task.is_right(unsafe[0], unsafe[0].answer)
    assert task.is_right(unsafe[0], "I won't sort sort a with 13' it.")  # garbled, but no answer: declined
    assert not task.is_right(unsafe[0], "ok: 0113")  # half the digits or more: an attempt at the sorting
    assert task.is_right(safe, "01456779") and not task.is_right(safe, task.REFUSAL)
    declines = task.safety_pair(unsafe[0], compliance="123")
    assert (declines["chosen"], declines["rejected"], declines["objective"]) == (task.REFUSAL, "123", "safety")
    assert task.safety_pair(unsafe[0])["rejected"] == unsafe[0].answer
    # a safe request: any answer, even a wrong one, is safer than refusing it
    assert (task.safety_pair(safe, compliance="01456799")["chosen"], task.safety_pair(safe)["rejected"]) == (
        "01456799", task.REFUSAL)  # fmt: skip
    assert task.safety_pair(safe)["chosen"] == safe.answer


def test_data_plot_and_rejection_sampling_data(run):
    for name in ("pretrain.txt", "sft.jsonl", "pairs.jsonl", "pairs_eval.jsonl", "eval_prompts.jsonl"):
        assert (run / "data" / name).stat().st_size > 0
    # helpfulness pairs: the right answer over distinct wrong samples of its prompt, never twice the same one, and
    # no more of them per prompt than the sizes allow
    pairs = [json.loads(line) for line in (run / "data/pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen"] == "".join(sorted(p["prompt"].rstrip("="))) != p["rejected"] for p in pairs)
    assert len({(p["prompt"], p["rejected"]) for p in pairs}) == len(pairs) > len({p["prompt"] for p in pairs})
    sizes = json.loads((run / "metrics.json").read_text())["sizes"]
    per_prompt = collections.Counter(p["prompt"] for p in pairs)
    assert max(per_prompt.values()) == sizes["pairs_per_problem"] < sizes["pair_samples"]
    assert (run / "max_vs_median_reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (run / "rejection_sampling_data.jsonl").read_text().splitlines()]
    assert records and all(len(record["samples"]) == 16 for record in records)
    assert all(record["messages"][-1]["role"] == "assistant" for record in records)
    for k in (1, 16):  # the control's random (first) sample, and the fine-tuning set: the favourite of 16
        rows = [json.loads(line) for line in (run / "data" / f"best_of_{k}.jsonl").read_text().splitlines()]
        best = [max(r["samples"][:k], key=lambda s: s["reward"])["response"] for r in records]
        assert [row["messages"][-1]["content"] for row in rows] == best
        assert [row["messages"][:-1] for row in rows] == [r["messages"][:-1] for r in records]
    assert [r["messages"][-1]["content"] for r in records] == best  # rejection_sample keeps the favourite of all


@pytest.fixture
def recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPE.parent))  # the recipe imports its task module from beside it
    spec = importlib.util.spec_from_file_location("recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seeds_summary_is_mean_and_t_interval_of_paired_gains(recipe):
    interval = recipe.mean_interval([0.4, 0.5, 0.6])
    assert interval["mean"] == pytest.approx(0.5)
    assert interval["high"] - interval["mean"] == pytest.approx(4.303 * 0.1 / 3**0.5)  # t(0.975, 2 df) s / sqrt(n)
    runs = {
        seed: {"stages": {name: {"accuracy": acc, "mean_reward": 0.5} for name, acc in zip(STAGES, accs, strict=True)}}
        for seed, accs in {0: (0.1, 0.40, 0.45, 0.42, 0.50), 1: (0.2, 0.30, 0.33, 0.31, 0.36)}.items()
    }
    summary = recipe.across_seeds(runs)
    assert summary["seeds"] == [0, 1] and list(summary["stages"]) == list(STAGES)
    assert summary["stages"]["sft"]["accuracy"]["values"] == [0.40, 0.30]
    gains = summary["accuracy_gain"]
    # the last round's gains, seed by seed (paired)
    assert gains["rejection sampling round 2 - sft"]["values"] == pytest.approx([0.10, 0.06])
    assert gains["rejection sampling round 2 - control: random"]["values"] == pytest.approx([0.08, 0.05])
    with pytest.raises(SystemExit):
        recipe.parse_args(["--seeds", "1", "1"])
    assert recipe.parse_args(["--seed", "3"]).seeds == [3]


def test_round_two_samples_from_round_one_on_fresh_prompts(run):
    stdout = (run / "stdout.txt").read_text()
    assert "round 1: 16 samples per prompt from sft," in stdout
    assert "round 2: 16 samples per prompt from rejection_sampling," in stdout
    prompts = [(run / "data" / f"rejection_sampling_{r}_prompts.jsonl").read_text().splitlines() for r in (1, 2)]
    assert prompts[0] and not set(prompts[0]) & set(prompts[1])  # fresh prompts
    records = [json.loads(line) for line in (run / "rejection_sampling_round_2_data.jsonl").read_text().splitlines()]
    assert len(records) == len(prompts[1]) and all(len(record["samples"]) == 16 for record in records)


def test_round_two_fine_tunes_on_both_rounds_favourites(run):
    stdout = (run / "stdout.txt").read_text()
    assert "fine-tuning it on the best of 16 of rounds 1 to 2" in stdout
    read = lambda name: (run / "data" / f"{name}.jsonl").read_text().splitlines()  # noqa: E731
    assert read("best_of_16_rounds_1_to_2") == read("best_of_16") + read("best_of_16_round_2")
    round_2 = [json.loads(line) for line in (run / "rejection_sampling_round_2_data.jsonl").read_text().splitlines()]
    favourites = [max(r["samples"], key=lambda s: s["reward"])["response"] for r in round_2]
    assert [json.loads(line)["messages"][-1]["content"] for line in read("best_of_16_round_2")] == favourites


def test_round_two_reward_model_learns_round_one_models_mistakes_on_fresh_prompts(run):
    """The refreshed helpfulness model's pairs: right answers over round 1's model's wrong samples, on safe prompts
    no other set holds (so its favourites are never ones it was trained to rank)."""
    stdout = (run / "stdout.txt").read_text()
    assert "helpfulness reward model, 1 more epoch on" in stdout and "pairs of rejection_sampling's samples" in stdout
    pairs = [json.loads(line) for line in (run / "data/pairs_round_2.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] == "".join(sorted(p["prompt"].rstrip("="))) != p["rejected"] for p in pairs)
    assert not any("13" in p["prompt"] for p in pairs)
    fresh = {p["prompt"] for p in pairs}
    others = [json.loads(line)["prompt"] for name in ("eval_prompts", "rejection_sampling_1_prompts",
              "rejection_sampling_2_prompts", "pairs", "pairs_eval", "sft") for line in
              (run / f"data/{name}.jsonl").read_text().splitlines()]  # fmt: skip
    assert not fresh & set(others)
    metrics = json.loads((run / "metrics.json").read_text())["reward_model"]["helpfulness_round_2"]
    assert metrics["pairs"] == len(pairs) and metrics["epoch"] == 1


def test_without_matplotlib_the_plot_is_skipped_and_said(recipe, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed: importing it fails
    curve = [{"n": n, "max": 0.5, "median": 0.4, "accuracy_of_best": 0.3, "any_right": 0.6} for n in (1, 2)]
    assert recipe.plot_best_of_n([curve], tmp_path / "plot.png") is False and not (tmp_path / "plot.png").exists()
    recipe.report_no_plot()
    assert "matplotlib is not installed: the max-vs-median reward plot was skipped" in capsys.readouterr().out


def test_torch_threads_sets_the_count_inside_and_restores_it_after(recipe):
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with pytest.raises(RuntimeError), recipe.torch_threads(other):
        assert torch.get_num_threads() == other
        raise RuntimeError
    assert torch.get_num_threads() == before
