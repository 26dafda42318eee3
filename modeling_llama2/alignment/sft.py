"""Supervised fine-tuning data and training as in Llama 2-Chat: chat-formatted samples, loss on answers only,
samples packed into fixed-length rows with attention kept inside each sample.

    llama2-sft --model PATH --train-file sft.jsonl --output-dir out/sft --num-epochs 2
    accelerate launch -m modeling_llama2.alignment.sft ...  (or torchrun ... -m modeling_llama2.alignment.sft ...)
"""

import bisect
import functools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from datasets import Dataset, IterableDataset
from transformers import (
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)

from ..chat_format import CONTROL_TOKENS, IGNORE_INDEX, encode_dialog, tokenizer_encoder
from ..modeling_llama2 import Llama2ForCausalLM
from .data import Data, DataArguments, Source, list_lengths, load_records, prepare, tokenize
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


@dataclass
class SFTArguments(DataArguments):
    """SFT data (any of the formats `encode_record` takes) and how samples are laid out."""

    max_length: int = field(default=4096, metadata={"help": "Tokens per sample and per packed row."})
    packing: bool = field(
        default=True,
        metadata={
            "help": "Pack samples into rows of --max-length tokens (the default); --no-packing pads each sample "
            "to the longest of its batch instead."
        },
    )


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


def encode_sample(record: dict, *, tokenizer: PreTrainedTokenizerBase, max_length: int, context: int | None) -> dict:
    """A record as a training sample `{"input_ids", "labels"}`, cut to `max_length` and checked against the model's
    context (so a stream fails on it when read, not mid-step)."""
    ids, labels = truncate(*encode_record(record, tokenizer), max_length)
    check_fits_context(ids, context)
    return {"input_ids": ids, "labels": labels}


def load_sft_samples(
    source: str | os.PathLike | Data, tokenizer: PreTrainedTokenizerBase, max_length: int, context: int | None = None
) -> Data:
    """Tokenized samples `{"input_ids", "labels"}` of a data file, folder, Hub data set or `Dataset`, prompts masked
    with -100."""
    if isinstance(source, str | os.PathLike):
        data, where = load_records(os.fspath(source))
    else:
        data, where = source, Source("dataset")
    encode = functools.partial(encode_sample, tokenizer=tokenizer, max_length=max_length, context=context)
    return tokenize(data, where, encode, desc="Tokenizing")


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Group whole samples, given by their lengths, into rows of at most `max_length` tokens (best-fit decreasing bin
    packing); returns each row's sample indices.

    Samples are never split, so each keeps its full context and the packed loss equals the unpacked one. Rows come
    out nearly full, which keeps the tokens per step steady; the collator then adds no padding at all.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True):
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))  # the fullest row it still fits in
        if j == len(free):
            rows.append([i])
            room, row = max_length - n, len(rows) - 1
        else:
            room, row = free.pop(j)
            rows[row].append(i)
            room -= n
        bisect.insort(free, (room, row))
    return rows


class PackedRows(torch.utils.data.Dataset):
    """Rows of samples as `pack` grouped them, read from the (memory-mapped) samples when a batch asks."""

    def __init__(self, samples: Dataset, max_length: int):
        self.samples, self.rows = samples, pack(list_lengths(samples, "input_ids"), max_length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.samples[j] for j in self.rows[i]]


OPEN_ROWS = 16  # rows a stream is packed into at once


def pack_stream(samples: Iterable[dict], max_length: int, open_rows: int = OPEN_ROWS) -> Iterator[list[dict]]:
    """Rows packed as the samples arrive: each joins the fullest open row it fits in, or opens one; a row leaves when
    full or, when more than `open_rows` are open, the fullest leaves. Memory holds `open_rows` rows whatever the size
    of the data, and rows still come out nearly full."""
    rows: list[list] = []  # [tokens, samples]
    for sample in samples:
        n = len(sample["input_ids"])
        fits = [row for row in rows if row[0] + n <= max_length]
        if fits:
            row = max(fits, key=lambda row: row[0])
            row[0] += n
            row[1].append(sample)
        else:
            row = [n, [sample]]
            rows.append(row)
        if row[0] == max_length or len(rows) > open_rows:
            done = row if row[0] == max_length else max(rows, key=lambda row: row[0])
            rows.remove(done)
            yield done[1]
    for row in rows:
        yield row[1]


