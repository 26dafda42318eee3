"""Meta's release format (`consolidated.XX.pth` + `params.json` + `checklist.chk`) <-> Hugging Face checkpoints.

The tensors' names, shapes, splits and rotary layout are `layout`'s; this module reads and writes the files.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from pathlib import Path

import torch
from safetensors import safe_open
from torch.serialization import set_default_mmap_options, skip_data
from tqdm import tqdm

from modeling_llama2 import Llama2Config, torch_internals
from modeling_llama2.configuration_llama2 import STOCK_MODEL_TYPE

from . import ConversionError
from .hf import DTYPES, SAFETENSORS_DTYPES, check_output_dir, parse_size, save_hf_checkpoint, staging_dir
from .layout import config_from_params, merged_tensors, params_from_config, some_names, to_interleaved, weights

STORED_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
LLAMA2_POSITIONS = 4096


def torch_load(path: Path):
    """Memory-map a checkpoint, unpickling nothing but tensors and plain containers: a malicious file
    cannot run code."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:
        raise ConversionError(f"Cannot read {path} as a tensors-only PyTorch checkpoint: {error}") from error


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A Meta shard: a dict of tensors, memory-mapped."""
    state = torch_load(path)
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ConversionError(f"{path} holds no dict of tensors; it is not a Meta checkpoint shard.")
    return state


def verify_checksums(input_dir: Path) -> None:
    """Check the md5 sums Meta ships in `checklist.chk`, if there is one."""
    checklist = input_dir / "checklist.chk"
    if not checklist.exists():
        return
    entries = [line.split() for line in checklist.read_text().splitlines() if line.strip()]
    if missing := [name for _, name in entries if not (input_dir / name).exists()]:
        raise ConversionError(
            f"checklist.chk lists {some_names(missing)}, which is not in {input_dir}; the download is incomplete."
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
    return next((p for p in (input_dir / "tokenizer.model", input_dir.parent / "tokenizer.model") if p.exists()), None)


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
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_output_dir(output_dir, overwrite=overwrite)
    if not (input_dir / "params.json").exists():
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
    tokenizer = Path(tokenizer) if tokenizer else find_tokenizer(input_dir)
    if not skip_checksum:
        verify_checksums(input_dir)
    config = config_from_params(
        json.loads((input_dir / "params.json").read_text()),
        tokenizer=tokenizer,
        max_position_embeddings=max_position_embeddings,
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
        overwrite=overwrite,
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
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_output_dir(output_dir, overwrite=overwrite)
    try:
        torch_internals.require(torch_internals.META_EXPORT)
    except RuntimeError as error:
        raise ConversionError(str(error)) from error
    if not (input_dir / "config.json").exists():
        raise ConversionError(
            f"{input_dir / 'config.json'} not found; --input-dir must be a Hugging Face checkpoint folder."
        )
    tokenizer = Path(tokenizer) if tokenizer else input_dir / "tokenizer.model"
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
    except ValueError as error:
        raise ConversionError(str(error)) from error
    files = _safetensors_files(input_dir)
    specs = weights(config)
    # Where each Meta tensor comes from, checked before anything is written; a tied lm_head is the embedding.
    sources, dtypes = {}, {}
    for w in specs:
        name = "model.embed_tokens.weight" if config.tie_word_embeddings and w.hf == "lm_head.weight" else w.hf
        if name not in files:
            raise ConversionError(f"{input_dir} has no tensor {name}; it is not a complete Llama checkpoint.")
        with safe_open(input_dir / files[name], "pt") as f:
            stored = f.get_slice(name)
            shape, dtype = tuple(stored.get_shape()), stored.get_dtype()
        if shape != w.shape:
            raise ConversionError(f"{input_dir}: {name} has shape {shape}, but config.json gives {w.shape}.")
        if dtype not in STORED_DTYPES:
            raise ConversionError(f"{input_dir}: {name} is {dtype}; Meta checkpoints hold F16, BF16 or F32 weights.")
        sources[w.meta], dtypes[w.meta] = (input_dir / files[name], name), STORED_DTYPES[dtype]

    with staging_dir(output_dir, overwrite=overwrite) as staging:
        (staging / "params.json").write_text(json.dumps(params_from_config(config), indent=2) + "\n")
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
            with safe_open(file, "pt") as f:
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
        return json.loads(index.read_text())["weight_map"]
    if (input_dir / "model.safetensors").exists():
        with safe_open(input_dir / "model.safetensors", "pt") as f:
            return {name: "model.safetensors" for name in f.keys()}
    raise ConversionError(f"{input_dir} has neither model.safetensors.index.json nor model.safetensors.")
