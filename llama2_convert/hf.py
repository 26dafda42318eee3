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
import secrets
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from google.protobuf.message import DecodeError
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


def check_output_dir(output_dir: str | Path, *, overwrite: bool, inputs: list[Path]) -> Path:
    """Fail before any work if the conversion would clobber something, and return the output's resolved path
    (symlinks followed, so that `.` or a link to the input is seen for what it is). What killed runs left beside
    the output is tidied first (`remove_stale`)."""
    output_dir = Path(output_dir).resolve()
    cwd = Path.cwd().resolve()
    if output_dir == cwd or output_dir in cwd.parents:
        raise ConversionError(
            f"--output-dir {output_dir} is the current folder or contains it; name a new folder, e.g. --output-dir "
            "./model-hf."
        )
    for source in inputs:
        source = source.resolve()
        if output_dir == source or output_dir in source.parents or source in output_dir.parents:
            raise ConversionError(
                f"--output-dir {output_dir} is, contains or lies inside the input {source}; writing there would "
                "destroy or mix with the checkpoint being read. Choose a folder beside it."
            )
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"--output-dir {output_dir} is a file; name a folder to create.")
    parent = next(p for p in output_dir.parents if p.exists())  # the folder the missing ones are created in
    if not parent.is_dir():
        raise ConversionError(f"{parent} is a file, so --output-dir {output_dir} cannot be created in it.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"Cannot write in {parent}: permission denied; choose another --output-dir.")
    if parent == output_dir.parent:
        remove_stale(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"{output_dir} is not empty; choose another --output-dir or pass --overwrite.")
    return output_dir


@contextmanager
def staging_dir(output_dir: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `output_dir` that replaces it only once the body succeeds,
    so an interrupted conversion never leaves a half-written checkpoint behind.

    The temporary folders carry this process's id (`.NAME.partial-PID-*`, `.NAME.old-PID-*`), so a later run can
    tell those of a killed run (whose process is gone) and remove them. An existing output is renamed aside,
    the new one renamed in, and only then the old one deleted: at every moment one complete output exists.
    """
    output_dir = output_dir.resolve()
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-{os.getpid()}-", dir=output_dir.parent))
    except OSError as error:
        raise ConversionError(f"Cannot create {output_dir}: {error}; choose another --output-dir.") from error
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; the output gets a plain `mkdir`'s mode
    try:
        yield staging
    except OSError as error:  # a full disk, a vanished input
        shutil.rmtree(staging, ignore_errors=True)
        raise ConversionError(f"Converting into {output_dir} failed: {error}") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    with signals_deferred():
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(output_dir, old)
            try:
                os.replace(staging, output_dir)
            except BaseException:
                os.replace(old, output_dir)
                shutil.rmtree(staging, ignore_errors=True)
                raise
            shutil.rmtree(old)
        else:
            os.replace(staging, output_dir)


STALE = r"\.{name}\.(partial|old)-(\d+)-[^/]+"


def remove_stale(output_dir: Path) -> None:
    """Remove the temporary folders of runs that were killed before they could clean up: `.NAME.partial-PID-*`
    (deleted) and `.NAME.old-PID-*` (the previous output, put back if the kill came between the two renames),
    where no process PID runs any more, or PID is this process's own (in a container every run may get the same)."""
    pattern = re.compile(STALE.format(name=re.escape(output_dir.name)))
    for path in output_dir.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if not match or not path.is_dir() or path.is_symlink() or _running(int(match[2])):
            continue
        if match[1] == "old" and not output_dir.exists():
            os.replace(path, output_dir)
        else:
            shutil.rmtree(path, ignore_errors=True)  # tidying is best effort: what stays is only clutter


def _running(pid: int) -> bool:
    """Whether another process with this id runs."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the output is swapped, so that no interruption falls between the renames."""
    signals = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def tokenizer_error(path: Path, error: Exception) -> ConversionError:
    """One line for a tokenizer.model that sentencepiece cannot read or the fast tokenizer cannot reproduce."""
    if isinstance(error, ValueError):  # `tokenizer`'s own refusals, which name the file and the reason
        return ConversionError(str(error))
    return ConversionError(
        f"{path} is not a sentencepiece tokenizer.model ({str(error).strip()}); pass --tokenizer with the model's own."
    )


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
) -> None:
    """Write weights, `config.json`, `generation_config.json` and, given a `tokenizer.model`, the tokenizer files,
    all into `output_dir` at once. `model_type` is `llama` for a stock transformers Llama checkpoint, `llama2` for
    this package's own (with `auto_map` and the source files). `output_dir` is checked by `check_output_dir`."""
    if dtype is None and (odd := next((t for t in tensors if t.dtype not in SAFETENSORS_DTYPES), None)):
        raise ConversionError(
            f"{odd.name} is stored as {odd.dtype}; Llama checkpoints are written in float16, bfloat16 or float32: "
            "pass --dtype."
        )
    with staging_dir(Path(output_dir)) as staging:
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
            try:
                save_tokenizer(tokenizer, staging, chat=chat, model_max_length=config.max_position_embeddings)
            except (ValueError, RuntimeError, DecodeError) as error:
                raise tokenizer_error(tokenizer, error) from error
        write_safetensors(staging, tensors, dtype=dtype, max_shard_size=max_shard_size)
