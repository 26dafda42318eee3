"""The Llama 2 recipe in miniature, end to end, on a built-in task (sorting digits): minutes on 2 cores, no downloads.

    python examples/recipe.py [--output-dir runs/recipe] [--quick] [--seed 0] [--finetune-best-of 16]

1. trains a sentencepiece tokenizer and pretrains a tiny Llama 2 (grouped-query attention) on raw text
   (`51706749=01456779`), briefly, so that it sorts well but not perfectly and the later stages have room to improve;
2. saves it in Meta's raw format (`consolidated.00.pth`, `params.json`, `tokenizer.model`) with
   `llama2-convert hf-to-meta`, and converts that back with `llama2-convert meta-to-hf --chat`;
3. loads the result with `AutoModelForCausalLM` and fine-tunes it on chat-formatted instructions, loss on answers
   only (`run_sft`);
4. trains a helpfulness reward model on preference pairs, right answer over one of the SFT model's own wrong
   samples, whose rating margin grows with how wrong it is (`run_reward_model`);
5. samples N = 1..16 answers per new prompt, keeps the reward model's favourite (of 16, or of the first
   `--finetune-best-of`) and fine-tunes the SFT model on those (`rejection_sample`, then `run_sft`); no reference
   answer is used in this stage. A control fine-tunes the SFT model the same way on one random sample per prompt,
   so that the table separates what the reward model's choice adds from what training on own samples does;
6. chats with the result through `pipeline("text-generation")`.

After each stage it measures greedy exact-answer accuracy on held-out problems asked in the chat format; once the
reward model exists, every stage's answers are scored with it, so the rewards compare. It prints one table, writes
`metrics.json` and the max-vs-median reward plot, and lists where every artefact is. `--quick` runs the same path on
smaller sizes (for CI): its numbers are not meant to be good.
"""

import argparse
import gc
import io
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    TrainingArguments,
    pipeline,
    set_seed,
)

import modeling_llama2  # noqa: F401  (registers Llama 2 with the Auto classes)
from arithmetic_task import (
    Problem,
    equation,
    is_correct,
    preference_pair,
    question,
    sft_record,
    split_problems,
)
from llama2_convert.__main__ import main as llama2_convert
from llama2_convert.layout import ffn_dim
from llama2_convert.tokenizer import save_tokenizer
from modeling_llama2 import Llama2Config, Llama2ForCausalLM
from modeling_llama2.alignment.rejection_sampling import (
    SamplingArguments,
    load_prompts,
    plot_reward_curve,
    rejection_sample,
    reward_curve,
    sample_responses,
)  # fmt: skip
from modeling_llama2.alignment.reward import RewardArguments, run_reward_model
from modeling_llama2.alignment.scoring import encode_response, score
from modeling_llama2.alignment.sft import SFTArguments, run_sft
from modeling_llama2.alignment.training import ModelArguments, load_tokenizer, write_jsonl
from modeling_llama2.chat_format import B_INST, E_INST, encode_dialog, tokenizer_encoder

CONTEXT = 128  # tokens: a chat-formatted question and its answer take about 30
PRETRAIN_ROW = 64


@dataclass
class Sizes:
    """How big each stage is. The defaults take a few minutes on 2 cores; `QUICK` only checks the path."""

    hidden_size: int = 128
    num_layers: int = 3
    pretrain_problems: int = 20000
    pretrain_steps: int = 250  # about 45% of held-out problems right as raw text; 400 steps get over 90%
    pretrain_batch: int = 16  # rows of PRETRAIN_ROW tokens, each packed with about four problems
    pretrain_lr: float = 3e-3
    sft_problems: int = 1000
    sft_epochs: float = 2
    sft_lr: float = 1e-3
    pair_problems: int = 6000
    rm_epochs: float = 3
    rm_lr: float = 1e-3
    rs_prompts: int = 2000
    rs_epochs: float = 2
    rs_lr: float = 5e-4
    eval_problems: int = 200


