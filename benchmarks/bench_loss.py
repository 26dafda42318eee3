"""The causal-LM loss alone: this package's `causal_lm_loss` against transformers' `ForCausalLMLoss`, forward and
backward on random logits, in one process.

    python benchmarks/bench_loss.py [--tokens 1024] [--vocab 32000] [--rounds 9]

Prints, for fp32 and bf16 logits, the milliseconds of forward + backward, the median [95% interval] of the paired
speed ratio ours / transformers, and the rise of the process's peak RSS during one call (MiB, median of 3).

glibc keeps some freed blocks for reuse, so by default the peak column can miss allocations. With
`MALLOC_MMAP_THRESHOLD_=65536` in the environment every allocation over 64 KiB is mapped on its own and unmapped
when freed, so the peak RSS follows the live tensors exactly (the timings are then slower and not representative).
"""

import argparse
import platform

import torch
from timing import paired_ratios, peak_rss_rise, print_table
from transformers.loss.loss_utils import ForCausalLMLoss

from modeling_llama2.loss_llama2 import causal_lm_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        logits = torch.randn(1, args.tokens, args.vocab, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, args.vocab, (1, args.tokens))

        def call(loss_fn):
            return lambda: torch.autograd.grad(loss_fn(logits, labels, args.vocab), logits)

        variants = {"transformers": call(ForCausalLMLoss), "ours": call(causal_lm_loss)}
        result = paired_ratios(variants, baseline="transformers", rounds=args.rounds)
        peak = {name: peak_rss_rise(fn, calls=3) for name, fn in variants.items()}
        for name, timing in result.items():
            rows.append(
                [
                    str(dtype).removeprefix("torch."),
                    name,
                    f"{timing['seconds'] * 1e3:.0f}",
                    "{:.2f} [{:.2f}, {:.2f}]".format(timing["ratio"], *timing["ratio_ci"]),
                    f"{peak[name]:.0f}",
                ]
            )
    print_table(
        f"{args.tokens} tokens x {args.vocab} vocabulary, forward + backward, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.rounds} rounds",
        ["logits", "loss", "ms", "ratio [95% CI]", "peak MiB"],
        rows,
    )


if __name__ == "__main__":
    main()
