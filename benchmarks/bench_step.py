"""The decode step compiled ahead of time (`inference.ahead_of_time`, the CPU's default) against the
`torch.compile` step it replaced, paired in one process: `decoding.generate` with each, same model, prompt and
cache length.

    python benchmarks/bench_step.py [--shape 15m|125m] [--rounds 9] [--batches 1,8]

Variants: fp32 through `cpu_kernels.use_cpu_kernels`, int8 weight-only and int8 activations (`quantize_int8`);
16-token prompts, 128 new tokens. Each timed call follows one untimed call of the same variant (its compile on the
first). Ratios are torch.compile seconds / ahead-of-time seconds (> 1: the ahead-of-time step is faster), median
and 95% interval of the median over rounds; also the first call of each (its compile included).
"""

import argparse
import copy
import datetime
import time
from unittest import mock

import torch
from bench_model import SHAPES, build
from timing import paired_ratios, print_table

from modeling_llama2.inference import decoding
from modeling_llama2.inference.cpu_kernels import use_cpu_kernels
from modeling_llama2.inference.quantization import quantize_int8

PROMPT, NEW = 16, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="15m")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ours, _ = build(args.shape)
    models = {
        "fp32 cpu kernels": use_cpu_kernels(copy.deepcopy(ours)),
        "int8 weight-only": quantize_int8(copy.deepcopy(ours), activations="float"),
        "int8 int8-acts": quantize_int8(copy.deepcopy(ours), activations="int8"),
    }
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompt = torch.randint(3, 32000, (batch, PROMPT), generator=gen)
        for name, model in models.items():

            def run(model=model, prompt=prompt):
                return decoding.generate(model, prompt, max_new_tokens=NEW)

            def torch_compile(run=run):
                with mock.patch.object(decoding, "ahead_of_time_step", lambda *a: None):
                    return run()

            first = {}
            for label, fn in (("ahead of time", run), ("torch.compile", torch_compile)):
                start = time.perf_counter()
                tokens = fn()
                first[label] = time.perf_counter() - start
                first[label + " tokens"] = tokens
            if not torch.equal(first["ahead of time tokens"], first["torch.compile tokens"]):
                raise SystemExit(f"{name}, batch {batch}: the two steps' greedy tokens differ")
            stats = paired_ratios({"torch.compile": torch_compile, "ahead of time": run}, "torch.compile", args.rounds)
            aot = stats["ahead of time"]
            rows.append([
                f"{batch}", name,
                f"{batch * NEW / stats['torch.compile']['seconds']:.0f}", f"{batch * NEW / aot['seconds']:.0f}",
                "{:.2f} [{:.2f}, {:.2f}]".format(aot["ratio"], *aot["ratio_ci"]),
                f"{first['torch.compile']:.1f} / {first['ahead of time']:.1f}",
            ])  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)
    print_table(
        f"shape {args.shape}, {datetime.date.today()}, torch {torch.__version__}, 2 threads, {args.rounds} rounds",
        ["batch", "model", "torch.compile tok/s", "AOT tok/s", "speed-up [95% CI]", "first call s (tc / aot)"],
        rows,
    )


if __name__ == "__main__":
    main()