QUICK = Sizes(
    hidden_size=64, num_layers=2, pretrain_problems=500, pretrain_steps=60, sft_problems=200, sft_epochs=1,
    pair_problems=200, rm_epochs=1, rs_prompts=16, rs_epochs=1, eval_problems=32,
)  # fmt: skip
ARTEFACTS = {
    "data sets (pretraining text, SFT, pairs, prompts)": "data",
    "tokenizer (sentencepiece)": "tokenizer.model",
    "pretrained model (Hugging Face, as trained)": "pretrained",
    "pretrained model in Meta's format": "meta",
    "pretrained model converted back (with chat template)": "base",
    "SFT model": "sft",
    "reward model": "reward_model",
    "best-of-16 samples and rewards": "rejection_sampling_data.jsonl",
    "rejection-sampling fine-tuned model": "rejection_sampling",
    "control: fine-tuned on random samples": "random_sample_control",
    "max-vs-median reward plot": "max_vs_median_reward.png",
    "metrics": "metrics.json",
}
TEMPERATURE = 0.5  # samples at 1 were right half as often as greedy answers, at 0.5 85% as often (measured)
# Sampling decodes eagerly: for this model (3 layers of width 128) the compiled step's fixed cost outweighs what it
# saves (measured: 16 samples of 16 tokens in 100 ms compiled, 38 ms eager with a cache of the exact length).
COMPILE = False
NS = (1, 2, 4, 8, 16)  # rejection-sampling sizes reported; the best of the largest is kept


def write_data(data_dir: Path, sizes: Sizes, rng: random.Random) -> dict[str, list[Problem]]:
    """Draw disjoint problem sets and write the data sets known before training (the pairs need the SFT model)."""
    splits = split_problems(
        rng,
        {
            "eval": sizes.eval_problems,
            "pretrain": sizes.pretrain_problems,
            "sft": sizes.sft_problems,
            "pairs": sizes.pair_problems,
            "pairs_eval": 100,
            "rejection_sampling": sizes.rs_prompts,
        },
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "pretrain.txt").write_text("".join(equation(p) + "\n" for p in splits["pretrain"]))
    write_jsonl(str(data_dir / "sft.jsonl"), [sft_record(p) for p in splits["sft"]])
    for name in ("eval", "rejection_sampling"):
        records = [{"prompt": question(p)} for p in splits[name]]
        write_jsonl(str(data_dir / f"{name}_prompts.jsonl"), records)
    return splits


def write_pairs(model_dir: Path, problems: list[Problem], path: Path, rng: random.Random, n: int = 4) -> None:
    """Preference pairs whose rejected answer is a wrong one of `n` samples from the SFT model (on-policy, as in
    Llama 2-Chat: the reward model learns the mistakes it will have to rank), or a made-up near miss where all are
    right."""
    tokenizer, policy = load_tokenizer(str(model_dir)), load_policy(model_dir)
    encode, pairs = tokenizer_encoder(tokenizer), []
    for problem in problems:
        messages = [{"role": "user", "content": question(problem)}]
        prompt = encode_dialog(messages, encode, tokenizer.bos_token_id, tokenizer.eos_token_id)[0]
        sampled = sample_responses(
            policy, prompt, n, 16, TEMPERATURE, pad_token_id=tokenizer.pad_token_id, compile=COMPILE
        )
        samples = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in sampled]
        wrong = [s for s in samples if not is_correct(problem, s)]
        pairs.append(preference_pair(problem, rng, rng.choice(wrong) if wrong else None))
    write_jsonl(str(path), pairs)


def train_tokenizer(data_dir: Path, path: Path) -> None:
    """A small Llama 2-style sentencepiece model: BPE, byte fallback, digits split, no normalization."""
    corpus = (data_dir / "pretrain.txt").read_text().splitlines()
    for line in (data_dir / "sft.jsonl").read_text().splitlines():
        record = json.loads(line)
        corpus.append(f"{B_INST} {record['prompt']} {E_INST} {record['response']}")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=400, hard_vocab_limit=False,
        byte_fallback=True, split_digits=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )  # fmt: skip
    path.write_bytes(model.getvalue())


