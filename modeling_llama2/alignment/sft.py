"""Supervised fine-tuning data and training as in Llama 2-Chat: chat-formatted samples, loss on answers only,
samples packed into fixed-length rows with attention kept inside each sample."""

import bisect
from dataclasses import dataclass, field

from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from ..chat_format import CONTROL_TOKENS, IGNORE_INDEX, encode_dialog, tokenizer_encoder
from ..modeling_llama2 import Llama2ForCausalLM
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


@dataclass
class SFTArguments:
    train_file: str = field(
        metadata={"help": 'JSONL of {"prompt", "response"} or {"messages": [{"role", "content"}, ...]}.'}
    )
    eval_file: str | None = field(default=None, metadata={"help": "Optional JSONL in the same format."})
    max_length: int = field(default=4096, metadata={"help": "Tokens per sample and per packed row."})
    packing: bool = field(default=True, metadata={"help": "Pack samples into rows of --max-length tokens."})


FORMATS = '"messages"; "prompt" and "completion"; "prompt" and "response"; or "text"'


def chat(messages: list[dict], encode, bos: int, eos: int) -> tuple[list[int], list[int]]:
    """A dialog in the chat format, loss on every assistant answer; it must end with one."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the dialog must end with an assistant message, the answer to learn")
    return encode_dialog(messages, encode, bos, eos)


def plain(prompt: str, completion: str, encode, bos: int, eos: int) -> tuple[list[int], list[int]]:
    """BOS + prompt + completion + EOS as plain text (no chat format), loss on the completion and the EOS. The
    completion is tokenized on its own, as a chat answer is, so the loss starts exactly where it does."""
    for text in (prompt, completion):
        if not isinstance(text, str):
            raise ValueError(f"expected text, got {type(text).__name__} {text!r:.60}")
        if any(token in text for token in CONTROL_TOKENS):
            raise ValueError(f"text may not spell the control tokens {list(CONTROL_TOKENS)}: a tokenizer parses them")
    head, tail = [bos] + (encode(prompt) if prompt else []), encode(completion) + [eos]
    return head + tail, [IGNORE_INDEX] * len(head) + tail


def encode_record(record: dict, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Token ids and labels of one SFT record in any of TRL's formats or this package's own:

    - `messages`: a dialog in the chat format, loss on the assistant answers;
    - `prompt` and `completion`, both text: plain text, loss on the completion; both message lists: the dialog
      `prompt + completion` in the chat format, loss on the completion's answers only;
    - `prompt` and `response` (text): one exchange in the chat format, loss on the response;
    - `text`: plain language-model data, BOS + text + EOS, loss on every token.

    Fields that are null count as absent (a table with several formats has every column in every row).
    """
    encode, bos, eos = tokenizer_encoder(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id
    present = {key for key, value in record.items() if value is not None}
    if "messages" in present:
        return chat(record["messages"], encode, bos, eos)
    if {"prompt", "completion"} <= present:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return plain(prompt, completion, encode, bos, eos)
        if isinstance(prompt, list) and isinstance(completion, list):
            ids, labels = chat(prompt + completion, encode, bos, eos)
            n_prompt = len(encode_dialog(prompt, encode, bos, eos)[0])  # a prefix of the whole dialog's ids
            return ids, [IGNORE_INDEX] * n_prompt + labels[n_prompt:]
        raise ValueError('"prompt" and "completion" must both be text or both be message lists')
    if {"prompt", "response"} <= present:
        exchange = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
        return chat(exchange, encode, bos, eos)
    if "text" in present:
        return plain("", record["text"], encode, bos, eos)
    raise ValueError(f"need {FORMATS}; got fields {sorted(present)}")


def load_sft_samples(path: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[dict]:
    """Tokenized samples `{"input_ids", "labels"}` of a JSONL file, prompts masked with -100."""
    samples = []
    for line_no, record in read_jsonl(path):
        where = f"{path}:{line_no}"
        try:
            ids, labels = encode_record(record, tokenizer)
        except ValueError as e:
            raise InputError(f"{where}: {e}") from e
        ids, labels = truncate(ids, labels, max_length, where)
        samples.append({"input_ids": ids, "labels": labels})
    if not samples:
        raise InputError(f"{path} holds no records.")
    return samples


def pack(samples: list[dict], max_length: int) -> list[list[dict]]:
    """Group whole samples into rows of at most `max_length` tokens (best-fit decreasing bin packing).

    Samples are never split, so each keeps its full context and the packed loss equals the unpacked one. Rows come
    out nearly full, which keeps the tokens per step steady; the collator then adds no padding at all.
    """
    rows: list[list[dict]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for sample in sorted(samples, key=lambda s: len(s["input_ids"]), reverse=True):
        n = len(sample["input_ids"])
        i = bisect.bisect_left(free, (n, -1))  # the fullest row it still fits in
        if i == len(free):
            rows.append([sample])
            room, row = max_length - n, len(rows) - 1
        else:
            room, row = free.pop(i)
            rows[row].append(sample)
            room -= n
        bisect.insort(free, (room, row))
    return rows


class PackedCollator:
    """Flatten a batch of packed rows into one sequence with `position_ids` restarting at each sample.

    transformers then builds block-diagonal causal attention from the restarts, but only when there is neither an
    `attention_mask` nor a KV cache: the batch itself turns the cache off, since a model whose config says
    `use_cache=True` would otherwise build one and silently attend across samples.
    """

    def __init__(self):
        self.flatten = DataCollatorWithFlattening()

    def __call__(self, rows: list[list[dict]]) -> dict:
        return {**self.flatten([sample for row in rows for sample in row]), "use_cache": False}


def sft_collator(tokenizer: PreTrainedTokenizerBase, packing: bool):
    """`PackedCollator` for packed rows, else right padding with -100 labels on the padding."""
    if packing:
        return PackedCollator()
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)


def run_sft(model_args: ModelArguments, sft_args: SFTArguments, training_args: TrainingArguments) -> dict:
    """Fine-tune `model_args.model` on `sft_args.train_file`; save the model and `metrics.json` in the output
    directory. Returns the metrics."""
    tokenizer = load_tokenizer(model_args.model)
    context = model_context(model_args.model)

    def load_base():
        return Llama2ForCausalLM.from_pretrained(  # a stock Llama folder too, saved back as one
            model_args.model, attn_implementation=model_args.attn_implementation
        )

    def dataset(path):
        samples = load_sft_samples(path, tokenizer, sft_args.max_length)
        check_fits_context([len(s["input_ids"]) for s in samples], context, path)
        return pack(samples, sft_args.max_length) if sft_args.packing else samples

    return train(
        Trainer, model_args, training_args, load_base=load_base, task_type="CAUSAL_LM", tokenizer=tokenizer,
        train_data=dataset(sft_args.train_file), eval_data=dataset(sft_args.eval_file) if sft_args.eval_file else None,
        data_collator=sft_collator(tokenizer, sft_args.packing),
    )  # fmt: skip
