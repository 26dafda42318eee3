"""Meta's release format (`consolidated.XX.pth` + `params.json` + `checklist.chk`) <-> Hugging Face checkpoints.

The tensors' names, shapes, splits and rotary layout are `layout`'s; this module reads and writes the files.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from torch.serialization import set_default_mmap_options, skip_data
from tqdm import tqdm

from modeling_llama2 import Llama2Config, torch_internals
from modeling_llama2.configuration_llama2 import STOCK_MODEL_TYPE

from . import ConversionError
from .hf import DTYPES, SAFETENSORS_DTYPES, check_output_dir, parse_size, save_hf_checkpoint, staging_dir
from .layout import (
    check_layer_count,
    config_from_params,
    merged_tensors,
    num_parameters,
    params_from_config,
    some_names,
    to_interleaved,
    weights,
)

STORED_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
LLAMA2_POSITIONS = 4096


def torch_load(path: Path):
    """Memory-map a checkpoint, unpickling nothing but tensors and plain containers: a malicious file
    cannot run code."""
    check_not_empty(path)
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:
        raise ConversionError(f"Cannot read {path} as a tensors-only PyTorch checkpoint: {error}") from error


def check_not_empty(path: Path) -> None:
    """Refuse a zero-byte file, which torch would misreport as an old serialization format."""
    if path.is_file() and path.stat().st_size == 0:
        raise ConversionError(f"{path} is empty (0 bytes): the download or save did not finish; fetch it again.")


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A Meta shard: a dict of tensors, memory-mapped."""
    state = torch_load(path)
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConversionError(f"{path} holds no dict of tensors; it is not a Meta checkpoint shard.")
    return state


# A line of GNU `md5sum` output: the hex digest, then ` ` (text mode) or `*` (binary mode) before the name.
CHECKLIST_LINE = re.compile(r"([0-9a-fA-F]{32}) [ *](.+)")


def verify_checksums(input_dir: Path) -> None:
    """Check the md5 sums Meta ships in `checklist.chk`, if there is one. Only plain files inside `input_dir` are
    read: an entry such as `/dev/zero` or `../../etc/hostname` is refused, not followed."""
    checklist = input_dir / "checklist.chk"
    if not checklist.exists():
        return
    if not checklist.is_file():
        raise ConversionError(f"{checklist} is not a plain file; remove it or pass --skip-checksum.")
    try:
        lines = checklist.read_text().splitlines()
    except UnicodeDecodeError as error:
        raise ConversionError(f"{checklist} is not text ({error}); remove it or pass --skip-checksum.") from error
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not (match := CHECKLIST_LINE.fullmatch(line.strip())):
            raise ConversionError(
                f"{checklist}, line {number}: {line.strip()[:80]!r} is not 'MD5SUM  FILENAME' as md5sum writes it; "
                "fix the line or pass --skip-checksum."
            )
        name = Path(match[2])
        if name.is_absolute() or ".." in name.parts:
            raise ConversionError(
                f"{checklist}, line {number}: {match[2]!r} lies outside {input_dir}; only the checkpoint's own files "
                "are verified. Fix the line or pass --skip-checksum."
            )
        entries.append((match[1].lower(), name))
    if missing := [str(name) for _, name in entries if not (input_dir / name).exists()]:
        raise ConversionError(
            f"checklist.chk lists {some_names(missing)}, which is not in {input_dir}; the download is incomplete."
        )
    if odd := [str(name) for _, name in entries if not (input_dir / name).is_file()]:
        raise ConversionError(
            f"checklist.chk lists {some_names(odd)}, which is not a plain file; only files are verified. Fix "
            "checklist.chk or pass --skip-checksum."
        )
    for digest, name in tqdm(entries, desc="Verifying checklist.chk", unit="file"):
        if md5sum(input_dir / name) != digest:
            raise ConversionError(
                f"{name} does not match its md5 sum in checklist.chk: the file is corrupt or incomplete; "
                "download it again (or pass --skip-checksum)."
            )


def md5sum(path: Path) -> str:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            md5.update(chunk)
    return md5.hexdigest()


def find_tokenizer(input_dir: Path) -> Path | None:
    """`tokenizer.model` in the checkpoint folder or the one above it, where Meta's download puts it."""
    return next((p for p in (input_dir / "tokenizer.model", input_dir.parent / "tokenizer.model") if p.is_file()), None)