def pretrain(data_dir: Path, tokenizer_file: Path, output_dir: Path, sizes: Sizes) -> None:
    """Next-token prediction on the raw text, packed into rows of PRETRAIN_ROW tokens (each line between BOS and
    EOS)."""
    tokenizer = save_tokenizer(tokenizer_file, output_dir, chat=False, model_max_length=CONTEXT)
    config = Llama2Config(
        vocab_size=len(tokenizer), hidden_size=sizes.hidden_size, intermediate_size=ffn_dim(sizes.hidden_size, 32),
        num_hidden_layers=sizes.num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=CONTEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = Llama2ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"tiny Llama 2: {params:.2f}M parameters, {config.num_hidden_layers} layers, GQA 4 query / 2 KV heads")

    lines = (data_dir / "pretrain.txt").read_text().splitlines()
    stream = [t for ids in tokenizer(lines)["input_ids"] for t in ids + [tokenizer.eos_token_id]]
    rows = torch.tensor(stream[: len(stream) // PRETRAIN_ROW * PRETRAIN_ROW]).view(-1, PRETRAIN_ROW)
    optimizer = torch.optim.AdamW(model.parameters(), lr=sizes.pretrain_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=sizes.pretrain_lr, total_steps=sizes.pretrain_steps, pct_start=0.1
    )
    model.train()
    for _ in (bar := tqdm(range(sizes.pretrain_steps), desc="pretraining")):
        batch = rows[torch.randint(len(rows), (sizes.pretrain_batch,))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval().save_pretrained(output_dir)


def convert(pretrained_dir: Path, meta_dir: Path, base_dir: Path) -> None:
    """Hugging Face -> Meta's raw format -> Hugging Face with the Llama 2 chat template, through `llama2-convert`."""
    commands = [
        ["hf-to-meta", "--input-dir", str(pretrained_dir), "--output-dir", str(meta_dir), "--num-shards", "1"],
        ["meta-to-hf", "--input-dir", str(meta_dir), "--output-dir", str(base_dir), "--chat",
         "--max-position-embeddings", str(CONTEXT)],
    ]  # fmt: skip
    for command in commands:
        print("llama2-convert " + " ".join(command))
        if llama2_convert([*command, "--overwrite"]) != 0:
            raise SystemExit(f"llama2-convert {command[0]} failed")


def trainer_args(output_dir: Path, epochs: float, lr: float, batch: int, seed: int) -> TrainingArguments:
    """Trainer settings for the tiny model on CPU: much higher learning rates than the paper's 7B-70B ones."""
    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=lr, per_device_train_batch_size=batch,
        lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0, logging_steps=20, save_strategy="no",
        report_to="none", use_cpu=True, seed=seed, remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
    )  # fmt: skip


def load_policy(model_dir: Path):
    """The causal LM of a stage, ready to generate.

    `meta-to-hf` writes `max_length` (the context) into `generation_config.json`, which makes every
    `generate(max_new_tokens=...)` warn that both are set; the length here is always `max_new_tokens`.
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    model.generation_config.max_length = None
    return model


def chat_pipeline(model_dir: Path):
    """`pipeline("text-generation")` for a stage, batching left-padded prompts."""
    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.padding_side = "left"
    return pipeline("text-generation", model=load_policy(model_dir), tokenizer=tokenizer, device="cpu")


def greedy_answers(model_dir: Path, prompts: list, max_new_tokens: int = 16) -> list[str]:
    """Greedy answers through `pipeline("text-generation")`: chat prompts (message lists) get the chat template."""
    generate = chat_pipeline(model_dir)
    outputs = generate(prompts, batch_size=64, max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False)
    return [output[0]["generated_text"].strip() for output in outputs]


def evaluate(model_dir: Path, problems: list[Problem], prompts: list[str]) -> dict:
    """Exact-answer accuracy of greedy answers to the held-out problems, asked in the chat format and as raw text."""
    chat = greedy_answers(model_dir, [[{"role": "user", "content": prompt}] for prompt in prompts])
    raw = greedy_answers(model_dir, [question(p) for p in problems], max_new_tokens=12)
    return {
        "accuracy": sum(map(is_correct, problems, chat)) / len(problems),
        "accuracy_raw_text": sum(map(is_correct, problems, raw)) / len(problems),
        "answers": chat,
    }


def mean_reward(reward_model, tokenizer, prompts: list[str], answers: list[str]) -> float:
    """Mean helpfulness reward (sigmoid of the score, as rejection sampling reports it) of answers to prompts."""
    rows = [
        encode_response(tokenizer, [{"role": "user", "content": p}], a)[0]
        for p, a in zip(prompts, answers, strict=True)
    ]
    scores = [score(reward_model, rows[i : i + 64], tokenizer.pad_token_id) for i in range(0, len(rows), 64)]
    return torch.sigmoid(torch.cat(scores)).mean().item()


def best_of_n_table(records: list[dict], problems: list[Problem]) -> list[dict]:
    """Per N: mean max and median reward over prompts (paper's Figure 7), and how often the reward model's favourite
    of the first N samples, and any of them, is right (checked against the right answers, for the report only)."""
    rewards = torch.tensor([[sample["reward"] for sample in record["samples"]] for record in records])
    pairs = zip(records, problems, strict=True)
    right = torch.tensor([[is_correct(p, s["response"]) for s in r["samples"]] for r, p in pairs])
    curve = reward_curve(rewards)
    for point in curve:
        n = point["n"]
        picked = rewards[:, :n].argmax(1)
        point["accuracy_of_best"] = right[:, :n].gather(1, picked[:, None]).float().mean().item()
        point["any_right"] = right[:, :n].any(1).float().mean().item()
    return curve


def favourite_of_first(record: dict, k: int) -> dict:
    """An SFT record: the prompt with the reward model's favourite among its first `k` samples. Samples are i.i.d.,
    so these stand for best-of-k sampling, and k = 1 is a random sample (the control)."""
    best = max(record["samples"][:k], key=lambda sample: sample["reward"])
    return {"messages": [*record["messages"][:-1], {"role": "assistant", "content": best["response"]}],
            "reward": best["reward"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/recipe"))
    parser.add_argument("--quick", action="store_true", help="Small sizes: the same path in about a minute (CI).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--finetune-best-of", type=int, default=max(NS), choices=NS, help="Fine-tune on the favourite of this many."
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    # The tiny model's kernels are too small for intra-op threads to pay off: one thread is about as fast on an idle
    # machine and several times faster when other processes share the cores (measured: 0.10 vs 0.45 s per step).
    torch.set_num_threads(1)
    out = args.output_dir
    rng = random.Random(args.seed)
    set_seed(args.seed)
    start = time.perf_counter()
    results, stage_seconds = {}, {}

    print("\n== 1. tokenizer and pretraining ==")
    problems = write_data(out / "data", sizes, rng)
    eval_prompts = [record["prompt"] for record in map(json.loads, (out / "data/eval_prompts.jsonl").open())]
    train_tokenizer(out / "data", out / "tokenizer.model")
    pretrain(out / "data", out / "tokenizer.model", out / "pretrained", sizes)
    stage_seconds["pretrain"] = time.perf_counter() - start

    print("\n== 2. Meta's format and back ==")
    convert(out / "pretrained", out / "meta", out / "base")
    results["pretrained"] = evaluate(out / "base", problems["eval"], eval_prompts)
    report("pretrained", results["pretrained"])

    print("\n== 3. supervised fine-tuning (chat format, loss on answers only) ==")
    t = time.perf_counter()
    run_sft(
        ModelArguments(model=str(out / "base")),
        # rows of CONTEXT tokens: the samples are short, and longer rows would leave only a handful of steps
        SFTArguments(train_file=str(out / "data/sft.jsonl"), max_length=CONTEXT),
        trainer_args(out / "sft", sizes.sft_epochs, sizes.sft_lr, batch=8, seed=args.seed),
    )
    stage_seconds["sft"] = time.perf_counter() - t
    results["sft"] = evaluate(out / "sft", problems["eval"], eval_prompts)
    report("SFT", results["sft"])

    print("\n== 4. helpfulness reward model (margin ranking loss) ==")
    t = time.perf_counter()
    for name in ("pairs", "pairs_eval"):
        write_pairs(out / "sft", problems[name], out / f"data/{name}.jsonl", rng)
    rm_metrics = run_reward_model(
        ModelArguments(model=str(out / "sft")),
        RewardArguments(
            train_file=str(out / "data/pairs.jsonl"), eval_file=str(out / "data/pairs_eval.jsonl"), max_length=CONTEXT
        ),
        trainer_args(out / "reward_model", sizes.rm_epochs, sizes.rm_lr, batch=16, seed=args.seed),
    )
    stage_seconds["reward_model"] = time.perf_counter() - t
    print(f"reward model ranks held-out pairs right: {rm_metrics['eval_accuracy']:.1%}")

    print("\n== 5. rejection sampling: best of 16, then fine-tuning on the best ==")
    t = time.perf_counter()
    tokenizer = load_tokenizer(str(out / "sft"))
    policy = load_policy(out / "sft")
    reward_model = AutoModelForSequenceClassification.from_pretrained(out / "reward_model").eval()
    sampling = SamplingArguments(
        prompts=str(out / "data/rejection_sampling_prompts.jsonl"), num_samples=max(NS), temperature=TEMPERATURE,
        top_p=1.0,        max_new_tokens=16, compile=COMPILE,
    )  # fmt: skip
    prompts = load_prompts(sampling.prompts)
    records = rejection_sample(policy, tokenizer, {"helpfulness": reward_model}, prompts, sampling)
    write_jsonl(str(out / "rejection_sampling_data.jsonl"), records)
    curve = best_of_n_table(records, problems["rejection_sampling"])
    plot_reward_curve(curve, str(out / "max_vs_median_reward.png"))
    print_curve(curve)
    del policy
    gc.collect()
    for name, k, model_dir in [
        ("rejection sampling", args.finetune_best_of, out / "rejection_sampling"),
        ("control: random", 1, out / "random_sample_control"),
    ]:
        data = out / f"data/best_of_{k}.jsonl"
        write_jsonl(str(data), [favourite_of_first(record, k) for record in records])
        run_sft(
            ModelArguments(model=str(out / "sft")),
            SFTArguments(train_file=str(data), max_length=CONTEXT),
            trainer_args(model_dir, sizes.rs_epochs, sizes.rs_lr, batch=8, seed=args.seed),
        )
        results[name] = evaluate(model_dir, problems["eval"], eval_prompts)
        report(name, results[name])
    stage_seconds["rejection_sampling"] = time.perf_counter() - t

    for result in results.values():
        result["mean_reward"] = mean_reward(reward_model, tokenizer, eval_prompts, result["answers"])

    print("\n== 6. chatting with the result through pipeline('text-generation') ==")
    chat = chat_pipeline(out / "rejection_sampling")
    for prompt, problem in list(zip(eval_prompts, problems["eval"], strict=False))[:3]:
        messages = [{"role": "user", "content": prompt}]
        reply = chat(messages, max_new_tokens=16, do_sample=False)[0]["generated_text"][-1]["content"]
        print(f"user: {prompt}\nassistant: {reply}   [{'right' if is_correct(problem, reply) else 'wrong'}]")

    wall = time.perf_counter() - start
    print_table(results, len(problems["eval"]))
    metrics = {
        "stages": {name: {k: v for k, v in r.items() if k != "answers"} for name, r in results.items()},
        "reward_model": rm_metrics,
        "best_of_n": curve,
        "sizes": asdict(sizes),
        "seconds": {**stage_seconds, "total": wall},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print("\nartefacts:")
    for name, path in ARTEFACTS.items():
        print(f"  {name:52s} {out / path}")
    print(f"\ntotal wall time {wall / 60:.1f} min")


def report(stage: str, result: dict) -> None:
    print(f"{stage}: held-out exact-answer accuracy {result['accuracy']:.1%} in the chat format, "
          f"{result['accuracy_raw_text']:.1%} as raw text `digits=`")  # fmt: skip


def print_curve(curve: list[dict]) -> None:
    print("\n  N   mean max reward   mean median reward   RM's pick right   any sample right")
    for p in curve:
        print(
            f"{p['n']:3d}   {p['max']:15.3f}   {p['median']:18.3f}   {p['accuracy_of_best']:15.1%}   "
            f"{p['any_right']:16.1%}"
        )


def print_table(results: dict[str, dict], n: int) -> None:
    print(f"\n{n} held-out problems, greedy answers; every stage's rewards from the one reward model (trained on SFT)")
    print(f"{'stage':20s} {'accuracy (chat)':>16s} {'accuracy (raw text)':>20s} {'mean reward':>12s}")
    for name, r in results.items():
        print(f"{name:20s} {r['accuracy']:16.1%} {r['accuracy_raw_text']:20.1%} {r['mean_reward']:12.3f}")


if __name__ == "__main__":
    main()
