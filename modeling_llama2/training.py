"""What the alignment trainers share: JSONL input, command line, tokenizer, LoRA and the final save.

The scripts in `examples/` are thin wrappers over `run_sft`, `run_reward_model` and `rejection_sample`; this module
holds the plumbing they would otherwise each repeat.
"""

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import (
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainingArguments,
)


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
    parser.set_defaults(logging_steps=10, ddp_find_unused_parameters=False, **defaults)
    *script_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # The collators here read fields the model's forward does not name (margins, ratings, packed samples).
    training_args.remove_unused_columns = False
    # Useful tokens/s: count real tokens, not padding (the parser cannot take this value from the command line).
    training_args.include_num_input_tokens_seen = "non_padding"
    return (*script_args, training_args)


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
    """Yield `(line number, record)` for every non-blank line, checking the fields every record needs."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({e}); write one JSON object per line.") from e
            missing = [key for key in required if key not in record]
            if missing:
                raise ValueError(
                    f"{path}:{line_no}: missing field(s) {missing}; every record needs {list(required)}, "
                    f"this one has {sorted(record)}."
                )
            yield line_no, record


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


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
    """Save a model that `from_pretrained` loads as is, plus `metrics.json` and `trainer_state.json`, in the output
    directory.

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
        with open(os.path.join(output_dir, "metrics.json"), "w") as f:
            json.dump({**metrics, "world_size": trainer.args.world_size}, f, indent=2)
