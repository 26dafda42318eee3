"""SFT throughput and memory: this package's `run_sft` against TRL's `SFTTrainer` on the same model, data and packing.

    pip install trl  # not a dependency of the package
    python benchmarks/bench_sft.py [--rounds 3] [--steps 30] [--samples 2000] [--max-length 512] [--batch-size 4]

A random Llama 2 model (hidden 256, 4 layers, vocabulary 32000, the Llama 2 tokenizer with this package's chat template)
and synthetic chat dialogs of one to three turns. Both trainers pack whole samples into rows of --max-length tokens
without padding (ours `PackedRows`, TRL's "bfd" packing, padding-free) and take the loss on the assistant answers only
(TRL: `assistant_only_loss=True`, through the template's `{% generation %}` markers), with the same optimizer settings.
TRL runs twice: with its defaults, which turn gradient checkpointing on (less memory, a recomputed forward), and
without it, as ours trains.

Each run is a fresh process with a fresh datasets cache, as a first run is: the peak RSS (`ru_maxrss`) is then the
whole run's, from reading and tokenizing the data to the last step, and owes nothing to what an earlier run left in the
allocator or the cache. Each round runs the three in turn (order rotated) and pairs them: a round's ratio is ours / a
TRL run's useful tokens per second of training (`train_runtime`), useful being the tokens the loss is taken on
(neither prompt nor padding, counted from each batch's labels), and ours / its peak RSS. Prints the median [95%
interval, or min and max with too few rounds] of the ratios over rounds.
"""

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from timing import median_interval, print_table, wait_until_quiet

# Row names; TRL's version goes into the braces.
VARIANTS = {
    "ours": "ours (run_sft)",
    "trl": "TRL {} SFTTrainer, its defaults",
    "trl-no-checkpointing": "TRL {}, no gradient checkpointing",
}
REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "data" / "llama2-tokenizer" / "tokenizer.model"
MODEL = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    max_position_embeddings=4096, rms_norm_eps=1e-5,
)  # fmt: skip
WORDS = (
    "the of and to in is it that for on with as was at by this be from or are an have not they which one you had "
    "her all she there would their we him been has when who will more no if out so said what up its about into than "
    "them can only other new some could time these two may then do first any my now such like our over man me even "
    "most made after also did many before must through back years where much your way well down should because each "
    "just those people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against go came "
    "right used take three question answer model train data token chat loss packing memory speed learn"
).split()


def text(rng: random.Random, words: int) -> str:
    sentence = " ".join(rng.choice(WORDS) for _ in range(words))
    return sentence[0].upper() + sentence[1:] + "."