def resolve_tokenizer(tokenizer: str | Path | None, default: Path | None) -> Path | None:
    """`--tokenizer` if given (which must be a plain file: sentencepiece reads it whole), else `default`."""
    if tokenizer is None:
        return default
    if not Path(tokenizer).is_file():
        raise ConversionError(f"--tokenizer {tokenizer} is not a file; pass the model's tokenizer.model.")
    return Path(tokenizer)


def read_json(path: Path) -> object:
    """A JSON file's content; a file that is not JSON is bad input, not a crash."""
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConversionError(f"Cannot read {path} as JSON: {error}.") from error


def meta_to_hf(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    tokenizer: str | Path | None = None,
    max_position_embeddings: int = LLAMA2_POSITIONS,
    chat: bool | None = None,
    model_type: str = STOCK_MODEL_TYPE,
    skip_checksum: bool = False,
    overwrite: bool = False,
) -> None:
    """Convert Meta's checkpoint folder; `chat=None` guesses from the folder name (`llama-2-7b-chat`)."""
    input_dir = Path(input_dir)
    output_dir = check_output_dir(output_dir, overwrite=overwrite, inputs=[input_dir])
    if not (input_dir / "params.json").is_file():
        raise ConversionError(
            f"{input_dir / 'params.json'} not found; --input-dir must be a folder of Meta's release, such as "
            "llama-2-7b/, holding params.json and consolidated.*.pth."
        )
    paths = sorted(input_dir.glob("consolidated.*.pth"))
    if [p.name for p in paths] != [f"consolidated.{i:02d}.pth" for i in range(len(paths))] or not paths:
        raise ConversionError(
            f"{input_dir} must hold consolidated.00.pth, consolidated.01.pth, ... numbered without gaps; "
            f"found {[p.name for p in paths]}."
        )
    if not (isinstance(max_position_embeddings, int) and max_position_embeddings > 0):
        raise ConversionError(f"--max-position-embeddings must be a positive integer, got {max_position_embeddings}.")
    tokenizer = resolve_tokenizer(tokenizer, find_tokenizer(input_dir))
    if not skip_checksum:
        verify_checksums(input_dir)
    config = config_from_params(
        read_json(input_dir / "params.json"), tokenizer=tokenizer, max_position_embeddings=max_position_embeddings
    )
    # Shards hold every weight at least once in 2-byte floats: a params.json claiming more is refused before
    # anything is built per layer or per element.
    for path in paths:
        check_not_empty(path)
    held, needed = sum(p.stat().st_size for p in paths), 2 * num_parameters(config)
    if held < needed:
        raise ConversionError(
            f"params.json describes {num_parameters(config):,} parameters, at least {needed:,} bytes, but the shards "
            f"hold {held:,} bytes: params.json and the shards belong to different models."
        )
    tensors = merged_tensors([load_pth(p) for p in paths], [p.name for p in paths], config)
    save_hf_checkpoint(
        output_dir,
        config,
        tensors,
        dtype=DTYPES[dtype] if dtype else None,
        max_shard_size=parse_size(max_shard_size),
        tokenizer=tokenizer,
        chat="chat" in input_dir.resolve().name if chat is None else chat,
        model_type=model_type,
    )


