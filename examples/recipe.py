"""The Llama 2 recipe in miniature, end to end, on a built-in task (sorting digits): minutes on 2 cores, no downloads.

    python examples/recipe.py [--output-dir runs/recipe] [--quick] [--seeds 0 [1 2 ...]] [--finetune-best-of 16]

1. trains a sentencepiece tokenizer and pretrains a tiny Llama 2 (grouped-query attention) on raw text
   (`51706749=01456779`), briefly, so that it sorts well but not perfectly and the later stages have room to improve;
2. saves it in Meta's raw format (`consolidated.00.pth`, `params.json`, `tokenizer.model`) with the converter's
   `hf_to_meta` (what `llama2-convert hf-to-meta` runs), and converts that back with `meta_to_hf(chat=True)` into a
   stock transformers Llama folder (`AutoModelForCausalLM` gives `LlamaForCausalLM` there, and this package's
   `Llama2ForCausalLM` on the pretrained folder, which is in the package's own format); every later stage trains this
   package's model and saves stock Llama folders;
3. fine-tunes it on chat-formatted instructions, loss on answers only (`run_sft`); the task's unsafe requests (a
   number with 13 in it) are answered with a refusal;
4. trains the paper's two reward models from the SFT model (`run_reward_model`): helpfulness on preference pairs,
   right answer over each of the SFT model's own wrong samples (of 16 per prompt), whose rating margin grows with
   how wrong it is; and
   safety, the refusal over the SFT model's own compliance with an unsafe request (and its answers, right or wrong,
   over refusals for safe ones);
5. samples N = 1..16 answers per new prompt, ranks them with the paper's combined reward (safety where the request
   is unsafe or the safety score is below 0.15, helpfulness otherwise), keeps the favourite (of 16, or of the first
   `--finetune-best-of`) and fine-tunes the SFT model on those (`rejection_sample`, then `run_sft`); no reference
   answer is used in this stage. A control fine-tunes the SFT model the same way on one random sample per prompt,
   so that the table separates what the reward models' choice adds from what training on own samples does. Round 2
   does the same from round 1's model on fresh prompts (the paper's iterated RLHF versions);
6. chats with the result through `pipeline("text-generation")`.

After each stage it measures, with greedy answers to held-out requests in the chat format, helpfulness (exact-answer
accuracy on safe requests, also asked as raw text) and safety (how often unsafe requests are answered rather than
declined); once the reward models exist, every stage's answers are scored with them, so the rewards compare. It
prints one table, writes `metrics.json` and the best-of-N plot, and lists where every artefact is. `--quick` runs the
same path on smaller sizes (for CI): its numbers are not meant to be good.
"""

import argparse
import io
import json
import os
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece
import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    TrainingArguments,
    pipeline,
    set_seed,
)

import modeling_llama2  # noqa: F401  (registers Llama 2 with the Auto classes)
from arithmetic_task import (
    Problem,
    complies,
    equation,
    is_correct,
    is_right,
    is_unsafe,
    preference_pair,
    question,
    safety_pair,
    sft_record,
    split_problems,
    unsafe_problems,
)
from llama2_convert.layout import ffn_dim
from llama2_convert.meta import hf_to_meta, meta_to_hf
from llama2_convert.tokenizer import save_tokenizer
from modeling_llama2 import Llama2Config, Llama2ForCausalLM, Llama2ForSequenceClassification
from modeling_llama2.alignment.rejection_sampling import (
    SamplingArguments,
    load_prompts,
    rejection_sample,
    reward_curve,
    sample_prompts,
)  # fmt: skip
from modeling_llama2.alignment.reward import RewardArguments, run_reward_model
from modeling_llama2.alignment.scoring import encode_response, score
from modeling_llama2.alignment.sft import SFTArguments, run_sft
from modeling_llama2.alignment.training import ModelArguments, load_tokenizer, read_jsonl, write_jsonl
from modeling_llama2.chat_format import B_INST, E_INST, encode_dialog, forbidden_in, tokenizer_encoder

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
    pair_problems: int = 2000
    pair_samples: int = 16  # per pair problem: each distinct wrong one makes a pair, up to `pairs_per_problem`
    pairs_per_problem: int = 4  # the RM's training time then stays under 2000 x 4 pairs, whatever the SFT error rate
    sft_unsafe_problems: int = 400  # besides the ~7% of unsafe requests among any random problems
    # Half unsafe requests, half safe ones. With 600, the safety model scored right answers to safe requests with a 1
    # and a 3 in them below the 0.15 rule, where a refusal beat them (74 of 913 safe favourites in a seed's round 1
    # were refusals; 8 with 1200, measured by retraining that model alone).
    safety_pair_problems: int = 1200
    # Helpfulness; its favourite of 16 minus one sample, seeds 0-2: 23.5 / 22.7 / 18.1 (4 epochs: 21.5 / 11.7 / 17.0).
    rm_epochs: float = 6
    rm_lr: float = 5e-4  # helpfulness; at 1e-3 and 2e-3 it ranked no better than chance among the policy's samples
    rm_batch: int = 64
    refresh_pair_problems: int = 1000  # per round after the first: pairs from the last round's model
    refresh_epochs: float = 1  # continued training of the last round's helpfulness model on them
    safety_rm_epochs: float = 3
    safety_rm_lr: float = 1e-3
    safety_rm_batch: int = 16  # its ~1080 pairs make too few steps in batches of 64
    rs_prompts: int = 1000  # per round
    rs_unsafe_prompts: int = 250  # per round, besides: refusals fade unless each round also trains on them
    rs_rounds: int = 2  # round r samples from round r-1's model (the paper's RLHF V1, V2, ...)
    rs_epochs: float = 2
    rs_lr: float = 5e-4
    eval_problems: int = 500  # safe held-out requests: a 5-point gain is about 3 standard errors at 40-50%
    eval_unsafe_problems: int = 100


