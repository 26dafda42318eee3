"""This package's CPU inference against llama.cpp on the same random weights (bench_model's 15m / 125m shapes).

    python benchmarks/bench_llamacpp.py --llama-cpp DIR [--shape 15m|125m] [--rounds 5] [--threads 2]

DIR is a llama.cpp tree built with the `llama-bench` and `llama-batched-bench` targets in `DIR/build` (a llama.cpp
checkout, or the llama-cpp-python sdist with llama.cpp in `vendor/llama.cpp`). The model is saved as a stock
`LlamaForCausalLM` folder with Llama 2's `tokenizer.model` and converted with llama.cpp's `convert_hf_to_gguf.py`
to f32 and q8_0, cached under `--work-dir` by a hash of the weights. Before timing, the GGUFs are checked against
the model: tensor count, parameter count (also llama-bench's), every f32 tensor equal to ours (q and k up to the
converter's row permutation), q8_0 within int8 rounding of it.

Workloads, each the same forward passes on both sides (a prompt's pass yields the first new token):
- decode b=1: 16-token prompt + 128 new tokens; ours `decoding.generate` (compiled step), llama.cpp
  `llama-bench -pg 16,127` (prompt pass + 127 one-token passes), tok/s = 128 / time of the whole call.
- prefill 1x512: ours the model's forward with `logits_to_keep=1` (and, for fp32, also compiled once for all
  prompt lengths: `decoding.run_prompt(..., compile=True)`), llama.cpp `llama-bench -p 512 -n 0`.
- decode b=8: 8 prompts of 16 + 128 new tokens each; ours `decoding.generate` on 8 rows, llama.cpp
  `llama-batched-bench -npp 16 -ntg 127 -npl 8`, tok/s = 8 x 128 / (T_PP + T_TG) (its S_TG, the decode steps
  alone, is printed beside).
Ours: fp32 through `cpu_kernels.use_cpu_kernels`, and `quantization.quantize_int8` in both activation modes;
llama.cpp: f32 and q8_0 (its q8_0 products also round the activations to 8 bits, in blocks of 32). Each round runs
every variant once per workload in a rotated order, after `timing.wait_until_quiet`, llama.cpp as a subprocess with
`-r 1` (its model load and warm-up untimed). Each of our timed calls follows the same warm-up, untimed: the prompt
and one decode step for a decode (llama-bench's warm-up of `-pg`: the prompt pass and one token;
llama-batched-bench's: a 16-token pass), the whole prompt for a prefill (llama-bench's of `-p`): without it our call
was the first after llama.cpp's process and the wait, with cold caches, and llama.cpp's was not. Ratios ours /
llama.cpp (fp32 / f32, int8 / q8_0) are per round, reported as median [95% interval of the median]. "of bandwidth":
weight bytes per token (all but the token embedding) x tok/s / read bandwidth measured in each round (bench_decode's
`memory_bandwidth`).
"""

import argparse
import copy
import datetime
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from bench_decode import memory_bandwidth, weight_bytes
from bench_model import SHAPES, build
from timing import median_interval, print_table, wait_until_quiet

from modeling_llama2.inference import decoding
from modeling_llama2.inference.cpu_kernels import use_cpu_kernels
from modeling_llama2.inference.quantization import Int8Linear, quantize_int8

PROMPT, NEW, LONG, ROWS = 16, 128, 512, 8
TOKENIZER = Path(__file__).resolve().parents[2] / "shared/data/llama2-tokenizer/tokenizer.model"
OURS_INT8 = {"ours int8 weight-only": "float", "ours int8 int8-acts": "int8"}
COMPILED_PREFILL = "ours fp32 cpu kernels, compiled"
BASELINE = {
    "ours fp32 cpu kernels": "llama.cpp f32",
    COMPILED_PREFILL: "llama.cpp f32",
    **dict.fromkeys(OURS_INT8, "llama.cpp q8_0"),
}


def fail(message: str) -> NoReturn:
    print(message, file=sys.stderr)
    sys.exit(2)