def hf_to_meta(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    num_shards: int,
    tokenizer: str | Path | None = None,
    no_tokenizer: bool = False,
    overwrite: bool = False,
) -> None:
    """Split a Hugging Face checkpoint into `num_shards` Meta shards, the exact inverse of `meta_to_hf`, with the
    `tokenizer.model` Meta's code needs (the folder's own or `tokenizer`; `no_tokenizer` when none is intended).

    Each shard is first saved as a data-less skeleton, then memory-mapped shared and filled tensor by
    tensor, so memory stays near one tensor rather than one shard.
    """
    input_dir = Path(input_dir)
    output_dir = check_output_dir(output_dir, overwrite=overwrite, inputs=[input_dir])
    if not (isinstance(num_shards, int) and num_shards > 0):
        raise ConversionError(
            f"--num-shards must be a positive integer (1 for 7B, 2 for 13B, 8 for 70B), got {num_shards}."
        )
    try:
        torch_internals.require(torch_internals.META_EXPORT)
    except RuntimeError as error:
        raise ConversionError(str(error)) from error
    if not (input_dir / "config.json").exists():
        raise ConversionError(
            f"{input_dir / 'config.json'} not found; --input-dir must be a Hugging Face checkpoint folder."
        )
    tokenizer = resolve_tokenizer(tokenizer, input_dir / "tokenizer.model")
    if no_tokenizer:
        tokenizer = None
    elif not tokenizer.is_file():
        raise ConversionError(
            f"{tokenizer} not found: Meta's format needs the sentencepiece tokenizer.model, which {input_dir} does "
            "not carry (a folder with only tokenizer.json cannot give it back). Pass --tokenizer PATH (the original "
            "model's), or --no-tokenizer to write the weights alone."
        )
    try:
        config = Llama2Config.from_pretrained(input_dir)
    except (ValueError, OSError, StrictDataclassError) as error:
        raise ConversionError(f"{input_dir / 'config.json'}: {str(error).strip()}") from error
    params = params_from_config(config)
    files = _safetensors_files(input_dir)
    check_layer_count(list(files), config, str(input_dir), prefix="model.")
    specs = weights(config)
    # Where each Meta tensor comes from, checked before anything is written; a tied lm_head is the embedding.
    sources, dtypes = {}, {}
    for w in specs:
        name = "model.embed_tokens.weight" if config.tie_word_embeddings and w.hf == "lm_head.weight" else w.hf
        if name not in files:
            raise ConversionError(f"{input_dir} has no tensor {name}; it is not a complete Llama checkpoint.")
        with open_safetensors(input_dir / files[name]) as f:
            if name not in f.keys():
                raise ConversionError(f"{input_dir / files[name]} lacks {name}, which the index puts there.")
            stored = f.get_slice(name)
            shape, dtype = tuple(stored.get_shape()), stored.get_dtype()
        if shape != w.shape:
            raise ConversionError(f"{input_dir}: {name} has shape {shape}, but config.json gives {w.shape}.")
        if dtype not in STORED_DTYPES:
            raise ConversionError(f"{input_dir}: {name} is {dtype}; Meta checkpoints hold F16, BF16 or F32 weights.")
        sources[w.meta], dtypes[w.meta] = (input_dir / files[name], name), STORED_DTYPES[dtype]

    with staging_dir(output_dir) as staging:
        (staging / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        paths = [staging / f"consolidated.{i:02d}.pth" for i in range(num_shards)]
        with torch_internals.FakeTensorMode():
            skeleton = {w.meta: torch.empty(w.shard_shape(num_shards), dtype=dtypes[w.meta]) for w in specs}
        with skip_data(materialize_fake_tensors=True):
            for path in paths:
                torch.save(skeleton, path)
        with set_default_mmap_options(mmap.MAP_SHARED):
            shards = [torch.load(path, mmap=True, weights_only=True) for path in paths]
        for w in tqdm(specs, desc="Writing Meta shards", unit="tensor"):
            file, name = sources[w.meta]
            with open_safetensors(file) as f:
                tensor = f.get_tensor(name)
            if w.rotary_heads:
                tensor = to_interleaved(tensor, w.rotary_heads)
            pieces = [tensor] * num_shards if w.axis is None else tensor.chunk(num_shards, dim=w.axis)
            for shard, piece in zip(shards, pieces, strict=False):
                shard[w.meta].copy_(piece)
        del shards  # unmapping writes the filled pages back to the files
        if tokenizer is not None:
            (staging / "tokenizer.model").write_bytes(tokenizer.read_bytes())
        sums = [f"{md5sum(path)}  {path.name}" for path in [*paths, staging / "params.json"]]
        (staging / "checklist.chk").write_text("\n".join(sums) + "\n")


def _safetensors_files(input_dir: Path) -> dict[str, str]:
    """Tensor name -> file, from `model.safetensors.index.json` or a single `model.safetensors`."""
    index = input_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ConversionError(f"{index} has no weight_map of tensor names to files; the folder is damaged.")
        return weight_map
    if (input_dir / "model.safetensors").exists():
        with open_safetensors(input_dir / "model.safetensors") as f:
            return {name: "model.safetensors" for name in f.keys()}
    raise ConversionError(f"{input_dir} has neither model.safetensors.index.json nor model.safetensors.")


@contextmanager
def open_safetensors(path: Path) -> Iterator:
    """`safe_open`, with a damaged or missing file reported as bad input."""
    try:
        f = safe_open(path, "pt")
    except Exception as error:  # SafetensorError, FileNotFoundError, ...
        raise ConversionError(
            f"Cannot read {path} as safetensors ({error}); the file is damaged or missing."
        ) from error
    with f:
        yield f
