"""Inference speed of `modeling_llama2.inference.decoding` (static cache, compiled step; fp32 weights through
`nn.Linear` or
`cpu_kernels.use_cpu_kernels`'s kernels, or int8 weights with float or int8 activations) against
transformers' `LlamaForCausalLM` of the same shape and weights, in one process.

    python benchmarks/bench_decode.py [--shape 15m|125m] [--rounds 9] [--new-tokens 128] [--workloads decode1,...]

Variants are timed round-robin with `timing.paired_ratios`; ratios are against transformers' default
`generate` (or forward, for prefill). Each speed is also given as a fraction of this machine's limit, measured
here: decode by weight bytes per step over memory bandwidth, prefill by FLOPs over fp32 matmul throughput,
best-of-N by both (one prompt's prefill FLOPs plus every step's weight bytes). Peak memory is the rise of the
process's peak RSS during one call, so it includes compile caches and allocator slack.
"""

import argparse
import copy
import datetime
from functools import partial

import torch
import transformers
from bench_model import build
from timing import best_of, paired_ratios, peak_rss_rise, print_table
from transformers import CompileConfig

from modeling_llama2.inference import decoding
from modeling_llama2.inference.cpu_kernels import use_cpu_kernels
from modeling_llama2.inference.quantization import ACTIVATIONS, quantize_int8


def memory_bandwidth() -> float:
    """Bytes/s of reading a 512 MiB fp32 tensor (a sum streams it once)."""
    x = torch.ones(128 * 2**20)
    return x.numel() * 4 / best_of(x.sum, repeats=5)