def llama_cpp_paths(root: Path) -> dict[str, Path]:
    """llama-bench, llama-batched-bench and convert_hf_to_gguf.py of a built tree, or exit 2 naming what is missing."""
    paths = {"bench": root / "build/bin/llama-bench", "batched": root / "build/bin/llama-batched-bench"}
    paths["convert"] = next(
        (p for p in (root / "convert_hf_to_gguf.py", root / "vendor/llama.cpp/convert_hf_to_gguf.py") if p.exists()),
        root / "convert_hf_to_gguf.py",
    )
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        fail(
            f"--llama-cpp {root}: not a built llama.cpp tree, missing {', '.join(missing)} (build it with `cmake "
            "--build build --target llama-bench llama-batched-bench`)."
        )
    return paths


def fingerprint(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def convert(ref: torch.nn.Module, *, convert_script: Path, tokenizer: Path, work: Path) -> dict[str, Path]:
    """f32 and q8_0 GGUFs of `ref`, converted once per weights (a hash in the file name)."""
    key = f"{ref.config.num_hidden_layers}x{ref.config.hidden_size}-{fingerprint(ref)}"
    ggufs = {kind: work / f"{key}-{kind}.gguf" for kind in ("f32", "q8_0")}
    if all(p.exists() for p in ggufs.values()):
        return ggufs
    folder = work / f"{key}-hf"
    ref.save_pretrained(folder)
    shutil.copy(tokenizer, folder / "tokenizer.model")
    for kind, path in ggufs.items():
        done = subprocess.run(
            [sys.executable, convert_script, folder, "--outtype", kind, "--outfile", path],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            sys.exit(f"{convert_script} failed ({kind}):\n{done.stderr[-3000:]}")
    shutil.rmtree(folder)
    return ggufs


def check_ggufs(ggufs: dict[str, Path], ref: torch.nn.Module, int8: torch.nn.Module, gguf_py: Path) -> dict:
    """Check the GGUFs hold `ref`'s weights; return their tensor and parameter counts, the bytes a decode step
    reads (all but the token embedding) and the relative L2 error of the 8-bit weights, q8_0's and ours."""
    sys.path.insert(0, str(gguf_py))  # the converter's own gguf-py, as the converter itself does
    import gguf

    ours = {
        "token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm",
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    params = {n: p.detach().numpy() for n, p in ref.named_parameters()}
    readers = {kind: gguf.GGUFReader(path) for kind, path in ggufs.items()}
    f32 = {t.name: t for t in readers["f32"].tensors}
    for kind, reader in readers.items():
        if len(reader.tensors) != len(params):
            sys.exit(f"{ggufs[kind]}: {len(reader.tensors)} tensors, the model has {len(params)}")
    for name, tensor in f32.items():
        parts = name.removesuffix(".weight").split(".")
        torch_name = (
            f"{ours[parts[0]]}.weight" if len(parts) == 1 else f"model.layers.{parts[1]}.{ours[parts[2]]}.weight"
        )
        expected, got = params[torch_name], np.asarray(tensor.data).reshape(params[torch_name].shape)
        if parts[-1] in ("attn_q", "attn_k"):  # rows permuted for llama.cpp's rotary layout
            expected, got = np.sort(expected, axis=None), np.sort(got, axis=None)
        if not np.array_equal(expected, got):
            sys.exit(f"{ggufs['f32']}: {name} differs from the model's {torch_name}")

    def rel_error(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    q8 = [t for t in readers["q8_0"].tensors if t.tensor_type != gguf.GGMLQuantizationType.F32]
    q8_error = max(
        rel_error(gguf.quants.dequantize(t.data, t.tensor_type).reshape(f32[t.name].data.shape), f32[t.name].data)
        for t in q8
    )
    int8_error = max(
        rel_error((m.weight.float() * m.weight_scale[:, None]).numpy(), params[f"{name}.weight"])
        for name, m in int8.named_modules()
        if isinstance(m, Int8Linear)
    )
    if q8_error > 0.02:
        sys.exit(f"{ggufs['q8_0']}: q8_0 weights {q8_error:.3f} (relative L2) from the model's, expected < 0.02")
    return {
        "tensors": len(params),
        "n_params": sum(p.size for p in params.values()),
        "step_bytes": {
            kind: sum(int(t.n_bytes) for t in reader.tensors if t.name != "token_embd.weight")
            for kind, reader in readers.items()
        },
        "q8_error": q8_error,
        "int8_error": int8_error,
    }


def run_json(command: list) -> list[dict]:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{done.stderr[-3000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(done.stdout) if done.stdout.lstrip().startswith("[") else [json.loads(x) for x in lines]


def llama_cpp_workloads(paths: dict[str, Path], ggufs: dict[str, Path], threads: int, info: dict) -> dict:
    """workload -> variant -> a callable timing one llama.cpp run, returning seconds (and keeping its last
    report in `info`)."""

    def bench(gguf_path: Path, *args) -> float:
        report = run_json([paths["bench"], "-m", gguf_path, "-t", threads, "-r", 1, "-o", "json", *args])
        if len(report) != 1:
            sys.exit(f"llama-bench gave {len(report)} results, expected 1: {report}")
        info["bench"] = report[0]
        return min(report[0]["samples_ns"]) / 1e9

    def batched(gguf_path: Path) -> float:
        report = run_json(
            [
                paths["batched"], "-m", gguf_path, "-t", threads, "-tb", threads, "-c", ROWS * (PROMPT + NEW),
                "-npp", PROMPT, "-ntg", NEW - 1, "-npl", ROWS, "--output-format", "jsonl",
            ]
        )  # fmt: skip
        if len(report) != 1:
            sys.exit(f"llama-batched-bench gave {len(report)} results, expected 1: {report}")
        info.setdefault("speed_tg", {}).setdefault(gguf_path, []).append(report[0]["speed_tg"])
        return report[0]["t"]

    names = {"f32": "llama.cpp f32", "q8_0": "llama.cpp q8_0"}
    return {
        "decode b=1": {
            names[k]: (lambda p=p: bench(p, "-p", 0, "-n", 0, "-pg", f"{PROMPT},{NEW - 1}")) for k, p in ggufs.items()
        },
        "prefill 1x512": {names[k]: (lambda p=p: bench(p, "-p", LONG, "-n", 0)) for k, p in ggufs.items()},
        "decode b=8": {names[k]: (lambda p=p: batched(p)) for k, p in ggufs.items()},
    }


def timed(fn, warm_up=None):
    """A callable timing one call of `fn` (seconds), after one untimed call of `warm_up` (default: `fn`)."""

    def run() -> float:
        (warm_up or fn)()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, required=True, help="a llama.cpp tree with build/bin/llama-bench")
    parser.add_argument("--shape", choices=SHAPES, default="15m")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="Llama 2's sentencepiece tokenizer.model")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache/modeling_llama2/bench_llamacpp")
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        fail(f"--rounds and --threads must be at least 1, got {args.rounds} and {args.threads}.")
    paths = llama_cpp_paths(args.llama_cpp.resolve())
    if not args.tokenizer.is_file():
        fail(f"--tokenizer {args.tokenizer}: no such file; pass Llama 2's sentencepiece tokenizer.model.")
    started = time.monotonic()
    torch.set_num_threads(args.threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    ours, ref = build(args.shape)
    ggufs = convert(ref, convert_script=paths["convert"], tokenizer=args.tokenizer, work=args.work_dir)
    models = {
        "ours fp32 cpu kernels": use_cpu_kernels(copy.deepcopy(ours)),
        **{variant: quantize_int8(copy.deepcopy(ours), activations=mode) for variant, mode in OURS_INT8.items()},
    }
    check = check_ggufs(ggufs, ref, models["ours int8 weight-only"], paths["convert"].parent / "gguf-py")
    del ours, ref
    step_bytes = {
        "ours fp32 cpu kernels": weight_bytes(models["ours fp32 cpu kernels"]),
        **{variant: weight_bytes(models[variant]) for variant in OURS_INT8},
        "llama.cpp f32": check["step_bytes"]["f32"],
        "llama.cpp q8_0": check["step_bytes"]["q8_0"],
    }

    gen = torch.Generator().manual_seed(0)
    prompt = {b: torch.randint(3, 32000, (b, PROMPT), generator=gen) for b in (1, ROWS)}
    long_prompt = torch.randint(3, 32000, (1, LONG), generator=gen)
    info = {}
    workloads = llama_cpp_workloads(paths, ggufs, args.threads, info)
    for variant, model in models.items():
        for workload, rows in (("decode b=1", 1), ("decode b=8", ROWS)):
            workloads[workload][variant] = timed(
                lambda m=model, p=prompt[rows]: decoding.generate(m, p, max_new_tokens=NEW),
                # the timed call's cache length, so the same compiled step
                warm_up=lambda m=model, p=prompt[rows]: decoding.generate(
                    m, p, max_new_tokens=2, max_cache_len=PROMPT + NEW
                ),
            )
        workloads["prefill 1x512"][variant] = timed(lambda m=model: m(long_prompt, use_cache=True, logits_to_keep=1))
    fp32 = models["ours fp32 cpu kernels"]
    workloads["prefill 1x512"][COMPILED_PREFILL] = timed(lambda: decoding.run_prompt(fp32, long_prompt, compile=True))
    step_bytes[COMPILED_PREFILL] = step_bytes["ours fp32 cpu kernels"]
    units = {"decode b=1": NEW, "prefill 1x512": LONG, "decode b=8": ROWS * NEW}

    with torch.no_grad():
        for variants in workloads.values():  # warm-up: compiles, prepacks, page cache; a failure shows early
            for fn in variants.values():
                fn()
        if info["bench"]["model_n_params"] != check["n_params"]:
            sys.exit(f"llama-bench reports {info['bench']['model_n_params']} parameters, the model has "
                     f"{check['n_params']}")  # fmt: skip
        print(
            f"GGUFs checked: {check['tensors']} tensors, {check['n_params']:,} parameters (llama-bench: "
            f"{info['bench']['model_n_params']:,}), f32 equal to ours; 8-bit weights' relative L2 error (worst "
            f"tensor): q8_0 {check['q8_error']:.4f}, ours int8 {check['int8_error']:.4f}",
            flush=True,
        )
        info["speed_tg"] = {}  # the warm-up's are not samples
        seconds = {w: {v: [] for v in variants} for w, variants in workloads.items()}
        bandwidths, loads = [], []
        for r in range(args.rounds):
            wait_until_quiet()
            bandwidths.append(memory_bandwidth())
            for workload, variants in workloads.items():
                names = list(variants)
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    wait_until_quiet()
                    loads.append(os.getloadavg()[0])
                    seconds[workload][name].append(variants[name]())
            print(f"round {r + 1}/{args.rounds} done, load average {os.getloadavg()[0]:.2f}", flush=True)

    bandwidth = statistics.median(bandwidths)
    rows = []
    for workload, by_variant in seconds.items():
        for variant, times in by_variant.items():
            speeds = [units[workload] / t for t in times]
            row = [workload, variant, f"{statistics.median(speeds):.1f} [{min(speeds):.1f}, {max(speeds):.1f}]"]
            if variant in BASELINE:
                ratios = [b / t for b, t in zip(by_variant[BASELINE[variant]], times, strict=True)]
                row.append("{:.2f} [{:.2f}, {:.2f}]".format(statistics.median(ratios), *median_interval(ratios)))
            else:
                row.append("")
            fraction = step_bytes[variant] * statistics.median(speeds) / bandwidth
            row.append(f"{fraction:.2f}" if workload == "decode b=1" else "")
            rows.append(row)
    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    bench = info["bench"]
    flash_attention = {-1: "auto", 0: "off", 1: "on"}.get(bench["flash_attn"], bench["flash_attn"])
    print_table(
        f"shape {args.shape}, {datetime.date.today()}, {cpu} ({args.threads} threads), torch {torch.__version__}, "
        f"llama.cpp {bench['build_commit']} (flash attention {flash_attention}), {args.rounds} rounds; read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (median of rounds); load average while sampling {min(loads):.2f}-{max(loads):.2f}",
        ["workload", "variant", "tok/s median [min, max]", "ours / llama.cpp [95% CI]", "of bandwidth"],
        rows,
    )
    speed_tg = {Path(p).stem.rsplit("-", 1)[-1]: statistics.median(v) for p, v in info["speed_tg"].items()}
    print(
        "\nllama-batched-bench S_TG (decode steps alone, median): "
        + ", ".join(f"{k} {v:.1f} tok/s" for k, v in speed_tg.items())
        + "; weight MiB per token: "
        + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in step_bytes.items())
        + f"\nwall time {time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
