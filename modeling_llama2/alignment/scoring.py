"""Scoring with reward models, shared by reward-model training and rejection sampling: how a response is laid out
for a reward model, a batch of rewards, and the paper's combination of the helpfulness and safety scores."""

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..chat_format import encode_dialog, tokenizer_encoder

SAFETY_THRESHOLD = 0.15


def combined_reward(
    helpfulness: torch.Tensor, safety: torch.Tensor, unsafe_prompt: torch.Tensor, threshold: float = SAFETY_THRESHOLD
) -> torch.Tensor:
    """The paper's reward for ranking samples: the safety score where the prompt is marked unsafe or the safety
    score is below `threshold`, the helpfulness score elsewhere.

    Scores are the reward models' outputs (logits); the threshold applies to their sigmoid, as in the paper. The
    result stays a logit, i.e. `LOGIT(R_c)`; the paper's whitening only matters for PPO, not for picking a best sample.
    """
    use_safety = unsafe_prompt | (torch.sigmoid(safety) < threshold)
    return torch.where(use_safety, safety, helpfulness)


def pad_right(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` and `attention_mask` of token rows padded on the right."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return input_ids, attention_mask


@torch.no_grad()
def score(model: PreTrainedModel, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """Reward of each token row (a prompt and its response in the chat format)."""
    input_ids, attention_mask = pad_right(rows, pad_id)
    return model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits[:, 0]


def prompt_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt given as text (one user message) or as a dialog ending with a user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def encode_response(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict], response: str | list[dict]
) -> tuple[list[int], list[int]]:
    """Token ids (and labels) the reward model reads: the dialog closed by `response`, the assistant's answer as text
    or the messages that continue the dialog (TRL's conversational preference rows)."""
    continuation = [{"role": "assistant", "content": response}] if isinstance(response, str) else response
    conversation = [*messages, *continuation]
    return encode_dialog(conversation, tokenizer_encoder(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
