"""Meta's release format (`consolidated.XX.pth` + `params.json`) <-> Hugging Face checkpoints.

Meta saves one file per model-parallel rank, as fairscale split the layers: column-parallel ones
(`wq`, `wk`, `wv`, `w1`, `w3`, `output`) along dim 0, row-parallel ones (`wo`, `w2`) and the embedding
along dim 1, with every rank holding the same copy of each RMSNorm. Meta's rotary embedding rotates
interleaved pairs (0, 1), (2, 3), ... of each head, transformers' rotates halves (i, i + head_dim/2), so
the rows of `wq` and `wk` are permuted within each head; attention scores are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.serialization import set_default_mmap_options, skip_data
from tqdm import tqdm
from transformers import AutoConfig

from modeling_llama2 import Llama2Config

from . import ConversionError
from .hf import DTYPES, SAFETENSORS_DTYPES, LazyTensor, check_output_dir, parse_size, save_hf_checkpoint, staging_dir
from .tokenizer import token_config

STORED_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
IGNORED_KEYS = {"rope.freqs"}  # Meta's precomputed rotary frequencies, recomputed by every model
LLAMA2_POSITIONS = 4096


@dataclass(frozen=True)
class Weight:
    """One weight matrix in both namings, with how Meta split it across model-parallel ranks."""

    meta: str
    hf: str
    shape: tuple[int, ...]
    axis: int | None  # dim split across ranks; None for replicated tensors
    rotary_heads: int | None = None  # heads whose rows are permuted between the two RoPE layouts

    def shard_shape(self, num_shards: int) -> tuple[int, ...]:
        if self.axis is None:
            return self.shape
        if self.shape[self.axis] % num_shards:
            raise ConversionError(
                f"{self.meta} of shape {self.shape} cannot be split into {num_shards} equal shards "
                f"along dim {self.axis}."
            )
        return tuple(n // num_shards if dim == self.axis else n for dim, n in enumerate(self.shape))


def weights(config: Llama2Config) -> list[Weight]:
    """Every weight of the model, in the order the Hugging Face files list them."""
    dim, ffn, vocab, head_dim = config.hidden_size, config.intermediate_size, config.vocab_size, config.head_dim
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    result = [Weight("tok_embeddings.weight", "model.embed_tokens.weight", (vocab, dim), 1)]
    for i in range(config.num_hidden_layers):
        meta, hf = f"layers.{i}.", f"model.layers.{i}."
        result += [
            Weight(meta + "attention_norm.weight", hf + "input_layernorm.weight", (dim,), None),
            Weight(meta + "attention.wq.weight", hf + "self_attn.q_proj.weight", (heads * head_dim, dim), 0, heads),
            Weight(
                meta + "attention.wk.weight", hf + "self_attn.k_proj.weight", (kv_heads * head_dim, dim), 0, kv_heads
            ),
            Weight(meta + "attention.wv.weight", hf + "self_attn.v_proj.weight", (kv_heads * head_dim, dim), 0),
            Weight(meta + "attention.wo.weight", hf + "self_attn.o_proj.weight", (dim, heads * head_dim), 1),
            Weight(meta + "ffn_norm.weight", hf + "post_attention_layernorm.weight", (dim,), None),
            Weight(meta + "feed_forward.w1.weight", hf + "mlp.gate_proj.weight", (ffn, dim), 0),
            Weight(meta + "feed_forward.w3.weight", hf + "mlp.up_proj.weight", (ffn, dim), 0),
            Weight(meta + "feed_forward.w2.weight", hf + "mlp.down_proj.weight", (dim, ffn), 1),
        ]
    return result + [
        Weight("norm.weight", "model.norm.weight", (dim,), None),
        Weight("output.weight", "lm_head.weight", (vocab, dim), 0),
    ]


def to_rotate_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from Meta's interleaved order (x0, y0, x1, y1, ...) to (x0, x1, ..., y0, y1, ...)."""
    rows, cols = w.shape
    return w.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def to_interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `to_rotate_half`."""
    rows, cols = w.shape
    return w.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU width as Meta's `FeedForward` computes it: 2/3 of 4 * dim, scaled, rounded up to `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def ffn_params(dim: int, hidden: int) -> dict:
    """`multiple_of` (and `ffn_dim_multiplier` where needed) for which `ffn_dim` gives `hidden`, preferring
    the round numbers Meta uses: 11008 for dim 4096 is multiple_of 256, 28672 for 8192 is 4096 and 1.3."""
    ratio = hidden / int(2 * 4 * dim / 3)
    for multiplier in (None, round(ratio, 1), round(ratio, 2), round(ratio, 4)):
        for multiple_of in (2**k for k in range(12, -1, -1)):
            if ffn_dim(dim, multiple_of, multiplier) == hidden:
                return {"multiple_of": multiple_of} | ({} if multiplier is None else {"ffn_dim_multiplier": multiplier})
    raise ConversionError(
        f"No multiple_of/ffn_dim_multiplier in params.json can express intermediate_size {hidden} for dim {dim}."
    )


def config_from_params(params: dict, *, tokenizer: Path | None, max_position_embeddings: int) -> Llama2Config:
    """The model config `params.json` describes; `vocab_size: -1` means the tokenizer's size."""
    missing = [
        key for key in ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps", "vocab_size") if key not in params
    ]
    if missing:
        raise ConversionError(f"params.json lacks {', '.join(missing)}; it does not look like a Llama 2 params.json.")
    tokens = token_config(tokenizer) if tokenizer else {}
    if params["vocab_size"] > 0:
        if tokens.get("vocab_size", 0) > params["vocab_size"]:
            raise ConversionError(
                f"{tokenizer} has {tokens['vocab_size']} pieces, more than params.json's vocab_size "
                f"{params['vocab_size']}: it belongs to another model; pass the right --tokenizer."
            )
        tokens["vocab_size"] = params["vocab_size"]
    elif not tokens:
        raise ConversionError(
            "params.json has vocab_size -1, meaning the tokenizer's size, and no tokenizer.model lies in or "
            "above --input-dir; pass --tokenizer PATH."
        )
    return Llama2Config(
        hidden_size=params["dim"],
        intermediate_size=ffn_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=params["n_heads"],
        num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
        rms_norm_eps=params["norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))},
        max_position_embeddings=max_position_embeddings,
        **tokens,
    )


def params_from_config(config: Llama2Config) -> dict:
    """The `params.json` Meta's code builds `config`'s model from."""
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "norm_eps": config.rms_norm_eps,
        **ffn_params(config.hidden_size, config.intermediate_size),
    }
    theta = config.rope_parameters["rope_theta"]
    return params | ({"rope_theta": theta} if theta != 10000.0 else {})  # Llama 2's ModelArgs has no rope_theta


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


