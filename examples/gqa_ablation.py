"""The Llama 2 paper's attention ablation (Table 18, Appendix A.2.1) in miniature: multi-head (MHA), grouped-query (GQA)
and multi-query (MQA) attention at the same parameter count, on the recipe's built-in task (sorting eight digits).

    python examples/gqa_ablation.py [--output-dir runs/gqa_ablation] [--quick] [--seed 0]

Each variant has the same width, depth and query heads; only the key/value heads differ (8, 2, 1 by default). As in
the paper, the feed-forward width of GQA and MQA grows to make up for their smaller K/V projections, so all three
have the same parameter count (within a fraction of a percent). All three pretrain with the same budget: the same
steps, batches (the same rows in the same order), learning rate and seed. The script then reports, per variant:

- held-out loss (every token of held-out lines, and the answer's tokens alone) and exact-answer accuracy of greedy
  answers to held-out problems asked as raw text `digits=`;
- KV-cache bytes per token, 2 (K and V) * layers * kv_heads * head_dim * bytes per element;
- decode tokens/s at batch 1, 8 and 32 after a long prompt (512 tokens by default), where reading the cache of
  every row at every step is what separates MHA from GQA and MQA. The speed comes from the package's decode loop
  (`decoding.prefill` then `decoding.decode`, what `decoding.generate` runs, eager), timing `decode` alone, in
  interleaved rounds (MHA, GQA, MQA, MHA, ...) of which the medians are reported. The models only ever saw lines of
  76 tokens, so what they write after the long prompt is meaningless; only its speed is measured.

It prints one table, writes `metrics.json` and `gqa_ablation.png` (if matplotlib is installed) under the output
folder. The default takes a few minutes on 2 cores; `--quick` runs the same path on tiny sizes (for the tests), and
its numbers mean nothing.
"""

import argparse
import json
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if str(Path(__file__).resolve().parent) not in sys.path:  # the task module beside this file, however this is loaded
    sys.path.append(str(Path(__file__).resolve().parent))
from arithmetic_task import LENGTH, Problem, equation, is_correct, question, split_problems  # noqa: E402
from llama2_convert.layout import ffn_dim  # noqa: E402
from modeling_llama2 import Llama2Config, Llama2ForCausalLM  # noqa: E402
from modeling_llama2.inference import decoding  # noqa: E402


@dataclass
class Sizes:
    """The default takes a few minutes on 2 cores; `QUICK` only checks the path."""

    hidden_size: int = 256
    num_layers: int = 4
    heads: int = 8
    kv_heads: tuple[int, int, int] = (8, 2, 1)  # MHA, GQA, MQA
    multiple_of: int = 8  # granularity of the matched feed-forward widths
    context: int = 1024  # max_position_embeddings: room for the long prompt and what is decoded after it
    train_problems: int = 20000
    steps: int = 150
    batch: int = 16  # rows of ROW_PROBLEMS problems
    lr: float = 3e-3
    eval_problems: int = 200
    prompt_tokens: int = 512
    new_tokens: int = 32
    batches: tuple[int, ...] = (1, 8, 32)
    rounds: int = 5


