"""Karpathy's llama2.c checkpoints: the training `ckpt.pt` and the `.bin` files `run.c` reads.

llama2.c's model is Meta's (same tensor names, same interleaved rotary pairs, embedding and output tied
during training), so both formats become a one-shard Meta state dict and go through `meta`'s merge.
"""

from __future__ import annotations

import struct
from pathlib import Path

import torch

from modeling_llama2 import Llama2Config
from modeling_llama2.configuration_llama2 import STOCK_MODEL_TYPE

from . import ConversionError
from .hf import DTYPES, check_output_dir, parse_size, save_hf_checkpoint
from .layout import config_from_params, ffn_dim, ffn_params, is_int, merged_tensors, num_parameters, weights
from .meta import find_tokenizer, resolve_tokenizer, torch_load

MAGIC = 0x616B3432  # "ak42", which starts version 1 and later `.bin` exports
HEADER_V1 = 256


def read_ckpt(path: Path, tokenizer: Path | None) -> tuple[Llama2Config, dict[str, torch.Tensor]]:
    """`ckpt.pt` from llama2.c's train.py: `model_args` and the (maybe `torch.compile`d) `model` state."""
    ckpt = torch_load(path)
    if not isinstance(ckpt, dict) or not {"model", "model_args"} <= ckpt.keys():
        raise ConversionError(
            f"{path} has no 'model' and 'model_args'; it is not a llama2.c training checkpoint (ckpt.pt)."
        )
    args, model = ckpt["model_args"], ckpt["model"]
    if not isinstance(args, dict) or not isinstance(model, dict) or not all(map(torch.is_tensor, model.values())):
        raise ConversionError(
            f"{path}: 'model_args' or 'model' is malformed; it is not a llama2.c training checkpoint."
        )
    sizes = ["dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"]
    sizes += ["hidden_dim"] if args.get("hidden_dim") is not None else ["multiple_of"]
    sizes += ["n_kv_heads"] if args.get("n_kv_heads") is not None else []
    if missing := [key for key in sizes if key not in args]:
        raise ConversionError(
            f"{path}'s model_args lacks {', '.join(missing)}; it is not a llama2.c training checkpoint (ckpt.pt)."
        )
    _check_sizes({key: args[key] for key in sizes}, f"{path}'s model_args")
    state = {name.removeprefix("_orig_mod."): tensor for name, tensor in model.items()}
    hidden = args.get("hidden_dim") or ffn_dim(args["dim"], args["multiple_of"])
    config = _config(
        args["dim"],
        hidden,
        args["n_layers"],
        args["n_heads"],
        args.get("n_kv_heads") or args["n_heads"],
        args["vocab_size"],
        args["max_seq_len"],
        args.get("norm_eps", 1e-5),
        tokenizer,
        f"{path}'s model_args",
    )
    embedding, output = state.get("tok_embeddings.weight"), state.get("output.weight")
    config.tie_word_embeddings = embedding is not None and output is not None and torch.equal(embedding, output)
    return config, state