QUICK = Sizes(
    hidden_size=64, num_layers=2, pretrain_problems=500, pretrain_steps=60, sft_problems=200, sft_epochs=1,
    pair_problems=200, pair_samples=4, pairs_per_problem=2, sft_unsafe_problems=20, safety_pair_problems=40,
    rm_epochs=1, refresh_pair_problems=16, rs_prompts=16, rs_unsafe_prompts=4, rs_epochs=1, eval_problems=32,
    eval_unsafe_problems=8,
)  # fmt: skip
ARTEFACTS = {
    "data sets (pretraining text, SFT, pairs, prompts)": "data",
    "tokenizer (sentencepiece)": "tokenizer.model",
    "pretrained model (Hugging Face, as trained)": "pretrained",
    "pretrained model in Meta's format": "meta",
    "pretrained model converted back (with chat template)": "base",
    "SFT model": "sft",
    "helpfulness reward model": "reward_model",
    "safety reward model": "safety_reward_model",
    "helpfulness reward model refreshed on round 1's model's samples (for round 2)": "reward_model_round_2",
    "best-of-16 samples and rewards (round 1)": "rejection_sampling_data.jsonl",
    "rejection-sampling fine-tuned model (round 1)": "rejection_sampling",
    "control: fine-tuned on random samples": "random_sample_control",
    "round 2's samples, from round 1's model": "rejection_sampling_round_2_data.jsonl",
    "round 2's fine-tuned model (on both rounds' favourites)": "rejection_sampling_round_2",
    "max-vs-median reward plot": "max_vs_median_reward.png",
    "metrics": "metrics.json",
}
TEMPERATURE = 0.5  # samples at 1 were right half as often as greedy answers, at 0.5 85% as often (measured)
# Sampling decodes eagerly: for this model (3 layers of width 128) the compiled step's fixed cost outweighs what it
# saves (measured: 16 samples of 16 tokens in 100 ms compiled, 38 ms eager with a cache of the exact length).
COMPILE = False
NS = (1, 2, 4, 8, 16)  # rejection-sampling sizes reported; the best of the largest is kept
# Prompts sampled together: a step of this 3-layer model costs little more for 16 x 16 rows than for 16 (measured:
# 16 samples of 240 prompts in 8.9 s one prompt at a time, 5.3 s sixteen at a time).
PROMPTS_PER_BATCH = 16


def write_data(data_dir: Path, sizes: Sizes, rng: random.Random) -> dict[str, list[Problem]]:
    """Draw disjoint problem sets and write the data sets known before training (the pairs need the SFT model).

    Random problems hold unsafe requests at their natural rate (about 7%); SFT gets extra ones so that the refusal is
    learnt, the held-out set is split into safe requests (helpfulness) and unsafe ones (safety), and the safety pairs
    are half unsafe requests."""
    splits = split_problems(
        rng,
        {
            "eval": sizes.eval_problems + sizes.eval_problems // 8,  # about 7% are unsafe, dropped below
            "pretrain": sizes.pretrain_problems,
            "sft": sizes.sft_problems,
            "pairs": sizes.pair_problems,
            "pairs_eval": 100,
            **{f"rejection_sampling_{r}": sizes.rs_prompts for r in range(1, sizes.rs_rounds + 1)},
            **{f"pairs_round_{r}": sizes.refresh_pair_problems for r in range(2, sizes.rs_rounds + 1)},
            "safety_pairs": sizes.safety_pair_problems // 2,
        },
    )
    helpfulness_sets = ("eval", "pairs", "pairs_eval", *(f"pairs_round_{r}" for r in range(2, sizes.rs_rounds + 1)))
    for name in helpfulness_sets:  # safe requests only
        splits[name] = [p for p in splits[name] if not is_unsafe(p)]
    splits["eval"] = splits["eval"][: sizes.eval_problems]
    extra = {"eval_unsafe": sizes.eval_unsafe_problems, "sft": sizes.sft_unsafe_problems,
             "safety_pairs": sizes.safety_pair_problems // 2,
             **{f"rejection_sampling_{r}": sizes.rs_unsafe_prompts for r in range(1, sizes.rs_rounds + 1)}}  # fmt: skip
    unsafe = iter(unsafe_problems(rng, sum(extra.values()), exclude={p for split in splits.values() for p in split}))
    for name, n in extra.items():
        splits[name] = splits.get(name, []) + [next(unsafe) for _ in range(n)]
        rng.shuffle(splits[name])  # (the safety pairs' held-out tenth holds both kinds)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "pretrain.txt").write_text("".join(equation(p) + "\n" for p in splits["pretrain"]))
    write_jsonl(str(data_dir / "sft.jsonl"), [sft_record(p) for p in splits["sft"]])
    for name in ("eval", "eval_unsafe", *(f"rejection_sampling_{r}" for r in range(1, sizes.rs_rounds + 1))):
        records = [{"prompt": question(p), "unsafe": is_unsafe(p)} for p in splits[name]]  # the generator's label
        write_jsonl(str(data_dir / f"{name}_prompts.jsonl"), records)
    return splits


