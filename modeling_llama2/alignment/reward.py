"""Llama 2-Chat's reward models: binary ranking loss with a rating-dependent margin and per-rating accuracy.

    llama2-reward-model --model out/sft --train-file pairs.jsonl --output-dir out/rm_helpfulness
    accelerate launch -m modeling_llama2.alignment.reward ...  (or torchrun ... -m modeling_llama2.alignment.reward ...)
"""

import contextlib
import functools
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, get_args

import pyarrow.compute as pc
import torch
import torch.nn.functional as F
import transformers
from datasets import Features, IterableDataset, List, Value
from transformers import (
    EvalPrediction,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from ..modeling_llama2 import Llama2ForSequenceClassification
from .data import Data, DataArguments, Source, load_records, prepare, tokenize
from .scoring import encode_response, pad_right, prompt_messages
from .sft import check_streaming
from .training import (
    InputError,
    ModelArguments,
    check_fits_context,
    check_launch,
    cli,
    load_tokenizer,
    model_context,
    parse_args,
    train,
    truncate,
)

logger = logging.getLogger(__name__)

RATINGS = ("significantly better", "better", "slightly better", "negligibly better / unsure")
# Table 27 of the Llama 2 paper: margin m(rating) per rating, in the order of RATINGS.
MARGINS = {"small": (1.0, 2 / 3, 1 / 3, 0.0), "large": (3.0, 2.0, 1.0, 0.0), "none": (0.0, 0.0, 0.0, 0.0)}
Objective = Literal["helpfulness", "safety"]
OBJECTIVES = get_args(Objective)  # the paper's two reward models


@dataclass
class RewardArguments(DataArguments):
    """Comparison data (`prompt`, `chosen`, `rejected`, with `rating` and/or `margin`) and the reward model's loss."""

    objective: Objective = field(
        default="helpfulness",
        metadata={
            "help": "Which of the paper's two reward models; records tagged with another `objective` are skipped."
        },
    )
    margin: Literal["small", "large", "none"] = field(
        default="small",
        metadata={
            "help": "Margin per rating (paper Table 27), or `none` for the plain ranking loss; a record's numeric "
            "`margin` field is used as given instead."
        },
    )
    max_length: int = field(default=4096, metadata={"help": "Tokens per prompt + response."})


def ranking_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """The paper's binary ranking loss, `-log(sigmoid(r_chosen - r_rejected - m(rating)))`, averaged."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def pair_margin(record: dict, table: str) -> tuple[int, float]:
    """`(rating index, margin)` of a comparison: the margin column as given (TRL's convention), else the paper's
    table entry for the rating. The rating index is -1 where there is no rating (no per-rating accuracy then)."""
    rating, margin = record.get("rating"), record.get("margin")
    if rating is None and margin is None:
        raise ValueError('need a "rating" (one of the paper\'s four levels) or a numeric "margin"')
    if rating is not None and rating not in RATINGS:
        raise ValueError(f"unknown rating {rating!r}; use one of {list(RATINGS)}")
    index = -1 if rating is None else RATINGS.index(rating)
    if margin is None:
        return index, MARGINS[table][index]
    if isinstance(margin, bool) or not isinstance(margin, int | float) or not math.isfinite(margin):
        raise ValueError(f'"margin" must be a finite number, got {margin!r}')
    return index, float(margin)


KEEP, TIE, OTHER_OBJECTIVE = 0, 1, 2  # what `encode_pair` says of a record
# `encode_pair`'s outputs, declared: a skipped record's empty token lists would leave their type to guess.
PAIR_FEATURES = Features(
    {
        "rating": Value("int64"),
        "margin": Value("float64"),
        "skip": Value("int8"),
        "chosen": List(Value("int64")),
        "rejected": List(Value("int64")),
    }
)


def encode_pair(
    record: dict, *, tokenizer: PreTrainedTokenizerBase, args: RewardArguments, context: int | None
) -> dict:
    """A comparison as `{"chosen", "rejected"}` token ids with its `rating` index and `margin`, and `skip`: `TIE`
    when both responses are the same text (no preference, no gradient), `OTHER_OBJECTIVE` for a record tagged for
    the other reward model. An unknown objective tag is refused: a typo would drop the record from both models."""
    missing = [key for key in ("prompt", "chosen", "rejected") if record.get(key) is None]
    if missing:
        raise ValueError(f"missing field(s) {missing}; every record needs prompt, chosen and rejected")
    objective = record.get("objective") or args.objective
    if objective not in OBJECTIVES:
        raise ValueError(
            f"unknown objective {objective!r}; use one of {list(OBJECTIVES)}, or leave the field out to train "
            "either reward model on the record"
        )
    rating, margin = pair_margin(record, args.margin)
    pair = {"rating": rating, "margin": margin, "skip": KEEP, "chosen": [], "rejected": []}
    if objective != args.objective or record["chosen"] == record["rejected"]:
        return {**pair, "skip": OTHER_OBJECTIVE if objective != args.objective else TIE}
    for key in ("chosen", "rejected"):
        ids, labels = encode_response(tokenizer, prompt_messages(record["prompt"]), record[key])
        pair[key] = truncate(ids, labels, args.max_length)[0]
        check_fits_context(pair[key], context)
    return pair


def keep_pairs(pairs: Data, where: Source, objective: str) -> Data:
    """The comparisons to train on, with a warning counting the ties skipped (counted where the data has a size)."""
    if isinstance(pairs, IterableDataset):
        return pairs.filter(lambda skip: skip == KEEP, input_columns="skip").remove_columns("skip")
    skips = pc.value_counts(pairs.with_format("arrow")["skip"]).to_pylist()
    counts = {entry["values"]: entry["counts"] for entry in skips}
    if counts.get(TIE):
        logger.warning(
            f"{where.name}: skipped {counts[TIE]} {objective} comparison(s) whose chosen and rejected responses are "
            "the same text: they carry no preference."
        )
    if not counts.get(KEEP):
        raise InputError(f"{where.name} holds no {objective} comparisons.")
    if len(counts) > 1:
        pairs = pairs.filter(lambda skip: skip == KEEP, input_columns="skip", desc="Keeping comparisons")
    return pairs.remove_columns("skip")


def load_pairs(source: str | os.PathLike | Data, tokenizer: PreTrainedTokenizerBase, args: RewardArguments) -> Data:
    """Tokenized comparisons `{"chosen", "rejected", "rating", "margin"}` for `args.objective` of a data file, folder,
    Hub data set or `Dataset` (see `encode_pair`)."""
    if isinstance(source, str | os.PathLike):
        data, where = load_records(os.fspath(source))
    else:
        data, where = source, Source("dataset")
    encode = functools.partial(encode_pair, tokenizer=tokenizer, args=args, context=None)
    pairs = tokenize(data, where, encode, desc="Tokenizing", features=PAIR_FEATURES)
    return keep_pairs(pairs, where, args.objective)


class PairCollator:
    """Chosen responses then rejected ones, right-padded into one batch of 2 x B rows."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, pairs: list[dict]) -> dict:
        input_ids, attention_mask = pad_right(
            [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], self.pad_id
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "margin": torch.tensor([p["margin"] for p in pairs]),
            "rating": torch.tensor([p["rating"] for p in pairs]),
        }


class RewardTrainer(Trainer):
    """`Trainer` with the margin ranking loss; evaluation predicts `(r_chosen, r_rejected)` with the rating as label."""

    loss_is_scaled_for_ga = False  # the loss is a per-batch mean: let Trainer divide by accumulation steps

    def _rewards(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, 0]
        return rewards.chunk(2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen, rejected = self._rewards(model, inputs)
        loss = ranking_loss(chosen, rejected, inputs["margin"])
        return (loss, torch.stack([chosen, rejected], dim=-1)) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, rewards = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), rewards, inputs["rating"]


def ranking_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """Accuracy (chosen scored above rejected) overall and per rating level, as in the paper's Table 8."""
    rewards, ratings = torch.as_tensor(prediction.predictions), torch.as_tensor(prediction.label_ids)
    correct = (rewards[:, 0] > rewards[:, 1]).float()
    metrics = {"accuracy": correct.mean().item()}
    for i, rating in enumerate(RATINGS):
        if (ratings == i).any():
            metrics[f"accuracy_{rating.split(' /')[0].replace(' ', '_')}"] = correct[ratings == i].mean().item()
    return metrics


def run_reward_model(
    model_args: ModelArguments,
    reward_args: RewardArguments,
    training_args: TrainingArguments,
    *,
    train_dataset: Data | None = None,
    eval_dataset: Data | None = None,
) -> dict:
    """Train a one-output reward model from `model_args.model` (the SFT model) on the comparisons `reward_args`
    names, or on `train_dataset` (a `datasets.Dataset` or `IterableDataset`); save it and `metrics.json`."""
    check_launch(training_args)
    check_streaming(reward_args.streaming, training_args)
    tokenizer = load_tokenizer(model_args.model)
    encode = functools.partial(
        encode_pair, tokenizer=tokenizer, args=reward_args, context=model_context(model_args.model)
    )
    with training_args.main_process_first(desc="tokenizing the comparisons"):
        splits = prepare(
            reward_args, encode, seed=training_args.seed, desc="Tokenizing", features=PAIR_FEATURES,
            train_dataset=train_dataset, eval_dataset=eval_dataset,
        )  # fmt: skip
        (train_pairs, train_source), evaluation = splits
        train_pairs = keep_pairs(train_pairs, train_source, reward_args.objective)
        eval_pairs = keep_pairs(*evaluation, reward_args.objective) if evaluation else None

    def load_base():
        return load_reward_base(model_args, reward_args.objective, tokenizer.pad_token_id)

    return train(
        RewardTrainer, model_args, training_args, load_base=load_base, task_type="SEQ_CLS", tokenizer=tokenizer,
        train_data=train_pairs, eval_data=eval_pairs, data_collator=PairCollator(tokenizer.pad_token_id),
        compute_metrics=ranking_metrics,
    )  # fmt: skip


def load_reward_base(model_args: ModelArguments, objective: str, pad_token_id: int) -> Llama2ForSequenceClassification:
    """A one-output reward model from `model_args.model` (a stock Llama folder too, saved back as one).

    Started from a causal LM, the score head is new and the LM head unused: transformers' load report (a table) would
    say so at warning level; that expected case is one line here, any other key is still reported."""
    with transformers_logging_at(logging.ERROR):
        model, info = Llama2ForSequenceClassification.from_pretrained(
            model_args.model,
            num_labels=1,
            id2label={0: objective},
            label2id={objective: 0},
            attn_implementation=model_args.attn_implementation,
            output_loading_info=True,
        )
    missing, unexpected = set(info["missing_keys"]), set(info["unexpected_keys"])
    if missing == {"score.weight"} and unexpected <= {"lm_head.weight"}:
        logger.warning(f"{model_args.model}: a causal LM; the reward head (score.weight) starts from random weights.")
    elif missing or unexpected or info.get("mismatched_keys"):
        logger.warning(
            f"{model_args.model}: weights missing {sorted(missing)}, unexpected {sorted(unexpected)}, "
            f"mismatched {sorted(info.get('mismatched_keys') or [])}."
        )
    model.config.pad_token_id = pad_token_id  # the head scores the last token that is not padding
    return model


@contextlib.contextmanager
def transformers_logging_at(level: int) -> Iterator[None]:
    """transformers' log level set to `level` for a block, then restored."""
    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(level)
    try:
        yield
    finally:
        transformers.logging.set_verbosity(previous)


@cli  # a data error: one `error: ...` line, exit code 2
def main(argv: list[str] | None = None) -> None:
    """`llama2-reward-model`: the command line over `run_reward_model`, with the paper's learning rate and epoch."""
    model_args, reward_args, training_args = parse_args(
        ModelArguments, RewardArguments, argv=argv, learning_rate=1e-5, lr_scheduler_type="cosine", num_train_epochs=1
    )
    run_reward_model(model_args, reward_args, training_args)


if __name__ == "__main__":
    main()
