"""The trainers on a stock transformers Llama folder: they train this package's model and save a stock Llama, with
the input's `tokenizer.model`, that stock transformers loads to the same outputs."""

import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    TrainingArguments,
)

from modeling_llama2 import Llama2ForCausalLM, Llama2ForSequenceClassification
from modeling_llama2.alignment.reward import RewardArguments, run_reward_model
from modeling_llama2.alignment.sft import SFTArguments, run_sft
from modeling_llama2.alignment.training import ModelArguments
from tests.alignment_helpers import ALIGNMENT, TINY, make_tokenizer, qa_pairs, write_jsonl

SENTENCEPIECE_BYTES = b"a tokenizer.model stand-in: the trainers copy it byte for byte"


def save_stock_llama(path: Path) -> Path:
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**TINY, **ALIGNMENT, "vocab_size": len(tokenizer)})).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "tokenizer.model").write_bytes(SENTENCEPIECE_BYTES)
    return path


def training_args(output_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=2, per_device_train_batch_size=4, save_strategy="no", report_to="none",
        use_cpu=True, learning_rate=1e-3, remove_unused_columns=False,
    )  # fmt: skip


def assert_stock(folder: Path, architecture: str) -> None:
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llama", [architecture])
    assert "auto_map" not in config and not list(folder.glob("*.py"))
    assert (folder / "tokenizer.model").read_bytes() == SENTENCEPIECE_BYTES


def test_sft_then_reward_model_from_a_stock_llama_stay_stock(tmp_path, monkeypatch):
    base = save_stock_llama(tmp_path / "base")
    records = [{"prompt": q, "response": a} for q, a in qa_pairs(8)]
    trained = []
    for cls in (Llama2ForCausalLM, Llama2ForSequenceClassification):

        def spy(self, *args, _forward=cls.forward, **kwargs):
            trained.append(type(self))
            return _forward(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", spy)

    run_sft(
        ModelArguments(model=str(base)),
        SFTArguments(train_file=str(write_jsonl(tmp_path / "sft.jsonl", records)), max_length=64),
        training_args(tmp_path / "sft"),
    )
    assert Llama2ForCausalLM in trained  # this package's model (its loss, its checks) did the training
    assert_stock(tmp_path / "sft", "LlamaForCausalLM")
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "sft")) is LlamaForCausalLM

    pairs = [{"prompt": q, "chosen": a, "rejected": "the mat", "rating": "better"} for q, a in qa_pairs(8)]
    run_reward_model(
        ModelArguments(model=str(tmp_path / "sft")),
        RewardArguments(train_file=str(write_jsonl(tmp_path / "pairs.jsonl", pairs)), max_length=64),
        training_args(tmp_path / "rm"),
    )
    assert Llama2ForSequenceClassification in trained
    assert_stock(tmp_path / "rm", "LlamaForSequenceClassification")
    stock = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert type(stock) is LlamaForSequenceClassification
    ours = Llama2ForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    input_ids = torch.randint(3, 96, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids).logits, ours(input_ids).logits, atol=1e-5, rtol=0)