# Stages. Each trains or measures one thing, writes its artefacts under the run's folder and returns its figures;
# none prints (progress bars aside): `main` reports.


def pretrain(out: Path, sizes: Sizes) -> dict:
    """A small Llama 2-style sentencepiece tokenizer, then next-token prediction on the raw text, packed into rows of
    PRETRAIN_ROW tokens (each line between BOS and EOS)."""
    train_tokenizer(out / "data", out / "tokenizer.model")
    tokenizer = save_tokenizer(out / "tokenizer.model", out / "pretrained", chat=False, model_max_length=CONTEXT)
    config = Llama2Config(
        vocab_size=len(tokenizer), hidden_size=sizes.hidden_size, intermediate_size=ffn_dim(sizes.hidden_size, 32),
        num_hidden_layers=sizes.num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=CONTEXT, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = Llama2ForCausalLM(config)
    lines = (out / "data/pretrain.txt").read_text().splitlines()
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
    model.eval().save_pretrained(out / "pretrained")
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "final_loss": loss.item(),
    }


def train_tokenizer(data_dir: Path, path: Path) -> None:
    """BPE, byte fallback, digits split, no normalization: Llama 2's tokenizer settings, on the recipe's text."""
    corpus = (data_dir / "pretrain.txt").read_text().splitlines()
    for _, record in read_jsonl(str(data_dir / "sft.jsonl")):
        corpus.append(f"{B_INST} {record['prompt']} {E_INST} {record['response']}")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=400, hard_vocab_limit=False,
        byte_fallback=True, split_digits=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )  # fmt: skip
    path.write_bytes(model.getvalue())


def convert(out: Path) -> dict:
    """Hugging Face -> Meta's raw format -> Hugging Face with the Llama 2 chat template, as `llama2-convert`
    `hf-to-meta` and `meta-to-hf --chat` do. The pretrained folder is this package's own format (saved by its
    model); the converted one is a stock transformers Llama, which every later stage keeps."""
    hf_to_meta(out / "pretrained", out / "meta", num_shards=1, overwrite=True)
    meta_to_hf(out / "meta", out / "base", chat=True, max_position_embeddings=CONTEXT, overwrite=True)
    return {
        "meta_files": sorted(p.name for p in (out / "meta").iterdir()),
        "auto_model_for_causal_lm": {
            name: type(AutoModelForCausalLM.from_pretrained(out / name)).__name__ for name in ("pretrained", "base")
        },
    }


def sft(base_dir: Path, data: Path, output_dir: Path, *, epochs: float, lr: float, seed: int) -> dict:
    """Supervised fine-tuning in the chat format, loss on answers only, in rows of CONTEXT tokens (the samples are
    short, and longer rows would leave only a handful of steps)."""
    return run_sft(
        ModelArguments(model=str(base_dir)),
        SFTArguments(train_file=str(data), max_length=CONTEXT),
        trainer_args(output_dir, epochs, lr, batch=8, seed=seed),
    )


def reward_models(out: Path, problems: dict[str, list[Problem]], sizes: Sizes, rng: random.Random, seed: int) -> dict:
    """The paper's two reward models (margin ranking loss), both from the SFT model: helpfulness on on-policy pairs
    of safe requests, safety on refusals against the SFT model's own compliance (and, for safe requests, answers
    over refusals). Each ranks a held-out tenth of its pairs."""
    for name in ("pairs", "pairs_eval"):
        write_pairs(
            out / "sft", problems[name], out / f"data/{name}.jsonl", rng, sizes.pair_samples, sizes.pairs_per_problem
        )
    write_safety_pairs(out / "sft", problems["safety_pairs"], out / "data/safety_pairs.jsonl", rng)
    safety = [record for _, record in read_jsonl(str(out / "data/safety_pairs.jsonl"))]
    held_out = len(safety) // 10
    write_jsonl(str(out / "data/safety_pairs_eval.jsonl"), safety[:held_out])
    write_jsonl(str(out / "data/safety_pairs_train.jsonl"), safety[held_out:])
    files = {"helpfulness": ("pairs", "pairs_eval", "reward_model", sizes.rm_epochs, sizes.rm_lr, sizes.rm_batch),
             "safety": ("safety_pairs_train", "safety_pairs_eval", "safety_reward_model", sizes.safety_rm_epochs,
                        sizes.safety_rm_lr, sizes.safety_rm_batch)}  # fmt: skip
    return {
        objective: train_reward_model(out, "sft", train, evaluation, objective, model_dir, epochs, lr, batch, seed)
        for objective, (train, evaluation, model_dir, epochs, lr, batch) in files.items()
    }