def merged_tensors(shards: list[dict[str, torch.Tensor]], sources: list[str], config: Llama2Config) -> list[LazyTensor]:
    """Check every shard holds exactly the tensors `config` needs, in its shape, and return the Hugging
    Face tensors, each merged from the shards only when it is written."""
    specs = weights(config)
    expected = {w.meta for w in specs}
    for shard, source in zip(shards, sources):
        found = set(shard) - IGNORED_KEYS
        if missing := sorted(expected - found):
            raise ConversionError(f"{source} lacks {_some(missing)}: it does not hold the model params.json describes.")
        if extra := sorted(found - expected):
            raise ConversionError(
                f"{source} has unexpected tensors {_some(extra)}: it does not hold the model params.json describes."
            )
        for w in specs:
            if tuple(shard[w.meta].shape) != w.shard_shape(len(shards)):
                raise ConversionError(
                    f"{source}: {w.meta} has shape {tuple(shard[w.meta].shape)}, but params.json split into "
                    f"{len(shards)} shard(s) gives {w.shard_shape(len(shards))}; the shard and params.json "
                    "belong to different models."
                )
    return [
        LazyTensor(
            w.hf, w.shape, shards[0][w.meta].dtype, partial(_merge, w, [shard[w.meta] for shard in shards], sources)
        )
        for w in specs
        if not (config.tie_word_embeddings and w.hf == "lm_head.weight")
    ]


def _merge(w: Weight, pieces: list[torch.Tensor], sources: list[str]) -> torch.Tensor:
    if w.axis is None:
        for piece, source in zip(pieces[1:], sources[1:]):
            if not torch.equal(piece, pieces[0]):
                raise ConversionError(
                    f"{w.meta} differs between {sources[0]} and {source}, though every shard holds a copy of "
                    "it; the shards come from different checkpoints."
                )
        return pieces[0]
    merged = torch.cat(pieces, dim=w.axis) if len(pieces) > 1 else pieces[0]
    return to_rotate_half(merged, w.rotary_heads) if w.rotary_heads else merged


def _some(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def verify_checksums(input_dir: Path) -> None:
    """Check the md5 sums Meta ships in `checklist.chk`, if there is one."""
    checklist = input_dir / "checklist.chk"
    if not checklist.exists():
        return
    entries = [line.split() for line in checklist.read_text().splitlines() if line.strip()]
    if missing := [name for _, name in entries if not (input_dir / name).exists()]:
        raise ConversionError(
            f"checklist.chk lists {_some(missing)}, which is not in {input_dir}; the download is incomplete."
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
        overwrite=overwrite,
    )


def hf_to_meta(input_dir: str | Path, output_dir: str | Path, *, num_shards: int, overwrite: bool = False) -> None:
    """Split a Hugging Face checkpoint into `num_shards` Meta shards, the exact inverse of `meta_to_hf`.

    Each shard is first saved as a data-less skeleton, then memory-mapped shared and filled tensor by
    tensor, so memory stays near one tensor rather than one shard.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    check_output_dir(output_dir, overwrite=overwrite)
    if not (input_dir / "config.json").exists():
        raise ConversionError(
            f"{input_dir / 'config.json'} not found; --input-dir must be a Hugging Face checkpoint folder."
        )
    config = AutoConfig.from_pretrained(input_dir)
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
        with FakeTensorMode():
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
            for shard, piece in zip(shards, pieces):
                shard[w.meta].copy_(piece)
        del shards  # unmapping writes the filled pages back to the files
        tokenizer = input_dir / "tokenizer.model"
        if tokenizer.exists():
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
