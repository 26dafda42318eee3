"""Llama 2-Chat's reward models: binary ranking loss with a rating-dependent margin and per-rating accuracy."""

import logging
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from transformers import (
    EvalPrediction,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from ..modeling_llama2 import Llama2ForSequenceClassification
from .scoring import encode_response, pad_right, prompt_messages
from .training import (
    InputError,
    ModelArguments,
    check_fits_context,
    load_tokenizer,
    model_context,
    read_jsonl,
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
class RewardArguments:
    train_file: str = field(
        metadata={"help": 'JSONL of {"prompt", "chosen", "rejected"} with "rating" or a numeric "margin".'}
    )
    eval_file: str | None = field(default=None, metadata={"help": "Optional JSONL in the same format."})
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


def load_pairs(path: str, tokenizer: PreTrainedTokenizerBase, args: RewardArguments) -> list[dict]:
    """Tokenized comparisons `{"chosen", "rejected", "rating", "margin"}` of the records for `args.objective`.

    Records tagged with an unknown objective are refused (a typo would otherwise drop them from both reward
    models); those whose chosen and rejected responses are the same text are skipped with a warning, as their loss
    has no gradient."""
    pairs, ties = [], 0
    for line_no, record in read_jsonl(path, required=("prompt", "chosen", "rejected")):
        where = f"{path}:{line_no}"
        objective = record.get("objective", args.objective)
        if objective not in OBJECTIVES:
            raise InputError(
                f"{where}: unknown objective {objective!r}; use one of {list(OBJECTIVES)}, or leave the field out "
                "to train either reward model on the record."
            )
        if objective != args.objective:
            continue
        try:
            rating, margin = pair_margin(record, args.margin)
        except ValueError as e:
            raise InputError(f"{where}: {e}") from e
        if record["chosen"] == record["rejected"]:
            ties += 1
            continue
        pair = {"rating": rating, "margin": margin}
        for key in ("chosen", "rejected"):
            try:
                ids, labels = encode_response(tokenizer, prompt_messages(record["prompt"]), record[key])
            except ValueError as e:
                raise InputError(f"{where}: {e}") from e
            pair[key] = truncate(ids, labels, args.max_length, where)[0]
        pairs.append(pair)
    if ties:
        logger.warning(
            f"{path}: skipped {ties} {args.objective} comparison(s) whose chosen and rejected responses are the same "
            "text: they carry no preference."
        )
    if not pairs:
        raise InputError(f"{path} holds no {args.objective} comparisons.")
    return pairs


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
    model_args: ModelArguments, reward_args: RewardArguments, training_args: TrainingArguments
) -> dict:
    """Train a one-output reward model from `model_args.model` (the SFT model); save it and `metrics.json`."""
    tokenizer = load_tokenizer(model_args.model)
    context = model_context(model_args.model)

    def load_base():
        model = Llama2ForSequenceClassification.from_pretrained(  # a stock Llama folder too, saved back as one
            model_args.model,
            num_labels=1,
            id2label={0: reward_args.objective},
            label2id={reward_args.objective: 0},
            attn_implementation=model_args.attn_implementation,
        )
        model.config.pad_token_id = tokenizer.pad_token_id  # the head scores the last token that is not padding
        return model

    def pairs(path):
        loaded = load_pairs(path, tokenizer, reward_args)
        check_fits_context([len(p[key]) for p in loaded for key in ("chosen", "rejected")], context, path)
        return loaded

    return train(
        RewardTrainer, model_args, training_args, load_base=load_base, task_type="SEQ_CLS", tokenizer=tokenizer,
        train_data=pairs(reward_args.train_file),
        eval_data=pairs(reward_args.eval_file) if reward_args.eval_file else None,
        data_collator=PairCollator(tokenizer.pad_token_id), compute_metrics=ranking_metrics,
    )  # fmt: skip