def train_reward_model(
    out: Path, base: str, train: str, evaluation: str, objective: str, model_dir: str, epochs: float, lr: float,
    batch: int, seed: int,
) -> dict:  # fmt: skip
    """Train the reward model for `objective` from `out/base` on `out/data/<train>.jsonl`, ranking
    `out/data/<evaluation>.jsonl`, into `out/model_dir`. Two threads: batches this large pay for them (measured on
    the helpfulness model's batches of 64: 0.19 against 0.31 s a step)."""
    with torch_threads(min(2, os.cpu_count() or 1)):
        return run_reward_model(
            ModelArguments(model=str(out / base)),
            RewardArguments(
                train_file=str(out / f"data/{train}.jsonl"), eval_file=str(out / f"data/{evaluation}.jsonl"),
                objective=objective, max_length=CONTEXT,
            ),  # fmt: skip
            trainer_args(out / model_dir, epochs, lr, batch=batch, seed=seed),
        )


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to `n` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def chat_samples(policy, tokenizer, problems: list[Problem], n: int) -> list[list[str]]:
    """`n` sampled answers of the chat model to each problem, sampled together, as text; those that spell a control
    token are left out (no answer the chat format, hence a reward model, takes)."""
    encode = tokenizer_encoder(tokenizer)
    prompts = [
        encode_dialog([{"role": "user", "content": question(p)}], encode, tokenizer.bos_token_id,
                      tokenizer.eos_token_id)[0]
        for p in problems
    ]  # fmt: skip
    sampled = sample_prompts(policy, prompts, n, 16, TEMPERATURE, pad_token_id=tokenizer.pad_token_id, compile=COMPILE)
    texts = [[tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in responses] for responses in sampled]
    return [[text for text in answers if not forbidden_in(text)] for answers in texts]


def sampled_problems(model_dir: Path, problems: list[Problem], n: int, desc: str):
    """(problem, its `n` samples from the chat model at `model_dir`) pairs, PROMPTS_PER_BATCH problems at a time,
    with a progress bar."""
    tokenizer, policy = load_tokenizer(str(model_dir)), load_policy(model_dir)
    progress = tqdm(total=len(problems), desc=desc, unit="prompt")
    for start in range(0, len(problems), PROMPTS_PER_BATCH):
        batch = problems[start : start + PROMPTS_PER_BATCH]
        yield from zip(batch, chat_samples(policy, tokenizer, batch, n), strict=True)
        progress.update(len(batch))
    progress.close()


def write_safety_pairs(model_dir: Path, problems: list[Problem], path: Path, rng: random.Random, n: int = 4) -> None:
    """Safety comparisons around one of `n` SFT samples that complies (or the sorted digits where none does): for an
    unsafe request, the refusal over it; for a safe one, it over the refusal."""
    pairs = []
    for problem, samples in sampled_problems(model_dir, problems, n, f"sampling {path.stem}"):
        complying = [s for s in samples if complies(s)]
        pairs.append(safety_pair(problem, rng.choice(complying) if complying else None))
    write_jsonl(str(path), pairs)


def write_pairs(model_dir: Path, problems: list[Problem], path: Path, rng: random.Random, n: int, most: int) -> int:
    """Preference pairs of the right answer over distinct wrong ones (`most` at random) of `n` samples from the chat
    model at `model_dir` (on-policy, as in Llama 2-Chat: the reward model learns the mistakes it will have to rank),
    or over a made-up near miss where all are right. Several wrong samples, not one per prompt: a sample costs about
    as much to draw as sixteen do (decoding is per token), and the pairs are what the reward model learns from."""
    pairs = []
    for problem, samples in sampled_problems(model_dir, problems, n, f"sampling {path.stem}"):
        wrong = list(dict.fromkeys(s for s in samples if not is_correct(problem, s)))
        rejected = rng.sample(wrong, min(most, len(wrong))) if wrong else [None]
        pairs += [preference_pair(problem, rng, answer) for answer in rejected]
    write_jsonl(str(path), pairs)
    return len(pairs)


def refresh_helpfulness(
    out: Path, r: int, policy_dir: Path, problems: list[Problem], sizes: Sizes, rng: random.Random, seed: int
) -> dict:
    """Before round `r`: new on-policy pairs from the model the round samples from (`policy_dir`), on fresh
    prompts, and one more pass of the last helpfulness model over them, as the paper collects new preference data
    from the latest model each iteration. The model trained on the SFT model's samples ranks the mistakes of a
    better model barely better than chance (measured on seed 2: its favourite of 16 of round 1's model's samples was
    right 17% of the time against 15% for one sample, and 22% after this), and rejection sampling is only as good as
    that ranking."""
    pairs = write_pairs(policy_dir, problems, out / f"data/pairs_round_{r}.jsonl", rng, sizes.pair_samples,
                        sizes.pairs_per_problem)  # fmt: skip
    last = "reward_model" if r == 2 else f"reward_model_round_{r - 1}"
    metrics = train_reward_model(out, last, f"pairs_round_{r}", "pairs_eval", "helpfulness", f"reward_model_round_{r}",
                                 sizes.refresh_epochs, sizes.rm_lr, sizes.rm_batch, seed)  # fmt: skip
    return {**metrics, "pairs": pairs}


def round_name(r: int) -> str:
    """Folder and file stem of rejection-sampling round `r` (round 1 keeps the single-round names)."""
    return "rejection_sampling" if r == 1 else f"rejection_sampling_round_{r}"


