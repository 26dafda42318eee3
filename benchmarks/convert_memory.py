"""Time and peak memory of `llama2-convert` on a synthetic many-layer Meta checkpoint.

Builds a random bfloat16 checkpoint in Meta's format (default: about 2 GB in 2 shards), then runs
`meta-to-hf` and `hf-to-meta` in subprocesses while sampling `/proc/<pid>/status`. `RssAnon` is the
private memory the conversion itself allocates; `RssFile` counts pages of memory-mapped files, which
the kernel can drop at any time. The goal is peak `RssAnon` under 25% of the checkpoint size.

    python benchmarks/convert_memory.py [--layers 72] [--dim 1024] [--shards 2] [--workdir /tmp/convert-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from llama2_convert.layout import ffn_dim

ROOT = Path(__file__).resolve().parents[1]


def build_checkpoint(folder: Path, *, dim: int, layers: int, shards: int, vocab: int) -> int:
    """Write a random Meta checkpoint shard by shard (one shard in memory at a time); return its size."""
    heads, ffn = dim // 64, ffn_dim(dim, multiple_of=256)
    params = {
        "dim": dim,
        "n_layers": layers,
        "n_heads": heads,
        "multiple_of": 256,
        "norm_eps": 1e-5,
        "vocab_size": vocab,
    }
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    rand = lambda *shape: torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.05, 0.05)  # noqa: E731
    for rank in range(shards):
        shard = {
            "tok_embeddings.weight": rand(vocab, dim // shards),
            "norm.weight": torch.ones(dim, dtype=torch.bfloat16),
            "output.weight": rand(vocab // shards, dim),
        }
        for i in range(layers):
            p = f"layers.{i}."
            shard |= {
                p + "attention.wq.weight": rand(dim // shards, dim),
                p + "attention.wk.weight": rand(dim // shards, dim),
                p + "attention.wv.weight": rand(dim // shards, dim),
                p + "attention.wo.weight": rand(dim, dim // shards),
                p + "feed_forward.w1.weight": rand(ffn // shards, dim),
                p + "feed_forward.w2.weight": rand(dim, ffn // shards),
                p + "feed_forward.w3.weight": rand(ffn // shards, dim),
                p + "attention_norm.weight": torch.ones(dim, dtype=torch.bfloat16),
                p + "ffn_norm.weight": torch.ones(dim, dtype=torch.bfloat16),
            }
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")
        del shard
    return sum(p.stat().st_size for p in folder.glob("consolidated.*.pth"))


def measure(args: list[str]) -> dict[str, float]:
    """Run a command, sampling its memory every 10 ms; return wall time and peaks in bytes."""
    start = time.perf_counter()
    process = subprocess.Popen(args, cwd=ROOT, stderr=subprocess.DEVNULL)
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
        except FileNotFoundError:
            break
        for line in status.splitlines():
            key, _, value = line.partition(":")
            if key in peaks:
                peaks[key] = max(peaks[key], int(value.split()[0]) * 1024)
        time.sleep(0.01)
    if process.wait():
        raise SystemExit(f"{' '.join(args)} failed with exit code {process.returncode}")
    return {"seconds": time.perf_counter() - start, **peaks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=72)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/convert-bench"))
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    size = build_checkpoint(
        args.workdir / "meta", dim=args.dim, layers=args.layers, shards=args.shards, vocab=args.vocab
    )
    convert = [sys.executable, "-m", "llama2_convert"]
    runs = {
        "python + torch + transformers imports only": measure(
            [sys.executable, "-c", "import llama2_convert.meta, llama2_convert.llama2c"]
        ),
        f"meta-to-hf ({args.shards} shards -> safetensors)": measure(
            [
                *convert,
                "meta-to-hf",
                "--input-dir",
                str(args.workdir / "meta"),
                "--output-dir",
                str(args.workdir / "hf"),
            ]
        ),
        f"hf-to-meta (safetensors -> {args.shards} shards)": measure(
            [
                *convert,
                "hf-to-meta",
                "--input-dir",
                str(args.workdir / "hf"),
                "--output-dir",
                str(args.workdir / "back"),
                "--num-shards",
                str(args.shards),
            ]
        ),
    }
    gb = 1e9
    print(f"checkpoint: {size / gb:.2f} GB bfloat16, {args.layers} layers, dim {args.dim}, {args.shards} shards\n")
    print("| run | time (s) | peak RssAnon (GB) | RssAnon / checkpoint | peak RssFile (GB) | peak VmRSS (GB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in runs.items():
        print(
            f"| {name} | {r['seconds']:.1f} | {r['RssAnon'] / gb:.3f} | {r['RssAnon'] / size:.1%} "
            f"| {r['RssFile'] / gb:.3f} | {r['VmRSS'] / gb:.3f} |"
        )
    shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