def matmul_flops() -> float:
    """fp32 FLOP/s of a 2048^3 matmul."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / best_of(lambda: a @ b, repeats=5)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every parameter and buffer except the embedding table (one row is read)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if "embed_tokens" not in n)


def prefill_flops(config, tokens: int) -> float:
    """Matmul FLOPs of a prefill keeping one logit row: 2 per weight per token, plus causal attention."""
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size
    attention = 2 * tokens * tokens * h  # QK^T and PV over the lower triangle
    return config.num_hidden_layers * (2 * per_layer * tokens + attention) + 2 * h * config.vocab_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["15m", "125m"], default="15m")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--workloads", default="decode1,decode8,prefill,best-of", help="comma-separated subset of the default"
    )
    args = parser.parse_args()
    new, n = args.new_tokens, 16

    ours, ref = build(args.shape)
    kernels = use_cpu_kernels(copy.deepcopy(ours))
    int8 = {f"ours int8, {mode} acts": quantize_int8(copy.deepcopy(ours), activations=mode) for mode in ACTIVATIONS}
    config = ours.config
    gen = torch.Generator().manual_seed(0)
    prompt = {b: torch.randint(3, 32000, (b, 16), generator=gen) for b in (1, 8)}
    long_prompt = torch.randint(3, 32000, (1, 512), generator=gen)
    bo_prompt = torch.randint(3, 32000, (1, 256), generator=gen)
    compiled = CompileConfig(fullgraph=True)
    compiled._compile_all_devices = True  # transformers compiles the CPU decode step only when asked this way

    def generate_call(model, batch: int, **kwargs):  # greedy `generate` of exactly `new` tokens
        return lambda: model.generate(
            prompt[batch], max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, **kwargs
        )

    def hf(batch: int, **kwargs):
        return generate_call(ref, batch, **kwargs)

    def fast(model, batch: int):
        return lambda: decoding.generate(model, prompt[batch], max_new_tokens=new)

    def routed(batch: int, **kwargs):  # what a `generate` user gets: `generate_routing`'s static-cache step
        return generate_call(ours, batch, cache_implementation="static", **kwargs)

    def best_of(model, **kwargs):
        return lambda: model.generate(
            bo_prompt, do_sample=True, num_return_sequences=n, max_new_tokens=new, min_new_tokens=new, top_k=0,
            pad_token_id=0, **kwargs,
        )  # fmt: skip

    workloads = {  # key -> (name, tokens or samples per call, {variant: callable})
        "decode1": (
            "decode b=1",
            new,
            {
                "transformers": hf(1),
                "transformers static+compile": hf(1, cache_implementation="static", compile_config=compiled),
                "ours compiled": fast(ours, 1),
                "ours generate static, eager": routed(1, disable_compile=True),
                "ours generate static+compile_config": routed(1, compile_config=CompileConfig(fullgraph=True)),
                "ours cpu kernels": fast(kernels, 1),
                **{variant: fast(model, 1) for variant, model in int8.items()},
            },
        ),
        "decode8": (
            "decode b=8",
            8 * new,
            {
                "transformers": hf(8),
                "transformers static+compile": hf(8, cache_implementation="static", compile_config=compiled),
                "ours compiled": fast(ours, 8),
                "ours generate static, eager": routed(8, disable_compile=True),
                "ours generate static+compile_config": routed(8, compile_config=CompileConfig(fullgraph=True)),
                "ours cpu kernels": fast(kernels, 8),
                **{variant: fast(model, 8) for variant, model in int8.items()},
            },
        ),
        "prefill": (
            "prefill 1x512",
            512,
            {
                "transformers": lambda: ref(long_prompt, use_cache=True, logits_to_keep=1),
                "ours": lambda: decoding.prefill(ours, long_prompt, 512 + new),
                "ours cpu kernels": lambda: decoding.prefill(kernels, long_prompt, 512 + new),
                "ours cpu kernels, compiled": lambda: decoding.prefill(kernels, long_prompt, 512 + new, compile=True),
                **{variant: partial(decoding.prefill, m, long_prompt, 512 + new) for variant, m in int8.items()},
            },
        ),
        "best-of": (
            f"best-of-{n}, 256 + {new}",
            n,
            {
                "transformers": best_of(ref),
                "ours generate static, eager": best_of(ours, cache_implementation="static", disable_compile=True),
                "ours compiled": lambda: decoding.sample_n(ours, bo_prompt, n=n, max_new_tokens=new),
                "ours cpu kernels": lambda: decoding.sample_n(kernels, bo_prompt, n=n, max_new_tokens=new),
                **{
                    variant: partial(decoding.sample_n, model, bo_prompt, n=n, max_new_tokens=new)
                    for variant, model in int8.items()
                },
            },
        ),
    }
    workloads = {key: workloads[key] for key in args.workloads.split(",")}

    bandwidth, flops = memory_bandwidth(), matmul_flops()
    int8_bytes = weight_bytes(next(iter(int8.values())))
    bytes_per_step = dict.fromkeys(int8, int8_bytes)
    rows = []
    with torch.no_grad():
        # Also the warm-up (and compiles), all before any timing so that a failure shows early.
        memory = {
            key: {v: peak_rss_rise(fn) for v, fn in variants.items()} for key, (_, _, variants) in workloads.items()
        }
        for key, (name, units, variants) in workloads.items():
            result = paired_ratios(variants, baseline="transformers", rounds=args.rounds)
            for variant, r in result.items():
                step_bytes = bytes_per_step.get(variant, weight_bytes(ours))
                if key.startswith("decode"):
                    limit = units / new * bandwidth / step_bytes
                elif key == "prefill":
                    limit = units * flops / prefill_flops(config, units)
                else:
                    limit = units / (prefill_flops(config, 256) / flops + new * step_bytes / bandwidth)
                speed = units / r["seconds"]
                rows.append(
                    [
                        name,
                        variant,
                        f"{speed:.1f}",
                        f"{speed / limit:.2f}",
                        f"{r['ratio']:.2f} [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]",
                        f"{memory[key][variant]:.0f}",
                    ]
                )
                print(" | ".join(rows[-1]), flush=True)  # progress: a run takes many minutes on a busy machine

    cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    print_table(
        f"shape {args.shape}, {datetime.date.today()}, {cpu} ({torch.get_num_threads()} threads), torch "
        f"{torch.__version__}, transformers {transformers.__version__}, {args.rounds} rounds; measured limits: "
        f"{bandwidth / 1e9:.1f} GB/s read, {flops / 1e9:.0f} GFLOP/s fp32 matmul; fp32 weights "
        f"{weight_bytes(ours) / 2**20:.0f} MiB/step, int8 {int8_bytes / 2**20:.0f} MiB/step",
        ["workload", "variant", "tok/s (samples/s)", "of limit", "ratio vs transformers", "peak MiB"],
        rows,
    )


if __name__ == "__main__":
    main()