def best_of_n(out: Path, r: int, policy_dir: Path, problems: list[Problem], rewards: dict) -> list[dict]:
    """Round `r`: sample 16 answers per prompt of the round from `policy_dir`, score them with the paper's combined
    reward of the two reward models (safety where the request is unsafe or the safety score is below 0.15,
    helpfulness otherwise), keep them all (`<round>_data.jsonl`) and return the max-vs-median reward curve per N."""
    sampling = SamplingArguments(
        prompts=str(out / f"data/rejection_sampling_{r}_prompts.jsonl"), num_samples=max(NS),
        temperature=TEMPERATURE, top_p=1.0, max_new_tokens=16, compile=COMPILE, prompts_per_batch=PROMPTS_PER_BATCH,
    )  # fmt: skip
    policy, tokenizer = load_policy(policy_dir), load_tokenizer(str(policy_dir))
    records = rejection_sample(policy, tokenizer, rewards, load_prompts(sampling.prompts), sampling)
    write_jsonl(str(out / f"{round_name(r)}_data.jsonl"), records)
    return best_of_n_table(records, problems)


def plot_best_of_n(curves: list[list[dict]], path: Path) -> bool:
    """The paper's Figure 7 (max and median reward of N samples) beside what the report can check here and the paper
    could not: how often the reward model's favourite of N, and any of the N, is right. False where matplotlib
    (optional) is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [point["n"] for point in curves[0]]
    fig, (rewards, accuracy) = plt.subplots(1, 2, figsize=(9, 3.5))
    for r, curve in enumerate(curves, 1):
        color = f"C{r - 1}"
        rewards.plot(n, [p["max"] for p in curve], "o-", color=color, label=f"round {r}: max of N")
        rewards.plot(n, [p["median"] for p in curve], "s--", color=color, label=f"round {r}: median of N")
        accuracy.plot(n, [p["accuracy_of_best"] for p in curve], "o-", color=color, label=f"round {r}: favourite")
        accuracy.plot(n, [p["any_right"] for p in curve], "s--", color=color, label=f"round {r}: any of the N")
    rewards.set_ylabel("reward (mean over prompts)")
    accuracy.set_ylabel("right answers (fraction of prompts)")
    accuracy.set_ylim(0, 1)
    for ax in (rewards, accuracy):
        ax.set_xscale("log", base=2)
        ax.set_xticks(n, [str(v) for v in n])
        ax.set_xlabel("N samples per prompt")
        ax.legend(fontsize="small")
    fig.suptitle("Rejection sampling, each round from the last round's model: best of N by the reward model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def best_of_n_table(records: list[dict], problems: list[Problem]) -> list[dict]:
    """Per N: mean max and median reward over prompts (paper's Figure 7), and how often the reward model's favourite
    of the first N samples, and any of them, is right (the refusal, for an unsafe request; checked against the task,
    for the report only)."""
    rewards = torch.tensor([[sample["reward"] for sample in record["samples"]] for record in records])
    problem_of = {question(problem): problem for problem in problems}  # a prompt with no usable sample has no record
    pairs = [(record, problem_of[record["messages"][-2]["content"]]) for record in records]
    right = torch.tensor([[is_right(p, s["response"]) for s in r["samples"]] for r, p in pairs])
    curve = reward_curve(rewards)
    for point in curve:
        n = point["n"]
        picked = rewards[:, :n].argmax(1)
        point["accuracy_of_best"] = right[:, :n].gather(1, picked[:, None]).float().mean().item()
        point["any_right"] = right[:, :n].any(1).float().mean().item()
    return curve


def finetune_on_favourites(
    out: Path, r: int, k: int, base_dir: Path, model_dir: Path, sizes: Sizes, seed: int
) -> dict:
    """Fine-tune `base_dir` (the model round `r` sampled from) on the reward model's favourite of the first `k`
    samples of each prompt of every round so far, as the paper did from RLHF V3 on: fine-tuned on its own round's
    favourites alone, round 2 lost what round 1 had gained (measured on three seeds' runs: 32.8 / 34.6 / 33.6%
    against 38.0 / 42.0 / 39.8% with both rounds', and 37.8 / 35.2 / 35.6% with its own for as many steps, 4
    epochs: round 2 redone from the round 1 models of one run's three seeds)."""
    def favourites(i: int) -> str:  # round i's favourites, as SFT data
        return str(out / ("data/" + (f"best_of_{k}" if i == 1 else f"best_of_{k}_round_{i}") + ".jsonl"))

    records = [record for _, record in read_jsonl(str(out / f"{round_name(r)}_data.jsonl"))]
    data = write_jsonl(favourites(r), [favourite_of_first(record, k) for record in records])
    if r > 1:
        union = [record for i in range(1, r + 1) for _, record in read_jsonl(favourites(i))]
        data = write_jsonl(str(out / f"data/best_of_{k}_rounds_1_to_{r}.jsonl"), union)
    return sft(base_dir, Path(data), model_dir, epochs=sizes.rs_epochs, lr=sizes.rs_lr, seed=seed)


def favourite_of_first(record: dict, k: int) -> dict:
    """An SFT record: the prompt with the reward model's favourite among its first `k` usable samples (those the chat
    format accepts). Samples are i.i.d., so these stand for best-of-k sampling, and k = 1 is a random sample (the
    control)."""
    usable = [sample for sample in record["samples"] if not sample.get("refused")]
    best = max(usable[:k], key=lambda sample: sample["reward"])
    return {"messages": [*record["messages"][:-1], {"role": "assistant", "content": best["response"]}],
            "reward": best["reward"]}  # fmt: skip


def evaluate(model_dir: Path, safe: list[Problem], unsafe: list[Problem]) -> dict:
    """Greedy answers to the held-out requests: helpfulness as the exact-answer accuracy on the safe ones, in the chat
    format and as raw text; the safety violation rate, the unsafe requests answered rather than declined; and the
    over-refusal rate, the safe requests declined."""
    generate = chat_pipeline(model_dir)
    chat = greedy_answers(generate, [[{"role": "user", "content": question(p)}] for p in safe + unsafe])
    raw = greedy_answers(generate, [question(p) for p in safe], max_new_tokens=12)
    answers, unsafe_answers = chat[: len(safe)], chat[len(safe) :]
    return {
        "accuracy": sum(map(is_correct, safe, answers)) / len(safe),
        "accuracy_raw_text": sum(map(is_correct, safe, raw)) / len(safe),
        "safety_violation_rate": sum(map(complies, unsafe_answers)) / len(unsafe),
        "refusal_rate_on_safe": sum(not complies(a) for a in answers) / len(safe),
        "answers": answers,
        "unsafe_answers": unsafe_answers,
    }


def mean_reward(reward, tokenizer, problems: list[Problem], answers: list[str]) -> float:
    """Mean reward (sigmoid of the score, as rejection sampling reports it) of answers to the problems."""
    rows = [
        encode_response(tokenizer, [{"role": "user", "content": question(p)}], a)[0]
        for p, a in zip(problems, answers, strict=True)
    ]
    scores = [score(reward, rows[i : i + 64], tokenizer.pad_token_id) for i in range(0, len(rows), 64)]
    return torch.sigmoid(torch.cat(scores)).mean().item()


def chat_demo(model_dir: Path, problems: list[Problem]) -> list[dict]:
    """A few held-out questions asked through `pipeline("text-generation")` with chat messages."""
    chat, turns = chat_pipeline(model_dir), []
    for problem in problems:
        messages = [{"role": "user", "content": question(problem)}]
        reply = chat(messages, max_new_tokens=16, do_sample=False)[0]["generated_text"][-1]["content"]
        turns.append({"user": question(problem), "assistant": reply, "right": is_right(problem, reply)})
    return turns


# Loading and generating with a stage's output.


def trainer_args(output_dir: Path, epochs: float, lr: float, batch: int, seed: int) -> TrainingArguments:
    """Trainer settings for the tiny model on CPU: much higher learning rates than the paper's 7B-70B ones."""
    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=epochs, learning_rate=lr, per_device_train_batch_size=batch,
        lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0, logging_steps=20, save_strategy="no",
        report_to="none", use_cpu=True, seed=seed, remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
    )  # fmt: skip


def load_policy(model_dir: Path):
    """The causal LM of a stage as this package's model (whichever format the folder has), ready to generate.

    `meta-to-hf` writes `max_length` (the context) into `generation_config.json`, which makes every
    `generate(max_new_tokens=...)` warn that both are set; the length here is always `max_new_tokens`.
    """
    model = Llama2ForCausalLM.from_pretrained(model_dir).eval()
    model.generation_config.max_length = None
    return model


def chat_pipeline(model_dir: Path):
    """`pipeline("text-generation")` for a stage, batching left-padded prompts."""
    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.padding_side = "left"
    return pipeline("text-generation", model=load_policy(model_dir), tokenizer=tokenizer, device="cpu")


def greedy_answers(generate, prompts: list, max_new_tokens: int = 16) -> list[str]:
    """Greedy answers through `pipeline("text-generation")`: chat prompts (message lists) get the chat template."""
    outputs = generate(prompts, batch_size=64, max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False)
    return [output[0]["generated_text"].strip() for output in outputs]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sizes = QUICK if args.quick else Sizes()
    # The tiny model's kernels are too small for intra-op threads to pay off: one thread is about as fast on an idle
    # machine and several times faster when other processes share the cores (measured: 0.10 vs 0.45 s per step). The
    # reward models' larger batches are the exception (`train_reward_model`).
    torch.set_num_threads(1)
    if len(args.seeds) == 1:
        run(args.output_dir, sizes, seed=args.seeds[0], finetune_best_of=args.finetune_best_of)
        return
    runs = {}
    for seed in args.seeds:
        heading(f"seed {seed}")
        runs[seed] = run(args.output_dir / f"seed-{seed}", sizes, seed=seed, finetune_best_of=args.finetune_best_of)
    summary = across_seeds(runs)
    (args.output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    report_seeds(summary, args.output_dir)


def run(out: Path, sizes: Sizes, *, seed: int, finetune_best_of: int) -> dict:
    """The recipe once, for one seed, into `out`; returns (and writes) its `metrics.json`."""
    rng = random.Random(seed)
    set_seed(seed)
    start = time.perf_counter()
    seconds, stages = {}, {}
    problems = write_data(out / "data", sizes, rng)
    held_out, held_out_unsafe = problems["eval"], problems["eval_unsafe"]

    heading("1. tokenizer and pretraining")
    model = timed(seconds, "pretrain", pretrain, out, sizes)
    report_model(model)

    heading("2. Meta's format and back")
    conversion = timed(seconds, "convert", convert, out)
    report_conversion(out, conversion)
    stages["pretrained"] = report_stage("pretrained", evaluate(out / "base", held_out, held_out_unsafe))

    heading("3. supervised fine-tuning (chat format, loss on answers only)")
    timed(seconds, "sft", sft, out / "base", out / "data/sft.jsonl", out / "sft",
          epochs=sizes.sft_epochs, lr=sizes.sft_lr, seed=seed)  # fmt: skip
    stages["sft"] = report_stage("SFT", evaluate(out / "sft", held_out, held_out_unsafe))

    heading("4. helpfulness and safety reward models (margin ranking loss)")
    reward_metrics = timed(seconds, "reward_model", reward_models, out, problems, sizes, rng, seed)
    report_reward_models(reward_metrics)

    rewards = {
        objective: Llama2ForSequenceClassification.from_pretrained(out / folder).eval()
        for objective, folder in (("helpfulness", "reward_model"), ("safety", "safety_reward_model"))
    }
    curves, policy_dir, ranking = [], out / "sft", rewards
    for r in range(1, sizes.rs_rounds + 1):
        rounds = "" if r == 1 else f" of rounds 1 to {r}"
        heading(f"5.{r} rejection sampling, round {r}: {max(NS)} samples per prompt from {policy_dir.name}, "
                f"fine-tuning it on the best of {finetune_best_of}{rounds}")  # fmt: skip
        if r > 1:
            refreshed = timed(seconds, "reward_model", refresh_helpfulness, out, r, policy_dir,
                              problems[f"pairs_round_{r}"], sizes, rng, seed)  # fmt: skip
            reward_metrics[f"helpfulness_round_{r}"] = refreshed
            report_refresh(policy_dir, refreshed, sizes.refresh_epochs)
            helpfulness = Llama2ForSequenceClassification.from_pretrained(out / f"reward_model_round_{r}").eval()
            ranking = {**rewards, "helpfulness": helpfulness}
        curve = timed(seconds, "rejection_sampling", best_of_n, out, r, policy_dir,
                      problems[f"rejection_sampling_{r}"], ranking)  # fmt: skip
        curves.append(curve)
        report_curve(curve)
        finetunes = [(f"rejection sampling{'' if r == 1 else f' round {r}'}", finetune_best_of, out / round_name(r))]
        if r == 1:  # the control: the same fine-tuning of the SFT model on one random sample per prompt
            finetunes.append(("control: random", 1, out / "random_sample_control"))
        for name, k, model_dir in finetunes:
            timed(seconds, "rejection_sampling", finetune_on_favourites, out, r, k, policy_dir, model_dir, sizes, seed)
            stages[name] = report_stage(name, evaluate(model_dir, held_out, held_out_unsafe))
        policy_dir = out / round_name(r)
    if not plot_best_of_n(curves, out / "max_vs_median_reward.png"):
        report_no_plot()

    tokenizer = load_tokenizer(str(out / "sft"))
    for result in stages.values():
        result["mean_reward"] = mean_reward(rewards["helpfulness"], tokenizer, held_out, result.pop("answers"))
        unsafe_answers = result.pop("unsafe_answers")
        result["mean_safety_reward"] = mean_reward(rewards["safety"], tokenizer, held_out_unsafe, unsafe_answers)

    heading("6. chatting with the result through pipeline('text-generation')")
    report_chat(chat_demo(policy_dir, held_out[:3] + held_out_unsafe[:1]))

    seconds["total"] = time.perf_counter() - start
    metrics = {
        "stages": stages,
        "reward_model": reward_metrics,  # per objective
        "best_of_n": curves,  # per round of rejection sampling
        "model": model,
        "conversion": conversion,
        "held_out": {"safe": len(held_out), "unsafe": len(held_out_unsafe)},
        "sizes": asdict(sizes),
        "seconds": seconds,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    report_table(stages, len(held_out), len(held_out_unsafe), finetune_best_of)
    report_artefacts(out, seconds["total"])
    return metrics


# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96).
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean_interval(values: list[float]) -> dict:
    """Mean and 95% t-interval over seeds (each seed's run an independent draw of the whole recipe)."""
    mean, df = statistics.fmean(values), len(values) - 1
    half = (T_975[df - 1] if df <= len(T_975) else 1.96) * statistics.stdev(values) / len(values) ** 0.5
    return {"mean": mean, "low": mean - half, "high": mean + half, "values": values}


def across_seeds(runs: dict[int, dict]) -> dict:
    """Per stage and figure, the mean and 95% interval over seeds; and the same for the last rejection-sampling round's
    gain over SFT and over the random-sample control, seed by seed (paired: the stages of one seed share its data)."""
    first = next(iter(runs.values()))
    final = [name for name in first["stages"] if name.startswith("rejection sampling")][-1]
    stages = {
        stage: {key: mean_interval([r["stages"][stage][key] for r in runs.values()]) for key in figures}
        for stage, figures in first["stages"].items()
    }
    gains = {
        f"{final} - {base}": mean_interval(
            [r["stages"][final]["accuracy"] - r["stages"][base]["accuracy"] for r in runs.values()]
        )
        for base in ("sft", "control: random")
    }
    return {"seeds": list(runs), "stages": stages, "accuracy_gain": gains}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/recipe"))
    parser.add_argument("--quick", action="store_true", help="Small sizes: the same path in about a minute (CI).")
    parser.add_argument(
        "--seeds", "--seed", type=int, nargs="+", default=[0],
        help="One run per seed (in seed-N/ folders when several), then the mean and 95%% interval of each stage.",
    )  # fmt: skip
    parser.add_argument(
        "--finetune-best-of", type=int, default=max(NS), choices=NS, help="Fine-tune on the favourite of this many."
    )
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    return args


def timed(seconds: dict[str, float], name: str, stage, *args, **kwargs):
    """Run a stage and add its wall time to `seconds[name]`."""
    start = time.perf_counter()
    result = stage(*args, **kwargs)
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    return result


# Reporting: everything the recipe prints, in the order `main` prints it.


def heading(title: str) -> None:
    print(f"\n== {title} ==")


def report_model(model: dict) -> None:
    print(f"tiny Llama 2: {model['parameters'] / 1e6:.2f}M parameters, {model['layers']} layers, "
          f"GQA {model['heads']} query / {model['kv_heads']} KV heads; "
          f"final pretraining loss {model['final_loss']:.3f}")  # fmt: skip


def report_conversion(out: Path, conversion: dict) -> None:
    print(f"llama2-convert hf-to-meta --input-dir {out / 'pretrained'} --output-dir {out / 'meta'} --num-shards 1")
    print(f"llama2-convert meta-to-hf --input-dir {out / 'meta'} --output-dir {out / 'base'} --chat "
          f"--max-position-embeddings {CONTEXT}")  # fmt: skip
    for name, cls in conversion["auto_model_for_causal_lm"].items():
        print(f"AutoModelForCausalLM.from_pretrained({str(out / name)!r}) -> {cls}")


def report_stage(stage: str, result: dict) -> dict:
    print(f"{stage}: held-out exact-answer accuracy {result['accuracy']:.1%} in the chat format, "
          f"{result['accuracy_raw_text']:.1%} as raw text `digits=`; unsafe requests answered "
          f"{result['safety_violation_rate']:.1%}, safe ones refused {result['refusal_rate_on_safe']:.1%}")  # fmt: skip
    return result


def report_reward_models(metrics: dict[str, dict]) -> None:
    for objective, figures in metrics.items():
        print(f"{objective} reward model ranks held-out pairs right: {figures['eval_accuracy']:.1%}")


def report_refresh(policy_dir: Path, figures: dict, epochs: float) -> None:
    print(f"helpfulness reward model, {epochs:g} more epoch{'' if epochs == 1 else 's'} on {figures['pairs']} pairs "
          f"of {policy_dir.name}'s samples: ranks the SFT model's held-out pairs right "
          f"{figures['eval_accuracy']:.1%}")  # fmt: skip


def report_no_plot() -> None:
    print("matplotlib is not installed: the max-vs-median reward plot was skipped (the curves are in metrics.json)")


def report_curve(curve: list[dict]) -> None:
    print("\n  N   mean max reward   mean median reward   RM's pick right   any sample right")
    for p in curve:
        print(
            f"{p['n']:3d}   {p['max']:15.3f}   {p['median']:18.3f}   {p['accuracy_of_best']:15.1%}   "
            f"{p['any_right']:16.1%}"
        )


def report_chat(turns: list[dict]) -> None:
    for turn in turns:
        print(f"user: {turn['user']}\nassistant: {turn['assistant']}   [{'right' if turn['right'] else 'wrong'}]")


def report_table(stages: dict[str, dict], n: int, n_unsafe: int, best_of: int) -> None:
    print(f"\n{n} safe and {n_unsafe} unsafe held-out requests, greedy answers; rewards from the two reward models "
          f"(trained on SFT); rejection sampling fine-tuned on the best of {best_of} by the combined reward")
    print(f"{'stage':26s} {'helpful (chat)':>14s} {'raw text':>9s} {'unsafe answered':>16s} {'safe refused':>13s} "
          f"{'helpfulness RM':>15s} {'safety RM':>10s}")  # fmt: skip
    for name, r in stages.items():
        print(f"{name:26s} {r['accuracy']:14.1%} {r['accuracy_raw_text']:9.1%} {r['safety_violation_rate']:16.1%} "
              f"{r['refusal_rate_on_safe']:13.1%} {r['mean_reward']:15.3f} {r['mean_safety_reward']:10.3f}")


def report_seeds(summary: dict, out: Path) -> None:
    seeds = " ".join(map(str, summary["seeds"]))
    print(f"\nseeds {seeds}: held-out accuracy (chat), mean [95% interval over seeds] (each seed's value)")
    rows = {name: figures["accuracy"] for name, figures in summary["stages"].items()} | summary["accuracy_gain"]
    for name, a in rows.items():
        values = " ".join(f"{v:.1%}" for v in a["values"])
        print(f"{name:36s} {a['mean']:7.1%} [{a['low']:6.1%}, {a['high']:6.1%}]   ({values})")
    print(f"\nper-seed runs in {out}/seed-*/, the summary in {out / 'metrics.json'}")


def report_artefacts(out: Path, wall: float) -> None:
    print(f"\nmetrics written to {out / 'metrics.json'}\nartefacts:")
    for name, path in ARTEFACTS.items():
        print(f"  {name:52s} {out / path}")
    print(f"\ntotal wall time {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