def dialogs(n: int, seed: int = 0) -> list[dict]:
    """`n` chat records: an optional system prompt, then one to three user/assistant turns; each fits in 512 tokens."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        messages = [{"role": "system", "content": text(rng, rng.randint(5, 20))}] if rng.random() < 0.3 else []
        for _ in range(rng.choice((1, 1, 2, 3))):
            messages.append({"role": "user", "content": text(rng, rng.randint(5, 40))})
            messages.append({"role": "assistant", "content": text(rng, rng.randint(10, 80))})
        records.append({"messages": messages})
    return records


def prepare(workdir: Path, tokenizer_model: Path, samples: int) -> None:
    """The model folder (random weights, with the chat tokenizer) and `sft.jsonl`."""
    from llama2_convert.tokenizer import save_tokenizer, token_config
    from modeling_llama2 import Llama2Config, Llama2ForCausalLM
    from modeling_llama2.alignment.training import write_jsonl

    torch.manual_seed(0)
    Llama2ForCausalLM(Llama2Config(**MODEL, **token_config(tokenizer_model))).save_pretrained(workdir / "model")
    save_tokenizer(tokenizer_model, workdir / "model", chat=True, model_max_length=MODEL["max_position_embeddings"])
    write_jsonl(workdir / "sft.jsonl", dialogs(samples))


def count_useful_tokens() -> list[int]:
    """Count, in every training step of this process, the label positions the loss is taken on (not -100). Both
    trainers are `Trainer`s, whose `training_step` receives the batch; returns the one-element running total."""
    from transformers import Trainer

    total, step = [0], Trainer.training_step

    def counted(self, model, inputs, *args, **kwargs):
        total[0] += int((inputs["labels"] != -100).sum())
        return step(self, model, inputs, *args, **kwargs)

    Trainer.training_step = counted
    return total


def worker(name: str, workdir: Path, args: argparse.Namespace) -> dict:
    """One training run in this process; its speed and the process's peak RSS."""
    from transformers import TrainingArguments

    useful = count_useful_tokens()
    common = dict(
        output_dir=str(workdir / f"out-{name}"), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=2e-5, lr_scheduler_type="cosine", logging_steps=10, save_strategy="no", report_to="none",
        use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    model, data = str(workdir / "model"), str(workdir / "sft.jsonl")
    if name == "ours":
        from modeling_llama2.alignment.sft import SFTArguments, run_sft
        from modeling_llama2.alignment.training import ModelArguments

        training_args = TrainingArguments(
            **common, remove_unused_columns=False, include_num_input_tokens_seen="non_padding"
        )
        metrics = run_sft(ModelArguments(model=model), SFTArguments(dataset=data, max_length=args.max_length),
                          training_args)  # fmt: skip
        checkpointing = training_args.activation_checkpointing
    else:  # "trl" (TRL's defaults) or "trl-no-checkpointing"
        from datasets import load_dataset
        from transformers import AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        from modeling_llama2 import Llama2ForCausalLM

        off = {"activation_checkpointing": False} if name == "trl-no-checkpointing" else {}  # TRL's default is on
        config = SFTConfig(**common, max_length=args.max_length, packing=True, assistant_only_loss=True, **off)
        trainer = SFTTrainer(
            model=Llama2ForCausalLM.from_pretrained(model), args=config, processing_class=AutoTokenizer.from_pretrained(
                model), train_dataset=load_dataset("json", data_files=data, split="train"),
        )  # fmt: skip
        metrics = trainer.train().metrics
        checkpointing = trainer.model.is_gradient_checkpointing
    return {
        "checkpointing": checkpointing,
        "useful_tokens": useful[0],
        "seconds": metrics["train_runtime"],
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def run(name: str, workdir: Path, args: argparse.Namespace, cache: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    command = [sys.executable, __file__, "--worker", name, "--workdir", str(workdir), "--steps", str(args.steps),
               "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"the {name} run failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    if measured["checkpointing"] != (name == "trl"):
        raise SystemExit(f"the {name} run trained with gradient checkpointing {measured['checkpointing']}")
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tokenizer", type=Path, default=TOKENIZER, help="Llama 2's tokenizer.model.")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, args)))
        return
    try:
        import trl
    except ImportError:
        raise SystemExit("bench_sft.py compares against TRL: pip install trl") from None
    if not args.tokenizer.is_file():
        raise SystemExit(f"{args.tokenizer}: no such file; pass --tokenizer PATH to Llama 2's tokenizer.model")

    load_before, names = os.getloadavg()[0], list(VARIANTS)
    runs = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepare(workdir, args.tokenizer, args.samples)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                wait_until_quiet()
                runs[name].append(run(name, workdir, args, cache=workdir / f"cache-{name}-{r}"))
                print(f"round {r + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)

    def speed(result: dict) -> float:
        return result["useful_tokens"] / result["seconds"]

    def interval(values: list[float]) -> str:
        return "{:.2f} [{:.2f}, {:.2f}]".format(statistics.median(values), *median_interval(values))

    rows = []
    for name in names:
        speeds, peaks = [speed(r) for r in runs[name]], [r["peak_rss_gb"] for r in runs[name]]
        ratios = [speed(o) / speed(r) for o, r in zip(runs["ours"], runs[name], strict=True)]
        memory = [o["peak_rss_gb"] / r["peak_rss_gb"] for o, r in zip(runs["ours"], runs[name], strict=True)]
        rows.append([
            VARIANTS[name].format(trl.__version__),
            f"{statistics.median(speeds):,.0f} [{min(speeds):,.0f}, {max(speeds):,.0f}]",
            f"{statistics.median(r['useful_tokens'] for r in runs[name]) / args.steps:,.0f}",
            f"{statistics.median(peaks):.2f} [{min(peaks):.2f}, {max(peaks):.2f}]",
            "" if name == "ours" else interval(ratios),
            "" if name == "ours" else interval(memory),
        ])  # fmt: skip
    print_table(
        f"SFT, {args.samples} chat samples, max length {args.max_length}, batch {args.batch_size}, packed, "
        f"{args.steps} steps, {args.rounds} paired rounds; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
        f"load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after",
        ["trainer", "useful tokens/s, median [min, max]", "useful tokens/step", "peak RSS GB, median [min, max]",
         "speed ours / this [CI]", "peak RSS ours / this [CI]"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
