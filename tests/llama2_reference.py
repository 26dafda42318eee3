"""Test helpers written from Meta's and llama2.c's code, independently of `conversion`: Meta's forward
pass on Meta's own layout, random checkpoints in Meta's and llama2.c's formats, a small sentencepiece model."""

from __future__ import annotations

import hashlib
import json
import math
import random
import struct
from pathlib import Path

import sentencepiece
import torch
import torch.nn.functional as F

# Model-parallel split dim of each Meta weight (fairscale Column-/RowParallelLinear, ParallelEmbedding).
SPLIT_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w2": 1, "w3": 0, "output": 0}


def hidden_dim(params: dict) -> int:
    hidden = int(2 * (4 * params["dim"]) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    return params["multiple_of"] * ((hidden + params["multiple_of"] - 1) // params["multiple_of"])


def random_state(params: dict, vocab: int, *, dtype=torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dim, heads = params["dim"], params["n_heads"]
    kv_dim = (params.get("n_kv_heads") or heads) * dim // heads
    ffn = hidden_dim(params)
    rand = lambda *shape: (torch.randn(*shape, generator=g) / math.sqrt(shape[-1])).to(dtype)  # noqa: E731
    norm = lambda: (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)  # noqa: E731
    state = {"tok_embeddings.weight": torch.randn(vocab, dim, generator=g).to(dtype)}
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        state |= {
            p + "attention.wq.weight": rand(dim, dim),
            p + "attention.wk.weight": rand(kv_dim, dim),
            p + "attention.wv.weight": rand(kv_dim, dim),
            p + "attention.wo.weight": rand(dim, dim),
            p + "feed_forward.w1.weight": rand(ffn, dim),
            p + "feed_forward.w2.weight": rand(dim, ffn),
            p + "feed_forward.w3.weight": rand(ffn, dim),
            p + "attention_norm.weight": norm(),
            p + "ffn_norm.weight": norm(),
        }
    return state | {"norm.weight": norm(), "output.weight": rand(vocab, dim)}


def meta_shards(state: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    """Split like Meta's model-parallel ranks saved them, `rope.freqs` included."""
    shards = []
    for rank in range(num_shards):
        shard = {}
        for name, tensor in state.items():
            dim = SPLIT_DIM.get(name.split(".")[-2])
            shard[name] = tensor.clone() if dim is None else tensor.chunk(num_shards, dim)[rank].clone()
        shards.append(shard | {"rope.freqs": torch.rand(8)})
    return shards


def write_meta_checkpoint(folder: Path, params: dict, shards: list[dict[str, torch.Tensor]]) -> Path:
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    for rank, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
    sums = [f"{hashlib.md5(p.read_bytes()).hexdigest()}  {p.name}" for p in sorted(folder.iterdir())]
    (folder / "checklist.chk").write_text("\n".join(sums) + "\n")
    return folder


def meta_forward(state: dict[str, torch.Tensor], params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Llama 2's `Transformer.forward` (llama/model.py), complex rotary embedding on interleaved pairs."""
    dim, heads = params["dim"], params["n_heads"]
    kv_heads, head_dim, eps = params.get("n_kv_heads") or heads, dim // heads, params["norm_eps"]
    batch, seq = tokens.shape
    inv_freq = 1.0 / (params.get("rope_theta", 10000.0) ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs_cis = torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq).float(), inv_freq))

    def rope(x):
        x = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x * freqs_cis[None, :, None, :]).flatten(3)

    def rms_norm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    mask = torch.full((seq, seq), float("-inf")).triu(1)
    h = state["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        w = {name.split(".", 2)[2]: t for name, t in state.items() if name.startswith(f"layers.{i}.")}
        x = rms_norm(h, w["attention_norm.weight"])
        q = rope((x @ w["attention.wq.weight"].T).view(batch, seq, heads, head_dim))
        k = rope((x @ w["attention.wk.weight"].T).view(batch, seq, kv_heads, head_dim))
        v = (x @ w["attention.wv.weight"].T).view(batch, seq, kv_heads, head_dim)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=2) for t in (k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        attention = F.softmax(q @ k.transpose(2, 3) / math.sqrt(head_dim) + mask, dim=-1) @ v
        h = h + attention.transpose(1, 2).reshape(batch, seq, dim) @ w["attention.wo.weight"].T
        x = rms_norm(h, w["ffn_norm.weight"])
        h = (
            h
            + (F.silu(x @ w["feed_forward.w1.weight"].T) * (x @ w["feed_forward.w3.weight"].T))
            @ w["feed_forward.w2.weight"].T
        )
    return rms_norm(h, state["norm.weight"]) @ state["output.weight"].T


def write_llama2c_bin(path: Path, params: dict, state: dict[str, torch.Tensor], *, version: int, seq_len: int) -> None:
    """llama2.c export.py's `legacy_export` (version 0) and `version1_export`."""
    layers = range(params["n_layers"])
    per_layer = lambda key: [state[f"layers.{i}.{key}.weight"] for i in layers]  # noqa: E731
    shared = torch.equal(state["tok_embeddings.weight"], state["output.weight"])
    vocab = state["tok_embeddings.weight"].shape[0]
    dims = [
        params["dim"],
        hidden_dim(params),
        params["n_layers"],
        params["n_heads"],
        params.get("n_kv_heads") or params["n_heads"],
    ]
    attention = [
        *per_layer("attention.wq"),
        *per_layer("attention.wk"),
        *per_layer("attention.wv"),
        *per_layer("attention.wo"),
    ]
    ffn = [*per_layer("feed_forward.w1"), *per_layer("feed_forward.w2"), *per_layer("feed_forward.w3")]
    with open(path, "wb") as f:
        if version == 0:
            f.write(struct.pack("7i", *dims, vocab if shared else -vocab, seq_len))
            head_dim = params["dim"] // params["n_heads"]
            freqs = torch.rand(seq_len, head_dim // 2)
            tensors = [
                state["tok_embeddings.weight"],
                *per_layer("attention_norm"),
                *attention,
                *per_layer("ffn_norm"),
                *ffn,
                state["norm.weight"],
                freqs.cos(),
                freqs.sin(),
            ]
        else:
            f.write(struct.pack("I", 0x616B3432) + struct.pack("i", version) + struct.pack("7i", *dims, vocab, seq_len))
            f.write(struct.pack("B", int(shared)))
            f.write(b"\0" * (256 - f.tell()))
            tensors = [
                *per_layer("attention_norm"),
                *per_layer("ffn_norm"),
                state["norm.weight"],
                state["tok_embeddings.weight"],
                *attention,
                *ffn,
            ]
        for tensor in tensors + ([] if shared else [state["output.weight"]]):
            f.write(tensor.float().numpy().tobytes())


CORPUS = [
    "Hello world",
    " leading space",
    "   three leading spaces and  two   inner",
    "trailing spaces   ",
    "new\nlines\n\nand a tab\tinside",
    "Digits 1234567890 and 3.14159, 2024-01-31",
    "Accents: café, naïve, Ångström, São Paulo, Dvořák",
    "CJK: 東京は日本の首都です。北京欢迎你",
    "Emoji: 🙂 🦙 👩‍💻",
    "Rare symbols ⅋ ∰ ⧫ and control \x07 bytes",
    "def f(x):\n    return x ** 2  # code",
    "",
    " ",
    "\n",
]


def train_sentencepiece(
    prefix: Path, *, vocab_size: int = 400, normalization: str = "identity", lines: list[str] | None = None, **options
) -> Path:
    """A small BPE model trained like Llama 2's: byte fallback, split digits, no normalization (`options`
    override sentencepiece trainer settings)."""
    rng = random.Random(0)
    words = "the a llama model token space café naïve 東京 数据 🙂 12 345 def return x = y + 1 ( ) : . , ?".split()
    if lines is None:
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 15))) for _ in range(1000)]
    options = {"model_type": "bpe", "remove_extra_whitespaces": False, **options}
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, normalization_rule_name=normalization,
        allow_whitespace_only_pieces=True, character_coverage=0.995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2, **options,
    )  # fmt: skip
    return prefix.with_suffix(".model")
