import json
import logging
import math
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, EvalPrediction

from modeling_llama2 import Llama2ForSequenceClassification
from modeling_llama2.alignment.reward import (
    MARGINS,
    RATINGS,
    PairCollator,
    RewardArguments,
    load_pairs,
    ranking_loss,
    ranking_metrics,
)
from modeling_llama2.alignment.scoring import combined_reward, score
from modeling_llama2.alignment.training import InputError
from tests.alignment_helpers import (
    WORDS,
    alignment_config,
    logged_losses,
    make_tokenizer,
    qa_pairs,
    run_script,
    save_causal_lm,
    script_error,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def preference_records(n, seed=0):
    """Pairs where the right answer is preferred to off-topic words, with ratings spread over the four levels."""
    rng = random.Random(seed)
    records = []
    for i, (question, answer) in enumerate(qa_pairs(n, seed)):
        wrong = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        records.append({"prompt": question, "chosen": answer, "rejected": wrong, "rating": RATINGS[i % 4]})
    return records


def test_ranking_loss_matches_the_formula():
    chosen, rejected, margin = [0.3, -1.2, 2.0], [0.5, -2.0, -1.0], [1.0, 2 / 3, 0.0]
    triples = zip(chosen, rejected, margin, strict=True)
    expected = sum(-math.log(1 / (1 + math.exp(-(c - r - m)))) for c, r, m in triples) / 3
    loss = ranking_loss(torch.tensor(chosen), torch.tensor(rejected), torch.tensor(margin))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert ranking_loss(torch.tensor(chosen), torch.tensor(rejected)).item() == pytest.approx(
        sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen, rejected, strict=False)) / 3, rel=1e-6
    )


@pytest.mark.parametrize("table", ["small", "large", "none"])
def test_pairs_carry_the_paper_margin_of_their_rating(tmp_path, tokenizer, table):
    path = write_jsonl(tmp_path / "pairs.jsonl", preference_records(4))
    pairs = load_pairs(str(path), tokenizer, RewardArguments(train_file=str(path), margin=table, max_length=128))
    paper = {"small": [1, 2 / 3, 1 / 3, 0], "large": [3, 2, 1, 0], "none": [0, 0, 0, 0]}[table]
    assert [p["margin"] for p in pairs] == pytest.approx(paper)
    assert MARGINS[table] == pytest.approx(paper)


def test_combined_reward_branches():
    def logit(p):
        return math.log(p / (1 - p))

    helpfulness = torch.tensor([1.0, 1.0, 1.0, 1.0])
    safety = torch.tensor([logit(0.9), logit(0.1), logit(0.5), logit(0.16)])
    unsafe = torch.tensor([True, False, False, False])
    got = combined_reward(helpfulness, safety, unsafe)
    # unsafe prompt -> safety; safety below 0.15 -> safety; otherwise helpfulness
    assert got.tolist() == pytest.approx([safety[0].item(), safety[1].item(), 1.0, 1.0])


def test_pair_collator_and_reward_head_ignore_padding(tokenizer):
    torch.manual_seed(0)
    model = Llama2ForSequenceClassification(alignment_config(len(tokenizer), num_labels=1, pad_token_id=0)).eval()
    rows = [[1, 5, 6, 7, 2], [1, 8, 2]]
    batch = PairCollator(pad_id=0)([{"chosen": rows[0], "rejected": rows[1], "margin": 1.0, "rating": 0}])
    assert batch["input_ids"].tolist() == [rows[0], [1, 8, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    alone = torch.cat([score(model, [row], pad_id=0) for row in rows])
    torch.testing.assert_close(score(model, rows, pad_id=0), alone, rtol=0, atol=1e-5)


def test_ranking_metrics_overall_and_per_rating():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 1.5], [3.0, 0.0]])
    ratings = torch.tensor([0, 0, 1, 3, 3])
    metrics = ranking_metrics(EvalPrediction(predictions=rewards.numpy(), label_ids=ratings.numpy()))
    assert metrics == pytest.approx(
        {"accuracy": 3 / 5, "accuracy_significantly_better": 1 / 2, "accuracy_better": 1.0,
         "accuracy_negligibly_better": 1 / 2}
    )  # fmt: skip


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, 'need a "rating"'),
        ({"prompt": "a", "chosen": "b", "rejected": "c", "rating": "much better"}, "unknown rating 'much better'"),
        ({"prompt": "cat " * 80, "chosen": "b", "rejected": "c", "rating": "better"}, "prompt alone fills"),
    ],
)
def test_bad_comparisons_are_refused_with_their_line(tmp_path, tokenizer, record, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [*preference_records(1), record])
    with pytest.raises(InputError, match=f"pairs.jsonl:2: .*{message}"):
        load_pairs(str(path), tokenizer, RewardArguments(train_file=str(path), max_length=64))


def test_objective_selects_its_records(tmp_path, tokenizer):
    records = preference_records(3)
    records[0]["objective"], records[1]["objective"] = "safety", "helpfulness"
    path = str(write_jsonl(tmp_path / "pairs.jsonl", records))
    for objective, expected in (("safety", [0, 2]), ("helpfulness", [1, 2])):
        pairs = load_pairs(path, tokenizer, RewardArguments(train_file=path, objective=objective, max_length=128))
        assert [p["rating"] for p in pairs] == expected  # ratings are the record index here


