"""What the alignment trainers share: JSONL input, command line, tokenizer, truncation, LoRA, the training run and the
final save.

The scripts in `examples/` are thin wrappers over `run_sft`, `run_reward_model` and `rejection_sample`; this module
holds the plumbing they would otherwise each repeat.
"""

import functools
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from ..chat_format import IGNORE_INDEX
from ..modeling_llama2 import context_length


class InputError(ValueError):
    """A mistake in the command line or the data. The scripts report it as one `error: ...` line with exit code 2, as
    argparse does, instead of a traceback: the fix is in what was given, not in the code."""


def cli(main: Callable[[Sequence[str] | None], None]) -> Callable[[Sequence[str] | None], None]:
    """Wrap a script's `main(argv)` so that an `InputError` ends it with `error: <message>` and exit code 2, and a
    run that ends well closes the process group a distributed launch opened.

    `Trainer` leaves that group open; at interpreter exit gloo's worker threads were then torn down unjoined, and a
    rank that had trained and saved could still abort ("terminate called without an active exception"). After a
    failure the group is left alone: destroying it waits on the other ranks, which may never come.
    """

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> None:
        try:
            main(argv)
        except InputError as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            raise SystemExit(2) from None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    return run


@dataclass
class ModelArguments:
    model: str = field(metadata={"help": "Model directory (or Hub id) to start from; its tokenizer is used too."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "`sdpa`, `eager` or `flash_attention_2` (best for packing on GPU); default: the model's."},
    )
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of every weight."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Linear layers that get adapters (PEFT's defaults do not know this model type)."},
    )


def parse_args(*dataclass_types: type, argv: Sequence[str] | None = None, **defaults: Any) -> tuple:
    """Parse the script's own dataclasses followed by `TrainingArguments`, so every Trainer flag works
    (`--deepspeed`, `--fsdp`, `--resume-from-checkpoint`, `--gradient-accumulation-steps`, ...).

    `argv` is the command line without the program name (default: `sys.argv[1:]`), so a script's `main` can be
    called from Python. `defaults` override `TrainingArguments` defaults (the paper's learning rates, for instance).
    """
    parser = HfArgumentParser((*dataclass_types, TrainingArguments))
    parser.add_argument("--num-epochs", dest="num_train_epochs", type=float, help="Alias of --num-train-epochs.")
    for action in parser._actions:  # argparse's public API cannot amend an added argument
        if action.dest == "output_dir":  # else Trainer writes into ./trainer_output, wherever the run was started
            action.required = True
    parser.set_defaults(logging_steps=10, ddp_find_unused_parameters=False, **defaults)
    *script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # The collators here read fields the model's forward does not name (margins, ratings, packed samples).
    training_args.remove_unused_columns = False
    # Useful tokens/s: count real tokens, not padding (the parser cannot take this value from the command line).
    training_args.include_num_input_tokens_seen = "non_padding"
    return (*script_args, training_args)


def json_record(line: str, where: str) -> dict:
    """One JSON Lines record, or an `InputError` at `where` (`path:line`) saying why it is none."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e}); write one JSON object per line.") from e
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise InputError(f"{where}: a JSON {kind} where a record belongs; write one JSON object per line.")
    return record


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """Yield `(line number, record)` for every non-blank line, checking the fields every record needs."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file.")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json_record(line, f"{path}:{line_no}")
            missing = [key for key in required if key not in record]
            if missing:
                raise InputError(
                    f"{path}:{line_no}: missing field(s) {missing}; every record needs {list(required)}, "
                    f"this one has {sorted(record)}."
                )
            yield line_no, record


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> str | os.PathLike:
    """Write one JSON object per line (UTF-8); returns `path`."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return path


def truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut a sample to `max_length` tokens, refusing when no answer token would be left to learn from."""
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise ValueError(
            f"the prompt alone fills --max-length {max_length} (no answer token left to train on); "
            "raise --max-length, or shorten or drop this record"
        )
    return ids, labels


def check_fits_context(ids: list[int], context: int | None) -> None:
    """Refuse, before training, a sample that the model would refuse mid-run as longer than its context."""
    if context is not None and len(ids) > context:
        raise ValueError(
            f"{len(ids)} tokens, longer than the model's context of {context} tokens; pass --max-length {context} "
            "(or less) to truncate"
        )


def model_context(path: str) -> int | None:
    """The context `path`'s model can attend over (see `context_length`), read from its config alone."""
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "rope_parameters", None) is None:
        return getattr(config, "max_position_embeddings", None)
    return context_length(config)


