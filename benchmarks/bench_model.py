"""This package's Llama 2 against transformers' `LlamaForCausalLM` of the same shape and weights, in one process.

    python benchmarks/bench_model.py [--shape 15m|125m] [--rounds 9]

Prints prefill tokens/s (1x512), greedy decode tokens/s (128 new tokens, batch 1 and 8) and training-step
tokens/s, each with the median over rounds of the paired speed ratio ours / transformers, the 95% confidence
interval of that median, and its min and max; then the rise of the process's peak RSS during a call of each
(MiB, median of 3 calls, ours / transformers).
"""

import argparse
import platform

import torch
from timing import paired_ratios, peak_rss_rise, print_table
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_llama2 import Llama2Config, Llama2ForCausalLM

SHAPES = {
    # llama2.c's stories15M
    "15m": dict(hidden_size=288, num_hidden_layers=6, num_attention_heads=6, intermediate_size=768),
    # a 125M GQA shape
    "125m": dict(
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, intermediate_size=2048
    ),
}


def build(shape: str) -> tuple[Llama2ForCausalLM, LlamaForCausalLM]:
    kwargs = dict(vocab_size=32000, max_position_embeddings=1024, rms_norm_eps=1e-5, **SHAPES[shape])
    torch.manual_seed(0)
    ours = Llama2ForCausalLM(Llama2Config(**kwargs)).eval()
    ref = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def workloads(model, batch_prompt: dict[int, torch.Tensor], train_ids: torch.Tensor) -> dict[str, tuple]:
    """name -> (callable, tokens processed per call)."""

    @torch.no_grad()
    def prefill():
        model(batch_prompt["prefill"], use_cache=True, logits_to_keep=1)

    def decode(batch: int):
        @torch.no_grad()
        def run():
            model.generate(batch_prompt[batch], max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)

        return run

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train_step():
        model.train()
        model(train_ids, labels=train_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()

    return {
        "prefill 1x512": (prefill, 512),
        "decode b=1, 128 new": (decode(1), 128),
        "decode b=8, 128 new": (decode(8), 8 * 128),
        "train step 4x256": (train_step, 4 * 256),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="15m")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()

    ours, ref = build(args.shape)
    gen = torch.Generator().manual_seed(0)
    prompts = {
        "prefill": torch.randint(3, 32000, (1, 512), generator=gen),
        1: torch.randint(3, 32000, (1, 16), generator=gen),
        8: torch.randint(3, 32000, (8, 16), generator=gen),
    }
    train_ids = torch.randint(3, 32000, (4, 256), generator=gen)
    ours_work, ref_work = workloads(ours, prompts, train_ids), workloads(ref, prompts, train_ids)

    rows = []
    for name, (fn, tokens) in ours_work.items():
        result = paired_ratios(
            {"transformers": ref_work[name][0], "ours": fn}, baseline="transformers", rounds=args.rounds
        )
        t, o = result["transformers"], result["ours"]
        rows.append(
            [
                name,
                f"{tokens / t['seconds']:.0f}",
                f"{tokens / o['seconds']:.0f}",
                f"{o['ratio']:.2f}",
                "[{:.2f}, {:.2f}]".format(*o["ratio_ci"]),
                f"[{o['ratio_min']:.2f}, {o['ratio_max']:.2f}]",
                f"{peak_rss_rise(fn, calls=3):.0f} / {peak_rss_rise(ref_work[name][0], calls=3):.0f}",
            ]
        )
    print_table(
        f"shape {args.shape}, fp32, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {args.rounds} rounds",
        ["workload", "transformers tok/s", "ours tok/s", "ratio", "95% CI of ratio", "[min, max]", "peak MiB"],
        rows,
    )


if __name__ == "__main__":
    main()
