"""Writing a Hugging Face checkpoint directory without ever holding the whole model in memory.

`safetensors.torch.save_file` needs every tensor of a file at once. Since all shapes are known before
any weight is read, this writer lays out the files and their headers first, then materializes one
tensor at a time, writes its bytes and lets it go.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import GenerationConfig

from modeling_llama2 import Llama2Config

from . import ConversionError
from .tokenizer import save_tokenizer

SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class LazyTensor:
    """A tensor to be written: its name, shape and stored dtype are known up front, its data is
    produced by `load` only when the writer reaches it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


def parse_size(text: str) -> int:
    """`"5GB"` -> 5 * 10**9, `"500MiB"` -> 500 * 2**20, `"1000"` -> 1000 bytes (transformers' convention)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"Cannot read the size {text!r}; write it like 5GB, 500MB or 2GiB.")
    number, unit = float(match[1]), (match[2] or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(number * base ** "BKMGT".index(unit[0]))


def check_output_dir(output_dir: Path, *, overwrite: bool) -> None:
    """Fail before any work if the conversion would clobber something."""
    if output_dir.is_file() or (output_dir.exists() and any(output_dir.iterdir()) and not overwrite):
        raise ConversionError(f"{output_dir} is not empty; choose another --output-dir or pass --overwrite.")


@contextmanager
def staging_dir(output_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `output_dir` that replaces it only once the body succeeds,
    so an interrupted conversion never leaves a half-written checkpoint behind."""
    check_output_dir(output_dir, overwrite=overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; the output gets a plain `mkdir`'s mode
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
        os.replace(output_dir, old / output_dir.name)
        shutil.rmtree(old)
    os.replace(staging, output_dir)


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_safetensors(
    output_dir: Path, tensors: list[LazyTensor], *, dtype: torch.dtype | None, max_shard_size: int
) -> None:
    """Write `model-0000i-of-0000n.safetensors` files of at most `max_shard_size` bytes (a larger tensor
    gets a file of its own) and `model.safetensors.index.json`, converting to `dtype` when given."""
    nbytes = {t.name: math.prod(t.shape) * (dtype or t.dtype).itemsize for t in tensors}
    shards: list[list[LazyTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + nbytes[tensor.name] > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes[tensor.name]

    weight_map = {}
    progress = tqdm(total=len(tensors), desc="Writing safetensors", unit="tensor")
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for tensor in shard:
            header[tensor.name] = {
                "dtype": SAFETENSORS_DTYPES[dtype or tensor.dtype],
                "shape": list(tensor.shape),
                "data_offsets": [offset, offset + nbytes[tensor.name]],
            }
            offset += nbytes[tensor.name]
            weight_map[tensor.name] = filename
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        with open(output_dir / filename, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little") + encoded)
            for tensor in shard:
                data = tensor.load().to(dtype or tensor.dtype).contiguous()
                f.write(data.reshape(-1).view(torch.uint8).numpy().data)
                progress.update()
    progress.close()
    index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
    (output_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_hf_checkpoint(
    output_dir: str | Path,
    config: Llama2Config,
    tensors: list[LazyTensor],
    *,
    dtype: torch.dtype | None,
    max_shard_size: int,
    tokenizer: Path | None,
    chat: bool,
    model_type: str,
    overwrite: bool,
) -> None:
    """Write weights, `config.json`, `generation_config.json` and, given a `tokenizer.model`, the tokenizer files,
    all into `output_dir` at once. `model_type` is `llama` for a stock transformers Llama checkpoint, `llama2` for
    this package's own (with `auto_map` and the source files)."""
    output_dir = Path(output_dir)
    with staging_dir(output_dir, overwrite=overwrite) as staging:
        config.checkpoint_format = model_type
        config.architectures = ["Llama2ForCausalLM"]  # written as `LlamaForCausalLM` in the stock format
        config.dtype = dtype or tensors[0].dtype
        config.save_pretrained(staging)
        # Meta's reference sampling settings (example_chat_completion.py / example_text_completion.py).
        GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            do_sample=True,
            temperature=0.6,
            top_p=0.9,
            # No `max_length`: with it, every `generate(max_new_tokens=...)` warns that both are set.
        ).save_pretrained(staging)
        if tokenizer is not None:
            save_tokenizer(tokenizer, staging, chat=chat, model_max_length=config.max_position_embeddings)
        write_safetensors(staging, tensors, dtype=dtype, max_shard_size=max_shard_size)
