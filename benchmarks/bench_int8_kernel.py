"""`int8_rows_linear` of this tree against the same kernel at another git revision, paired in one process.

    python benchmarks/bench_int8_kernel.py --baseline REV [--rounds 15] [--rows 1,8]

The baseline's `int8_rows_linear.cpp` (with its `vector.h`) is built beside the package's own under another op
namespace, so both run in one process on the same tensors, their outputs checked equal first. Shapes: the 15M and
125M products and wider rows, weights in cache (each timed call repeats one product). Each round times the
baseline, then this tree; ratios baseline seconds / ours (> 1: ours faster), median and quartiles over rounds.
"""

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from timing import print_table
from torch.utils import cpp_extension

from modeling_llama2 import torch_internals
from modeling_llama2.inference import cpu_kernels

SOURCES = Path("modeling_llama2/inference")
SHAPES = [(32000, 288), (8000, 288), (1536, 288), (864, 288), (288, 768), (2304, 768), (12000, 768), (4000, 2048)]
SHAPES += [(1024, 8192)]  # Llama 2 7B's widest inputs


def build_baseline(revision: str) -> None:
    """The kernel at `revision`, registered as `baseline_kernels::int8_rows_linear`."""
    work = Path(tempfile.mkdtemp(prefix="int8_kernel_"))
    for name in ("int8_rows_linear.cpp", "vector.h"):
        text = subprocess.run(
            ["git", "show", f"{revision}:{SOURCES / name}"], check=True, capture_output=True, text=True
        ).stdout
        text = text.replace("TORCH_LIBRARY_FRAGMENT(modeling_llama2_kernels", "TORCH_LIBRARY(baseline_kernels")
        text = text.replace("TORCH_LIBRARY_IMPL(modeling_llama2_kernels", "TORCH_LIBRARY_IMPL(baseline_kernels")
        (work / name).write_text(text)
    cpp_extension.load(
        name=f"baseline_int8_{revision}",
        sources=[str(work / "int8_rows_linear.cpp")],
        extra_cflags=cpu_kernels.KERNEL_CFLAGS,  # built as the package builds its own
        extra_ldflags=cpu_kernels.KERNEL_LDFLAGS,
        is_python_module=False,
    )


def seconds(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="a git revision of this repository")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rows", default="1,8", help="comma-separated numbers of rows")
    args = parser.parse_args()
    torch.set_num_threads(2)
    assert cpu_kernels.rows_kernel(), "the package's kernels could not be built"
    build_baseline(args.baseline)
    ours, baseline = torch.ops.modeling_llama2_kernels.int8_rows_linear, torch.ops.baseline_kernels.int8_rows_linear
    levels = 127 if torch_internals.FBGEMM_REDUCE_RANGE else 255
    gen = torch.Generator().manual_seed(0)
    table = []
    for rows in (int(r) for r in args.rows.split(",")):
        for out, inputs in SHAPES:
            x = torch.randn(rows, inputs, generator=gen)
            w = torch.randint(-127, 128, (out, inputs), dtype=torch.int8, generator=gen)
            scale = torch.rand(out, generator=gen)
            assert torch.equal(ours(x, [w], [scale], levels), baseline(x, [w], [scale], levels))
            calls = max(20, int(2e8 / w.numel()))
            ratios, ours_s = [], []
            for _ in range(args.rounds):
                theirs = seconds(lambda: baseline(x, [w], [scale], levels), calls)
                ours_s.append(seconds(lambda: ours(x, [w], [scale], levels), calls))
                ratios.append(theirs / ours_s[-1])
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            ratio = f"{statistics.median(ratios):.2f} [{q1:.2f}, {q3:.2f}]"
            gbps = w.numel() / statistics.median(ours_s) / 1e9
            table.append([str(rows), f"{out} x {inputs}", ratio, f"{gbps:.1f}"])
    print_table(
        f"int8_rows_linear against {args.baseline}, levels {levels}, {args.rounds} rounds",
        ["rows", "weight (out x in)", "baseline / ours, median [quartiles]", "ours GB/s"],
        table,
    )


if __name__ == "__main__":
    main()
