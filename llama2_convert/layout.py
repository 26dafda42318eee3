"""The Llama 2 weight layout, in Meta's naming and in Hugging Face's: every tensor's name in both, its shape, how
Meta's model-parallel shards split it, the rotary permutation between the two, and `params.json` <-> config.

Meta saves one file per model-parallel rank, as fairscale split the layers: column-parallel ones
(`wq`, `wk`, `wv`, `w1`, `w3`, `output`) along dim 0, row-parallel ones (`wo`, `w2`) and the embedding
along dim 1, with every rank holding the same copy of each RMSNorm. Meta's rotary embedding rotates
interleaved pairs (0, 1), (2, 3), ... of each head, transformers' rotates halves (i, i + head_dim/2), so
the rows of `wq` and `wk` are permuted within each head; attention scores are unchanged. llama2.c uses
Meta's names and layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from modeling_llama2 import Llama2Config

from . import ConversionError
from .hf import LazyTensor
from .tokenizer import token_config

IGNORED_KEYS = {"rope.freqs"}  # Meta's precomputed rotary frequencies, recomputed by every model


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


def merged_tensors(shards: list[dict[str, torch.Tensor]], sources: list[str], config: Llama2Config) -> list[LazyTensor]:
    """Check every shard holds exactly the tensors `config` needs, in its shape, and return the Hugging
    Face tensors, each merged from the shards only when it is written."""
    specs = weights(config)
    expected = {w.meta for w in specs}
    for shard, source in zip(shards, sources, strict=False):
        found = set(shard) - IGNORED_KEYS
        if missing := sorted(expected - found):
            raise ConversionError(
                f"{source} lacks {some_names(missing)}: it does not hold the model params.json describes."
            )
        if extra := sorted(found - expected):
            raise ConversionError(
                f"{source} has unexpected tensors {some_names(extra)}: it does not hold the model params.json "
                "describes."
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
        for piece, source in zip(pieces[1:], sources[1:], strict=False):
            if not torch.equal(piece, pieces[0]):
                raise ConversionError(
                    f"{w.meta} differs between {sources[0]} and {source}, though every shard holds a copy of "
                    "it; the shards come from different checkpoints."
                )
        return pieces[0]
    merged = torch.cat(pieces, dim=w.axis) if len(pieces) > 1 else pieces[0]
    return to_rotate_half(merged, w.rotary_heads) if w.rotary_heads else merged


def some_names(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