def check_launch(training_args: TrainingArguments) -> None:
    """Refuse launches that would not be what they look like: several processes that each train alone (on a CPU
    without `--use-cpu` every rank sees `world_size` 1 and all write into one folder), and FSDP on a CPU, which
    accelerate does not apply there (it silently runs DDP)."""
    launched = max(int(os.environ.get(name, 1)) for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    if launched > 1 and training_args.world_size == 1:
        raise InputError(
            f"launched as {launched} processes, but each would train alone into the same folder; on CPUs pass "
            "--use-cpu (DDP over gloo), on GPUs check that each process sees its GPU."
        )
    fsdp = training_args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if fsdp and training_args.device.type == "cpu":
        raise InputError(
            "FSDP needs GPUs: on a CPU accelerate does not shard and the run would silently be DDP; drop --fsdp "
            "(with --use-cpu, several processes run DDP over gloo) or run on GPUs."
        )


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, given `<unk>` as pad token if it has none (Llama 2's has none). Not EOS: a reward head
    looks for the last token that is not padding, and that must be the EOS closing the response."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def add_lora(model: PreTrainedModel, args: ModelArguments, task_type: str) -> PreTrainedModel:
    """Wrap `model` with LoRA adapters when `--lora` is given (`task_type` as in `peft.TaskType`)."""
    if not args.lora:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type=task_type,
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.lora_target_modules,
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def save_final(
    trainer: Trainer, model_args: ModelArguments, load_base: Callable[[], PreTrainedModel], metrics: dict
) -> None:
    """Save a model that `from_pretrained` loads as is (in the input's format: a stock Llama stays one), its tokenizer
    with the input's `tokenizer.model`, `metrics.json` and `trainer_state.json`, in the output directory.

    With LoRA the adapters go to `adapter/` and rank 0 merges them into a fresh copy of the base model: going through
    the saved adapter works whatever sharding (FSDP, DeepSpeed) the training used.
    """
    output_dir = trainer.args.output_dir
    if model_args.lora:
        adapter_dir = os.path.join(output_dir, "adapter")
        trainer.save_model(adapter_dir)
        if trainer.is_world_process_zero():
            from peft import PeftModel

            merged = PeftModel.from_pretrained(load_base(), adapter_dir).merge_and_unload()
            merged.save_pretrained(output_dir)
            trainer.processing_class.save_pretrained(output_dir)
    else:
        trainer.model.config.use_cache = True  # Trainer turned it off for training; generation wants it back.
        trainer.save_model(output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        # The sentencepiece model is no part of a transformers tokenizer's save; Meta's code (and `hf-to-meta`) need it.
        tokenizer_model = os.path.join(model_args.model, "tokenizer.model")
        if os.path.isfile(tokenizer_model):
            shutil.copyfile(tokenizer_model, os.path.join(output_dir, "tokenizer.model"))
        with open(os.path.join(output_dir, "metrics.json"), "w") as f:
            json.dump({**metrics, "world_size": trainer.args.world_size}, f, indent=2)


class SessionStart(TrainerCallback):
    """Where this `train()` call started: the step and token count of the checkpoint it resumed from (0 if none)."""

    global_step: int = 0
    num_input_tokens_seen: int = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.global_step, self.num_input_tokens_seen = state.global_step, state.num_input_tokens_seen


def whole_run_loss(log_history: list[dict], resumed_at: int, session_loss: float, session_steps: int) -> float:
    """Mean training loss per step over the whole run. Trainer's `train_loss` averages only the steps of this
    session; the steps before `resumed_at` are taken from the checkpoint's logged losses, each weighing the steps since
    the previous log. Steps trained after the last log before the checkpoint was saved were never logged and are
    left out (none when `--save-steps` is a multiple of `--logging-steps`)."""
    total, steps, previous = session_loss * session_steps, session_steps, 0
    for entry in log_history:
        if "loss" in entry and previous < entry["step"] <= resumed_at:
            total += entry["loss"] * (entry["step"] - previous)
            steps += entry["step"] - previous
            previous = entry["step"]
    return total / max(steps, 1)


def train(
    trainer_class: type[Trainer],
    model_args: ModelArguments,
    training_args: TrainingArguments,
    *,
    load_base: Callable[[], PreTrainedModel],
    task_type: str,
    tokenizer: PreTrainedTokenizerBase,
    train_data: Any,
    eval_data: Any | None,
    **trainer_kwargs: Any,
) -> dict:
    """The run every trainer makes: the base model (with LoRA when asked), training (resumed when asked), evaluation,
    the final save. Returns the metrics, with the non-padding (useful) tokens per second of this session.

    The data are anything `Trainer` takes: a `datasets.Dataset` or `IterableDataset`, or a torch dataset of rows."""
    if training_args.device.type == "cpu":
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; on a CPU it only warns
    trainer = trainer_class(
        model=add_lora(load_base(), model_args, task_type),
        args=training_args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        **trainer_kwargs,
    )
    start = SessionStart()
    trainer.add_callback(start)
    metrics = dict(trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint).metrics)
    state = trainer.state
    metrics["train_loss"] = whole_run_loss(
        state.log_history, start.global_step, metrics["train_loss"], state.global_step - start.global_step
    )
    # Non-padding tokens (every token when packed) per second in this session (a resumed run counts from its start).
    tokens = state.num_input_tokens_seen - start.num_input_tokens_seen
    metrics["train_useful_tokens_per_second"] = tokens / metrics["train_runtime"]
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    save_final(trainer, model_args, load_base, metrics)
    return metrics