@pytest.mark.parametrize("lora", [False, True])
def test_reward_script_trains_and_saves_a_loadable_model(tmp_path, tokenizer, lora):
    model_dir, out = save_causal_lm(tmp_path / "sft"), tmp_path / "out"
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_records(64))
    run_script(
        "reward_model.py", "--model", model_dir, "--train-file", data, "--eval-file", data, "--output-dir", out,
        "--objective", "safety", "--max-steps", 30, "--learning-rate", 1e-2, "--warmup-steps", 3,
        "--per-device-train-batch-size", 16, "--max-length", 128, "--logging-steps", 5, "--save-strategy", "no",
        "--eval-strategy", "steps", "--eval-steps", 30, "--eval-on-start", "--use-cpu", *(["--lora"] if lora else []),
    )  # fmt: skip
    losses, eval_losses = logged_losses(out), logged_losses(out, "eval_loss")
    assert losses[-1] < losses[0] - 0.2 and eval_losses[-1] < eval_losses[0] - 0.2
    metrics = json.loads((out / "metrics.json").read_text())
    assert {
        f"eval_accuracy_{r}" for r in ("significantly_better", "better", "slightly_better", "negligibly_better")
    } < set(metrics)

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert isinstance(model, Llama2ForSequenceClassification)
    assert model.config.num_labels == 1 and model.config.id2label == {0: "safety"}
    # The saved model (LoRA merged into it, score head included) is the one that was evaluated.
    pairs = load_pairs(str(data), tokenizer, RewardArguments(train_file=str(data), objective="safety", max_length=128))
    chosen = score(model.eval(), [p["chosen"] for p in pairs], pad_id=tokenizer.unk_token_id)
    rejected = score(model, [p["rejected"] for p in pairs], pad_id=tokenizer.unk_token_id)
    assert (chosen > rejected).float().mean().item() == pytest.approx(metrics["eval_accuracy"])


def test_an_unknown_objective_tag_is_refused_with_its_line(tmp_path, tokenizer):
    records = preference_records(2)
    records[1]["objective"] = "helpful"
    path = str(write_jsonl(tmp_path / "pairs.jsonl", records))
    with pytest.raises(
        InputError, match=r"pairs.jsonl:2: unknown objective 'helpful'; use one of \['helpfulness', 'safety'\]"
    ):
        load_pairs(path, tokenizer, RewardArguments(train_file=path, max_length=128))


def test_identical_chosen_and_rejected_are_skipped_with_a_warning_and_their_count(tmp_path, tokenizer, caplog):
    records = preference_records(4)
    for record in records[1:3]:
        record["rejected"] = record["chosen"]
    path = str(write_jsonl(tmp_path / "pairs.jsonl", records))
    with caplog.at_level(logging.WARNING, logger="modeling_llama2.alignment.reward"):
        pairs = load_pairs(path, tokenizer, RewardArguments(train_file=path, max_length=128))
    assert [p["rating"] for p in pairs] == [0, 3]
    assert "skipped 2 helpfulness comparison(s) whose chosen and rejected responses are the same text" in caplog.text


def test_reward_script_reports_a_data_error_in_one_line(tmp_path, capsys):
    records = preference_records(2)
    records[1]["chosen"] = "the cat " * 200
    line = script_error(
        "reward_model.py", "--model", save_causal_lm(tmp_path / "sft"), "--train-file",
        write_jsonl(tmp_path / "pairs.jsonl", records), "--output-dir", tmp_path / "out", "--max-length", 1024,
        "--use-cpu", capsys=capsys,
    )  # fmt: skip
    assert "pairs.jsonl:2: " in line and "tokens, longer than the model's context of 256 tokens" in line
    assert "pass --max-length 256" in line


def test_a_margin_column_is_used_as_given_and_a_rating_is_optional(tmp_path, tokenizer):
    records = preference_records(3)
    del records[0]["rating"]
    records[0]["margin"] = 0.25  # TRL's form: margin, no rating
    records[1]["margin"] = 5  # both: the margin as given, the rating for per-rating accuracy
    path = str(write_jsonl(tmp_path / "pairs.jsonl", records))
    pairs = load_pairs(path, tokenizer, RewardArguments(train_file=path, margin="large", max_length=128))
    assert [(p["rating"], p["margin"]) for p in pairs] == [(-1, 0.25), (1, 5.0), (2, 1.0)]


def test_conversational_chosen_and_rejected_continue_the_prompt(tmp_path, tokenizer):
    record = preference_records(1)[0]
    as_text = load_pairs(str(write_jsonl(tmp_path / "a.jsonl", [record])), tokenizer, RewardArguments("-"))
    conversational = {
        "prompt": [{"role": "user", "content": record["prompt"]}],
        "chosen": [{"role": "assistant", "content": record["chosen"]}],
        "rejected": [{"role": "assistant", "content": record["rejected"]}],
        "rating": record["rating"],
    }
    path = str(write_jsonl(tmp_path / "b.jsonl", [conversational]))
    assert list(load_pairs(path, tokenizer, RewardArguments(train_file=path))) == list(as_text)


@pytest.mark.parametrize(
    "fields, message",
    [({"margin": "big"}, "\"margin\" must be a finite number, got 'big'"), ({}, 'need a "rating" .* or a numeric')],
)
def test_a_bad_or_missing_margin_is_refused_with_its_line(tmp_path, tokenizer, fields, message):
    record = {**preference_records(1)[0], **fields}
    del record["rating"]
    path = str(write_jsonl(tmp_path / "pairs.jsonl", [record]))
    with pytest.raises(InputError, match=f"pairs.jsonl:1: {message}"):
        load_pairs(path, tokenizer, RewardArguments(train_file=path))