def read_bin(path: Path, tokenizer: Path | None) -> tuple[Llama2Config, dict[str, torch.Tensor]]:
    """A `.bin` from llama2.c's export.py, version 0 (legacy, header of 7 ints) or 1 (fp32, 256-byte header)."""
    with open(path, "rb") as f:
        header = f.read(HEADER_V1)
    if len(header) < 28:
        raise ConversionError(f"{path} is too short to be a llama2.c export.")
    magic, version = struct.unpack_from("<Ii", header)
    if magic == MAGIC:
        if version != 1:
            raise ConversionError(
                f"{path} is a llama2.c export of version {version}; only versions 0 and 1 (fp32) can be "
                "imported. Export with `python export.py --version 1`."
            )
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", header, 8)
        shared, offset = bool(header[36]), HEADER_V1
    else:  # version 0 flags an untied classifier with a negative vocabulary size
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack_from("<7i", header)
        shared, vocab, offset = vocab > 0, abs(vocab), 28
    sizes = {"dim": dim, "hidden_dim": hidden, "n_layers": layers, "n_heads": heads, "n_kv_heads": kv_heads}
    _check_sizes(sizes | {"vocab_size": vocab, "seq_len": seq_len}, f"{path}'s header")
    config = _config(dim, hidden, layers, heads, kv_heads, vocab, seq_len, 1e-5, tokenizer, f"{path}'s header")
    config.tie_word_embeddings = shared
    # The size the header implies, checked before anything is listed per layer (a damaged header may claim 1e8).
    tables = seq_len * config.head_dim if magic != MAGIC else 0  # version 0's RoPE cos and sin
    expected = offset + 4 * (num_parameters(config) + tables)
    if expected != path.stat().st_size:
        raise ConversionError(
            f"{path} holds {path.stat().st_size:,} bytes but its header describes {expected:,}; "
            "the file is truncated or not a llama2.c export."
        )

    shapes = {w.meta: w.shape for w in weights(config)}
    freqs = (seq_len, config.head_dim // 2)
    per_layer = lambda key: [f"layers.{i}.{key}" for i in range(layers)]  # noqa: E731
    ffn = [
        *per_layer("feed_forward.w1.weight"),
        *per_layer("feed_forward.w2.weight"),
        *per_layer("feed_forward.w3.weight"),
    ]
    attention = [
        *per_layer("attention.wq.weight"),
        *per_layer("attention.wk.weight"),
        *per_layer("attention.wv.weight"),
        *per_layer("attention.wo.weight"),
    ]
    if magic == MAGIC:
        order = [
            *per_layer("attention_norm.weight"),
            *per_layer("ffn_norm.weight"),
            "norm.weight",
            "tok_embeddings.weight",
            *attention,
            *ffn,
        ]
    else:
        order = [
            "tok_embeddings.weight",
            *per_layer("attention_norm.weight"),
            *attention,
            *per_layer("ffn_norm.weight"),
            *ffn,
            "norm.weight",
            "freqs_cos",
            "freqs_sin",
        ]
        shapes |= {"freqs_cos": freqs, "freqs_sin": freqs}
    order += [] if shared else ["output.weight"]

    sizes = [torch.Size(shapes[name]).numel() for name in order]
    data = torch.from_file(str(path), shared=False, size=path.stat().st_size // 4, dtype=torch.float32)
    chunks = zip(order, data[offset // 4 :].split(sizes), strict=True)
    state = {name: chunk.view(shapes[name]) for name, chunk in chunks}
    for name in ("freqs_cos", "freqs_sin"):
        state.pop(name, None)  # version 0's precomputed RoPE tables
    if shared:
        state["output.weight"] = state["tok_embeddings.weight"]
    return config, state


def _config(
    dim: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    vocab: int,
    seq_len: int,
    norm_eps: float,
    tokenizer: Path | None,
    source: str,
) -> Llama2Config:
    params = {
        "dim": dim,
        "n_layers": layers,
        "n_heads": heads,
        "n_kv_heads": kv_heads,
        "vocab_size": vocab,
        "norm_eps": norm_eps,
        **ffn_params(dim, hidden),
    }
    return config_from_params(params, tokenizer=tokenizer, max_position_embeddings=seq_len, source=source)


def _check_sizes(sizes: dict[str, object], source: str) -> None:
    """Refuse sizes that are not positive integers (a damaged or foreign file) before any is computed with."""
    if bad := [f"{key} {value!r}" for key, value in sizes.items() if not (is_int(value) and value > 0)]:
        raise ConversionError(
            f"{source} gives {', '.join(bad)}, which must be positive integers: the file is damaged or not from "
            "llama2.c."
        )


def llama2c_to_hf(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_size: str = "5GB",
    tokenizer: str | Path | None = None,
    model_type: str = STOCK_MODEL_TYPE,
    overwrite: bool = False,
) -> None:
    """Convert a llama2.c `ckpt.pt` or `.bin`; the tokenizer defaults to a `tokenizer.model` beside it."""
    checkpoint = Path(checkpoint)
    output_dir = check_output_dir(output_dir, overwrite=overwrite, inputs=[checkpoint])
    if not checkpoint.is_file():
        raise ConversionError(f"{checkpoint} is not a file; pass a llama2.c ckpt.pt or exported .bin.")
    tokenizer = resolve_tokenizer(tokenizer, find_tokenizer(checkpoint.parent))
    config, state = (read_bin if checkpoint.suffix == ".bin" else read_ckpt)(checkpoint, tokenizer)
    save_hf_checkpoint(
        output_dir,
        config,
        merged_tensors([state], [checkpoint.name], config),
        dtype=DTYPES[dtype] if dtype else None,
        max_shard_size=parse_size(max_shard_size),
        tokenizer=tokenizer,
        chat=False,
        model_type=model_type,
    )