QUICK = Sizes(
    hidden_size=64, num_layers=2, heads=4, kv_heads=(4, 2, 1), multiple_of=2, context=128, train_problems=400,
    steps=20, batch=8, eval_problems=16, prompt_tokens=64, new_tokens=8, rounds=2,
)  # fmt: skip
NAMES = ("MHA", "GQA", "MQA")
ROW_PROBLEMS = 4  # problems per training row (4 * 19 = 76 tokens)
# A character vocabulary: on this text (digits and `=`) the recipe's sentencepiece model, which splits digits, does
# little more, and the embeddings are the same size in every variant anyway.
SPECIALS = ("<pad>", "<s>", "</s>")
VOCAB = (*SPECIALS, *"0123456789=")
PAD, BOS, EOS = 0, 1, 2
ID = {c: i for i, c in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    return [BOS] + [ID[c] for c in text]


def decode_text(ids: list[int]) -> str:
    """Characters up to the first EOS, special tokens dropped."""
    ids = ids[: ids.index(EOS)] if EOS in ids else ids
    return "".join(VOCAB[i] for i in ids if i >= len(SPECIALS))


# Parameter matching and the KV cache.


def variant_config(base: dict, kv_heads: int, intermediate_size: int) -> Llama2Config:
    return Llama2Config(**{**base, "num_key_value_heads": kv_heads, "intermediate_size": intermediate_size})


def parameter_count(config: Llama2Config) -> int:
    """The model's parameter count, built on the meta device (no memory, no initialisation), so that it counts
    whatever the model holds (norms, untied head, biases) rather than a formula of it."""
    with torch.device("meta"):
        model = Llama2ForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def matched_intermediate_size(config_like: dict, kv_heads: int, target_params: int, multiple_of: int = 8) -> int:
    """The feed-forward width, a multiple of `multiple_of`, that brings a model with `kv_heads` key/value heads (and
    otherwise `config_like`, Llama2Config's keyword arguments) closest to `target_params` parameters: the paper's way
    of comparing MHA, GQA and MQA at equal size. The count is linear in the width, so two counts locate it."""

    def count(width: int) -> int:
        return parameter_count(variant_config(config_like, kv_heads, width))

    low, high = count(multiple_of), count(2 * multiple_of)
    exact = multiple_of + (target_params - low) * multiple_of / (high - low)
    below = max(1, math.floor(exact / multiple_of)) * multiple_of
    return min((below, below + multiple_of), key=lambda width: abs(count(width) - target_params))


def kv_bytes_per_token(config: Llama2Config, dtype: torch.dtype = torch.float32) -> int:
    """What each cached token costs: a key and a value of `head_dim` per KV head per layer."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element


def variant_configs(sizes: Sizes) -> dict[str, Llama2Config]:
    """MHA at Llama's SwiGLU width (2/3 of 4 * hidden, rounded up), GQA and MQA widened to MHA's parameter count."""
    width = ffn_dim(sizes.hidden_size, sizes.multiple_of)
    base = dict(
        vocab_size=len(VOCAB), hidden_size=sizes.hidden_size, num_hidden_layers=sizes.num_layers,
        num_attention_heads=sizes.heads, max_position_embeddings=sizes.context, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD,
    )  # fmt: skip
    target = parameter_count(variant_config(base, sizes.kv_heads[0], width))
    widths = [width] + [matched_intermediate_size(base, kv, target, sizes.multiple_of) for kv in sizes.kv_heads[1:]]
    return {name: variant_config(base, kv, w) for name, kv, w in zip(NAMES, sizes.kv_heads, widths, strict=True)}


# Training and measuring one variant.


def problem_rows(problems: list[Problem]) -> torch.Tensor:
    """One problem per row: BOS, `51706749=01456779`, EOS (19 tokens)."""
    return torch.tensor([encode(equation(p)) + [EOS] for p in problems])


def pretrain(config: Llama2Config, train: torch.Tensor, sizes: Sizes, seed: int) -> tuple[Llama2ForCausalLM, float]:
    """Next-token prediction on rows of ROW_PROBLEMS problems; the seed fixes both the initialisation and the rows
    drawn, so every variant sees the same data in the same order. Returns the model and its last training loss."""
    torch.manual_seed(seed)
    model = Llama2ForCausalLM(config)
    rows = train[: len(train) // ROW_PROBLEMS * ROW_PROBLEMS].reshape(-1, ROW_PROBLEMS * train.shape[1])
    draws = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sizes.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=sizes.lr, total_steps=sizes.steps, pct_start=0.1)
    model.train()
    for _ in range(sizes.steps):
        batch = rows[torch.randint(len(rows), (sizes.batch,), generator=draws)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return model.eval(), loss.item()


@torch.no_grad()
def evaluate(model: Llama2ForCausalLM, problems: list[Problem]) -> dict:
    """Held-out loss per token (all of each line, and its answer and EOS alone) and exact-answer accuracy of greedy
    answers to `digits=` decoded with the package's `decoding.generate`."""
    rows = problem_rows(problems)
    losses = F.cross_entropy(model(input_ids=rows).logits[:, :-1].transpose(1, 2), rows[:, 1:], reduction="none")
    answer_start = LENGTH + 1  # the target index of the first answer digit (after the digits and `=`)
    prompts = torch.tensor([encode(question(p)) for p in problems])
    new = decoding.generate(model, prompts, max_new_tokens=LENGTH + 1, eos_token_id=EOS, compile=False)
    answers = [decode_text(ids) for ids in new[:, prompts.shape[1] :].tolist()]
    correct = sum(map(is_correct, problems, answers))
    return {
        "loss": losses.mean().item(),
        "answer_loss": losses[:, answer_start:].mean().item(),
        "correct": correct,
        "accuracy": correct / len(problems),
        "sample_answers": [f"{question(p)}{a}" for p, a in zip(problems[:3], answers, strict=False)],
    }


@torch.no_grad()
def decode_seconds(model: Llama2ForCausalLM, prompt: torch.Tensor, batch: int, new_tokens: int) -> float:
    """Wall time of `decoding.decode` for `new_tokens` at `batch` rows after a prefill of `prompt` (untimed): the
    prompt's keys and values are broadcast to every row, so each row attends over the whole prompt."""
    logits, cache = decoding.prefill(model, prompt, prompt.shape[1] + new_tokens, batch_size=batch)
    start = time.perf_counter()
    decoding.decode(model, logits.expand(batch, -1), cache, max_new_tokens=new_tokens, compile=False)
    return time.perf_counter() - start


def decode_speeds(models: dict[str, Llama2ForCausalLM], prompt: torch.Tensor, sizes: Sizes) -> dict[str, dict]:
    """Median decode tokens/s per variant and batch over `sizes.rounds` rounds, the variants interleaved within each
    round (so that a slow spell of the shared machine hits them alike), after one untimed warm-up round. The first
    new token comes from the prefill, so a run of `new_tokens` is `new_tokens - 1` steps."""
    times = {name: {b: [] for b in sizes.batches} for name in models}
    for round_ in range(sizes.rounds + 1):
        for batch in sizes.batches:
            for name, model in models.items():
                seconds = decode_seconds(model, prompt, batch, sizes.new_tokens)
                if round_:
                    times[name][batch].append(seconds)
    steps = sizes.new_tokens - 1
    return {
        name: {str(b): {"tokens_per_s": b * steps / statistics.median(t), "seconds": t} for b, t in per_batch.items()}
        for name, per_batch in times.items()
    }


def long_prompt(problems: list[Problem], length: int) -> torch.Tensor:
    """`length` tokens of held-out lines, one after another, starting with BOS (1, length)."""
    stream = [t for p in problems for t in encode(equation(p))[1:] + [ID["="]]]
    while len(stream) < length:
        stream += stream
    return torch.tensor([[BOS] + stream[: length - 1]])


# Reporting.


def report_table(results: dict[str, dict], sizes: Sizes, eval_problems: int) -> None:
    speeds = "".join(f" {'tok/s b' + str(b):>10s}" for b in sizes.batches)
    print(f"\n{'variant':8s} {'kv heads':>8s} {'ffn':>5s} {'params':>9s} {'loss':>7s} {'ans loss':>8s} "
          f"{'accuracy':>13s} {'KV B/token':>10s}{speeds}")  # fmt: skip
    for name, r in results.items():
        speed = "".join(f" {r['decode'][str(b)]['tokens_per_s']:10.0f}" for b in sizes.batches)
        print(f"{name:8s} {r['kv_heads']:8d} {r['intermediate_size']:5d} {r['parameters']:9,d} {r['loss']:7.4f} "
              f"{r['answer_loss']:8.4f} {r['correct']:4d}/{eval_problems} {r['accuracy']:4.0%} "
              f"{r['kv_bytes_per_token']:10,d}{speed}")  # fmt: skip
    print(f"\nloss: per token of {eval_problems} held-out lines (ans loss: the answer's digits and EOS); accuracy: "
          f"greedy answers to `digits=`; tok/s: decode after a {sizes.prompt_tokens}-token prompt, median of "
          f"{sizes.rounds} interleaved rounds, eager, one thread.\nThe speeds are noisy on a shared machine (other "
          "processes take the cores in turns): compare them within one run, not across runs.")  # fmt: skip


def plot(results: dict[str, dict], sizes: Sizes, path: Path) -> bool:
    """Accuracy, answer loss, KV bytes per token and decode speed per variant; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, key, title in [
        (axes[0], "answer_loss", "held-out answer loss"),
        (axes[1], "accuracy", "held-out exact-answer accuracy"),
        (axes[2], "kv_bytes_per_token", "KV-cache bytes per token"),
    ]:
        ax.bar(names, [results[n][key] for n in names], color=["C0", "C1", "C2"])
        ax.set_title(title)
    for i, name in enumerate(names):
        speeds = [results[name]["decode"][str(b)]["tokens_per_s"] for b in sizes.batches]
        axes[3].plot(sizes.batches, speeds, marker="o", color=f"C{i}", label=name)
    axes[3].set(xscale="log", xticks=list(sizes.batches), xticklabels=list(map(str, sizes.batches)), xlabel="batch",
                title=f"decode tokens/s, {sizes.prompt_tokens}-token prompt (noisy)")  # fmt: skip
    axes[3].legend()
    fig.suptitle(f"MHA vs GQA vs MQA at {results[names[0]]['parameters'] / 1e6:.2f}M parameters, same training budget")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    # One thread: the small kernels gain little from more, and lose much (and get noisier) when cores are shared.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(args.output_dir, sizes, args.seed)
    finally:
        torch.set_num_threads(threads)


def run(out: Path, sizes: Sizes, seed: int) -> dict:
    start = time.perf_counter()
    splits = split_problems(random.Random(seed), {"eval": sizes.eval_problems, "train": sizes.train_problems})
    train = problem_rows(splits["train"])
    configs = variant_configs(sizes)
    results, models = {}, {}
    for name, config in configs.items():
        began = time.perf_counter()
        models[name], final_loss = pretrain(config, train, sizes, seed)
        results[name] = {
            "kv_heads": config.num_key_value_heads,
            "intermediate_size": config.intermediate_size,
            "parameters": sum(p.numel() for p in models[name].parameters()),
            "kv_bytes_per_token": kv_bytes_per_token(config),
            "final_train_loss": final_loss,
            **evaluate(models[name], splits["eval"]),
            "train_seconds": time.perf_counter() - began,
        }
        r = results[name]
        print(f"{name}: {r['kv_heads']} KV heads, ffn {r['intermediate_size']}, {r['parameters']:,} parameters, "
              f"trained in {r['train_seconds']:.0f} s; held-out loss {r['loss']:.4f}, accuracy {r['accuracy']:.1%}; "
              f"e.g. {', '.join(r['sample_answers'])}", flush=True)  # fmt: skip
    began = time.perf_counter()
    speeds = decode_speeds(models, long_prompt(splits["eval"], sizes.prompt_tokens), sizes)
    for name, speed in speeds.items():
        results[name]["decode"] = speed
    decode_wall = time.perf_counter() - began
    report_table(results, sizes, sizes.eval_problems)
    out.mkdir(parents=True, exist_ok=True)
    plotted = plot(results, sizes, out / "gqa_ablation.png")
    if not plotted:
        print("matplotlib is not installed: the plot was skipped (every number is in metrics.json)")
    metrics = {
        "variants": results,
        "sizes": asdict(sizes),
        "seed": seed,
        "eval_problems": sizes.eval_problems,
        "decode": {
            "prompt_tokens": sizes.prompt_tokens,
            "new_tokens": sizes.new_tokens,
            "rounds": sizes.rounds,
            "compile": False,
            "threads": torch.get_num_threads(),
            "seconds": decode_wall,
        },  # fmt: skip
        "seconds": time.perf_counter() - start,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    written = f"{out / 'metrics.json'}" + (f" and {out / 'gqa_ablation.png'}" if plotted else "")
    print(f"wrote {written}; total wall time {metrics['seconds'] / 60:.1f} min")
    return metrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/gqa_ablation"))
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: the same path in seconds (the tests).")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    main()
