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

import json
import math
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError

from modeling_llama2 import Llama2Config

from . import ConversionError
from .hf import LazyTensor, tokenizer_error
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


# Meta's Llama 3.1 `apply_scaling` constants, which `use_scaled_rope: true` in params.json switches on.
LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON `true` is no layer count


def is_number(value: object) -> bool:
    return is_int(value) or isinstance(value, float)


# Keys of params.json (Meta's `ModelArgs`): a test of the value and what it must be. `max_batch_size` and
# `max_seq_len` size Meta's KV cache at inference and do not change the model.
PARAMS = {
    "dim": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "n_layers": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "n_heads": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "n_kv_heads": (lambda v: v is None or (is_int(v) and v > 0), "a positive integer or null"),
    "multiple_of": (lambda v: is_int(v) and v > 0, "a positive integer"),
    "ffn_dim_multiplier": (lambda v: v is None or (is_number(v) and v > 0), "a positive number or null"),
    "norm_eps": (is_number, "a number"),
    "vocab_size": (lambda v: is_int(v) and (v > 0 or v == -1), "a positive integer, or -1 for the tokenizer's size"),
    "rope_theta": (is_number, "a number"),
    "use_scaled_rope": (lambda v: isinstance(v, bool), "true or false"),
    "max_batch_size": (lambda v: True, ""),
    "max_seq_len": (lambda v: True, ""),
}


REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "multiple_of", "norm_eps", "vocab_size")


def check_params(params: object, source: str = "params.json") -> None:
    """Refuse settings Meta's code would not build the intended model from: missing, unknown or ill-typed keys."""
    if not isinstance(params, dict):
        raise ConversionError(f"{source} holds {type(params).__name__}, not an object of model settings.")
    if missing := [key for key in REQUIRED_PARAMS if key not in params]:
        raise ConversionError(f"{source} lacks {', '.join(missing)}; it does not look like a Llama 2 params.json.")
    if unknown := sorted(set(params) - set(PARAMS)):
        raise ConversionError(
            f"{source} has keys this converter does not know: {', '.join(unknown)}. They may change the model "
            "(another Llama generation?), so it is not converted; remove them if you know they are harmless."
        )
    for key, value in params.items():
        valid, kind = PARAMS[key]
        if not valid(value):
            raise ConversionError(f"{source}: {key} is {json.dumps(value)}; it must be {kind}.")


def config_from_params(
    params: dict, *, tokenizer: Path | None, max_position_embeddings: int, source: str = "params.json"
) -> Llama2Config:
    """The model config `params.json` describes; `vocab_size: -1` means the tokenizer's size."""
    check_params(params, source)
    try:
        tokens = token_config(tokenizer) if tokenizer else {}
    except (ValueError, RuntimeError) as error:
        raise tokenizer_error(tokenizer, error) from error
    if params["vocab_size"] > 0:
        if tokens.get("vocab_size", 0) > params["vocab_size"]:
            raise ConversionError(
                f"{tokenizer} has {tokens['vocab_size']} pieces, more than {source}'s vocab_size "
                f"{params['vocab_size']}: it belongs to another model; pass the right --tokenizer."
            )
        tokens["vocab_size"] = params["vocab_size"]
    elif not tokens:
        raise ConversionError(
            f"{source} has vocab_size -1, meaning the tokenizer's size, and no tokenizer.model lies in or "
            "above --input-dir; pass --tokenizer PATH."
        )
    try:
        rope = {"rope_type": "default", "rope_theta": float(params.get("rope_theta", 10000.0))}
        if params.get("use_scaled_rope"):
            rope |= {"rope_type": "llama3", **LLAMA3_ROPE}
        return Llama2Config(
            hidden_size=params["dim"],
            intermediate_size=ffn_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")),
            num_hidden_layers=params["n_layers"],
            num_attention_heads=params["n_heads"],
            num_key_value_heads=params.get("n_kv_heads") or params["n_heads"],
            rms_norm_eps=float(params["norm_eps"]),
            rope_parameters=rope,
            max_position_embeddings=max_position_embeddings,
            **tokens,
        )
    except (ValueError, OverflowError, StrictDataclassError) as error:  # OverflowError: a number past float's range
        raise ConversionError(f"{source} describes no valid model: {str(error).strip()}") from error


def params_from_config(config: Llama2Config) -> dict:
    """The `params.json` Meta's code builds `config`'s model from, after refusing what it cannot say."""
    rope = dict(config.rope_parameters)
    theta, rope_type = rope.pop("rope_theta"), rope.pop("rope_type", "default")
    scaled = rope_type == "llama3" and {k: rope.get(k) for k in LLAMA3_ROPE} == LLAMA3_ROPE
    window = getattr(config, "sliding_window", None)  # a Mistral config relabelled as Llama
    problems = {
        f"RoPE {rope_type} {rope}": rope_type != "default" and not scaled,
        f"hidden_act {config.hidden_act}": config.hidden_act != "silu",
        "attention_bias": config.attention_bias,
        "mlp_bias": config.mlp_bias,
        f"head_dim {config.head_dim} (not dim / n_heads)": config.head_dim * config.num_attention_heads
        != config.hidden_size,
        f"sliding_window {window}": window is not None,
    }
    if found := [problem for problem, present in problems.items() if present]:
        raise ConversionError(
            f"Meta's params.json cannot express {', '.join(found)}: the Meta checkpoint would be another model."
        )
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "norm_eps": config.rms_norm_eps,
        **ffn_params(config.hidden_size, config.intermediate_size),
    }
    params |= {"rope_theta": theta} if theta != 10000.0 else {}  # Llama 2's ModelArgs has no rope_theta
    return params | ({"use_scaled_rope": True} if scaled else {})


def num_parameters(config: Llama2Config) -> int:
    """The element count of `weights(config)` (without a tied `lm_head`), computed without listing them: a
    params.json may claim a billion layers, and that is checked against the files first."""
    dim, ffn, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    attention = (2 * config.num_attention_heads + 2 * config.num_key_value_heads) * head_dim * dim
    layer = 2 * dim + attention + 3 * dim * ffn
    return config.vocab_size * dim * (1 if config.tie_word_embeddings else 2) + dim + config.num_hidden_layers * layer


def check_layer_count(names: list[str], config: Llama2Config, source: str, prefix: str = "") -> None:
    """Refuse a config that claims more layers than `source` holds, before anything is built per layer."""
    pattern = re.compile(rf"{re.escape(prefix)}layers\.(\d+)\.")
    held = len({match[1] for name in names if (match := pattern.match(name))})
    if config.num_hidden_layers > held:
        raise ConversionError(
            f"{source} holds {held} layers, but the model's settings give {config.num_hidden_layers}: the settings "
            "and the weights belong to different models."
        )


def merged_tensors(shards: list[dict[str, torch.Tensor]], sources: list[str], config: Llama2Config) -> list[LazyTensor]:
    """Check every shard holds exactly the tensors `config` needs, in its shape, and return the Hugging
    Face tensors, each merged from the shards only when it is written."""
    for shard, source in zip(shards, sources, strict=False):
        check_layer_count(list(shard), config, source)
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
            if not shard[w.meta].dtype.is_floating_point:
                raise ConversionError(
                    f"{source}: {w.meta} holds {shard[w.meta].dtype} values; Llama weights are floating point, so "
                    "this is a quantized or foreign checkpoint, which cannot be converted."
                )
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