class PackedStream(torch.utils.data.IterableDataset):
    """`pack_stream` over a stream of samples, read afresh each epoch."""

    def __init__(self, samples: IterableDataset, max_length: int):
        self.samples, self.max_length = samples, max_length

    def __iter__(self) -> Iterator[list[dict]]:
        return pack_stream(self.samples, self.max_length)


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


class LossOnlyTrainer(Trainer):
    """`Trainer` whose model takes the loss without materializing the logits (`skip_logits`, see `Llama2ForCausalLM`)
    where only the loss is used: in training steps, and in evaluation without `compute_metrics`. The logits and their
    gradient are a packed step's largest tensors (32000 floats a token each). Not under DeepSpeed or FSDP, which may
    hold the LM head's weight whole only inside the head's own forward."""

    def without_logits(self, inputs: dict) -> dict:
        return inputs if self.is_deepspeed_enabled or self.is_fsdp_enabled else {**inputs, "skip_logits": True}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not return_outputs:
            inputs = self.without_logits(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if prediction_loss_only:
            inputs = self.without_logits(inputs)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)


def check_streaming(streaming: bool, training_args: TrainingArguments) -> None:
    """A stream has no length, so the run's length must be given in steps; each rank reads the whole stream and keeps
    its own share of batches (accelerate cannot broadcast the packed batches' non-tensor fields)."""
    if not streaming:
        return
    if training_args.max_steps <= 0:
        raise InputError("--streaming needs --max-steps: a stream's length, hence an epoch's, is unknown.")
    training_args.accelerator_config.dispatch_batches = False


def run_sft(
    model_args: ModelArguments,
    sft_args: SFTArguments,
    training_args: TrainingArguments,
    *,
    train_dataset: Data | None = None,
    eval_dataset: Data | None = None,
) -> dict:
    """Fine-tune `model_args.model` on the data `sft_args` names, or on `train_dataset` (a `datasets.Dataset` or
    `IterableDataset` of records); save the model and `metrics.json` in the output directory. Returns the metrics."""
    check_launch(training_args)
    check_streaming(sft_args.streaming, training_args)
    tokenizer = load_tokenizer(model_args.model)
    encode = functools.partial(
        encode_sample, tokenizer=tokenizer, max_length=sft_args.max_length, context=model_context(model_args.model)
    )
    with training_args.main_process_first(desc="tokenizing the SFT data"):
        splits = prepare(
            sft_args, encode, seed=training_args.seed, desc="Tokenizing", train_dataset=train_dataset,
            eval_dataset=eval_dataset,
        )  # fmt: skip

    def rows(samples: Data, where: Source):
        if isinstance(samples, IterableDataset):
            return PackedStream(samples, sft_args.max_length) if sft_args.packing else samples
        if len(samples) == 0:
            raise InputError(f"{where.name} holds no records.")
        return PackedRows(samples, sft_args.max_length) if sft_args.packing else samples

    def load_base():
        return Llama2ForCausalLM.from_pretrained(  # a stock Llama folder too, saved back as one
            model_args.model, attn_implementation=model_args.attn_implementation
        )

    (train_samples, train_source), evaluation = splits
    return train(
        LossOnlyTrainer, model_args, training_args, load_base=load_base, task_type="CAUSAL_LM", tokenizer=tokenizer,
        train_data=rows(train_samples, train_source), eval_data=rows(*evaluation) if evaluation else None,
        data_collator=sft_collator(tokenizer, sft_args.packing),
    )  # fmt: skip


@cli  # a data error: one `error: ...` line, exit code 2
def main(argv: list[str] | None = None) -> None:
    """`llama2-sft`: the command line over `run_sft`, with the paper's learning rate, schedule and epochs."""
    model_args, sft_args, training_args = parse_args(
        ModelArguments, SFTArguments, argv=argv, learning_rate=2e-5, lr_scheduler_type="cosine", num_train_epochs=2
    )
    run_sft(model_args, sft_args, training_args)


if __name__ == "__main__":
    main()
