"""Rejection sampling as in Llama 2-Chat's RLHF V1-V4: N responses per prompt from the policy, scored by the reward
model(s), the best kept as new SFT data.

    llama2-rejection-sampling --model out/sft --helpfulness-rm out/rm_helpfulness --prompts prompts.jsonl \
        --output-dir out/rs_v1 [--finetune]
"""

import gc
import json
import logging
import os
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from ..chat_format import encode_dialog, forbidden_in, tokenizer_encoder
from ..inference import decoding
from ..modeling_llama2 import Llama2ForCausalLM, Llama2ForSequenceClassification, context_length
from .data import load_records
from .scoring import combined_reward, encode_response, prompt_messages, score
from .sft import SFTArguments, run_sft
from .training import InputError, ModelArguments, cli, load_tokenizer, parse_args, write_jsonl

logger = logging.getLogger(__name__)


@dataclass
class SamplingArguments:
    prompts: str = field(
        metadata={
            "help": 'Data file (JSON Lines, Parquet, ...) or data set of {"prompt"} or {"messages"} ending with a user '
            'turn, optionally {"unsafe": true}.'
        }
    )
    helpfulness_rm: str | None = field(default=None, metadata={"help": "Helpfulness reward model directory."})
    safety_rm: str | None = field(default=None, metadata={"help": "Safety reward model directory."})
    num_samples: int = field(default=8, metadata={"help": "Responses sampled per prompt (N)."})
    prompts_per_batch: int = field(
        default=1,
        metadata={
            "help": "Prompts sampled together, as one batch of prompts x N rows: faster where N rows leave the "
            "device idle (a small model); each prompt is kept once, its N rows' own tokens apart."
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature; 0 decodes greedily."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling threshold."})
    max_new_tokens: int = field(default=512, metadata={"help": "Longest response sampled."})
    compile: bool = field(
        default=True,
        metadata={
            "help": "Decode through one compiled static-cache step (the default); --no-compile decodes eagerly, "
            "which can be faster for tiny models on a CPU."
        },
    )
    finetune: bool = field(default=False, metadata={"help": "Fine-tune the policy on the best responses right away."})
    max_length: int = field(default=4096, metadata={"help": "Tokens per sample for --finetune."})


def check_sampling_args(args: SamplingArguments) -> None:
    """Refuse settings that cannot give a best of N, before anything is loaded."""
    if not (args.helpfulness_rm or args.safety_rm):
        raise InputError("give --helpfulness-rm, --safety-rm or both.")
    if args.num_samples < 1:
        raise InputError(f"--num-samples must be at least 1 (N responses per prompt), got {args.num_samples}.")
    if args.prompts_per_batch < 1:
        raise InputError(f"--prompts-per-batch must be at least 1, got {args.prompts_per_batch}.")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    if not args.temperature >= 0:
        raise InputError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}.")
    if not 0 <= args.top_p <= 1:
        raise InputError(f"--top-p must be in [0, 1], got {args.top_p}.")


def reward_model_config(path: str, objective: str) -> PreTrainedConfig:
    """The config of the reward model at `path`, checked before any weights are loaded: it must exist and be a
    one-output sequence classifier (a causal LM would be scored by a randomly initialized head) trained for
    `objective` when its label says so."""
    flag = f"--{objective}-rm"
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        local = os.path.isabs(os.path.expanduser(path)) or path.startswith(".")  # else maybe a Hub id
        reason = "no such folder" if local and not os.path.isdir(path) else f"no model there ({str(e).splitlines()[0]})"
        raise InputError(f"{flag} {path}: {reason}.") from e
    architectures = config.architectures or []
    if config.num_labels != 1 or not any(name.endswith("ForSequenceClassification") for name in architectures):
        raise InputError(
            f"{flag} {path} is not a reward model (architectures {architectures}, num_labels {config.num_labels}): "
            "its score head would be random. Train one with examples/reward_model.py."
        )
    trained_for = config.id2label.get(0)
    if trained_for in ("helpfulness", "safety") and trained_for != objective:
        raise InputError(f"{flag} {path} is a {trained_for} reward model; swap the two paths.")
    return config


CACHE_BUCKET = 256  # static caches are sized in steps of this, so prompts of similar length share one compiled step


@torch.no_grad()
def sample_prompts(
    model: PreTrainedModel,
    prompts: list[list[int]],
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    pad_token_id: int = 0,
    compile: bool = True,
) -> list[list[list[int]]]:
    """Token ids of `n` responses to each prompt (cut before the EOS), per prompt. The prompts are left-padded and
    prefilled once, each kept once for its `n` rows (`decoding.sample_n`), and decoded as one batch of
    `len(prompts) * n` rows, which on a small model costs little more per step than `n` rows do. Every token comes
    from one static-cache step (compiled unless `compile` is false). Decoding stops early on the first of several
    EOS ids; the others are cut here."""
    if not prompts or not all(prompts):
        raise ValueError("A prompt needs at least one token (BOS).")
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    longest = max(map(len, prompts))
    length = longest + max_new_tokens
    if compile:  # one compiled step per bucket; eager steps attend over fewer empty slots without one
        length = -(-length // CACHE_BUCKET) * CACHE_BUCKET
    sampling = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, eos_token_id=eos[0],
        pad_token_id=pad_token_id, max_cache_len=length, compile=compile,
    )  # fmt: skip
    padded = torch.tensor([[pad_token_id] * (longest - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    samples = decoding.sample_n(model, padded, n=n, attention_mask=mask, **sampling)
    responses = []
    for row in samples[:, longest:].tolist():
        end = next((i for i, token in enumerate(row) if token in eos), len(row))
        responses.append(row[:end])
    return [responses[i : i + n] for i in range(0, len(responses), n)]


def load_prompts(path: str) -> list[dict]:
    """Prompt records as `{"messages", "unsafe"}`, each dialog ending with the user turn to answer, from any data file
    or data set `load_records` reads."""
    prompts = []
    records, where = load_records(path)
    for i, record in enumerate(records):
        present = {key for key, value in record.items() if value is not None}
        if not {"prompt", "messages"} & present:
            raise InputError(f'{where.where(i)}: need "prompt" (text) or "messages" (a dialog), got {sorted(present)}.')
        messages = prompt_messages(record.get("messages") or record["prompt"])
        if not messages or messages[-1].get("role") != "user":
            raise InputError(f"{where.where(i)}: the dialog must end with the user message to answer.")
        prompts.append({"messages": messages, "unsafe": bool(record.get("unsafe"))})
    if not prompts:
        raise InputError(f"{path} holds no prompts.")
    return prompts


def rejection_sample(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reward_models: dict[str, PreTrainedModel],
    prompts: list[dict],
    args: SamplingArguments,
) -> list[dict]:
    """For each prompt, sample `args.num_samples` responses, score them and keep the best.

    `reward_models` maps `helpfulness` and/or `safety` to a reward model; with both, responses are ranked by the
    paper's combined reward. Rewards are reported as probabilities (the sigmoid of the reward model's score).
    Returns SFT records `{"messages", "reward"}` with every candidate under `"samples"`; a prompt none of whose
    samples the chat format accepts gets no record.
    """
    encode = tokenizer_encoder(tokenizer)
    records, refused = [], 0
    context = context_length(policy.config)
    all_ids = []
    for i, prompt in enumerate(prompts, 1):  # all checked before the first is sampled
        try:
            prompt_ids = encode_dialog(prompt["messages"], encode, tokenizer.bos_token_id, tokenizer.eos_token_id)[0]
        except ValueError as e:
            raise InputError(f"Prompt {i}: {e}") from e
        all_ids.append(prompt_ids)
        if context is not None and len(prompt_ids) + args.max_new_tokens > context:
            raise InputError(
                f"Prompt {i} has {len(prompt_ids)} tokens; with --max-new-tokens {args.max_new_tokens} it exceeds the "
                f"model's context of {context} tokens. Shorten or drop the prompt, or lower --max-new-tokens."
            )
    batch, progress = args.prompts_per_batch, tqdm(total=len(prompts), desc=f"best of {args.num_samples}")
    for start in range(0, len(prompts), batch):
        sampled = sample_prompts(
            policy, all_ids[start : start + batch], args.num_samples, args.max_new_tokens, args.temperature,
            args.top_p, tokenizer.pad_token_id, args.compile,
        )  # fmt: skip
        responses = [[tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in s] for s in sampled]
        # A sample that spells a control token or a chat tag in text (`<`, `s`, `>` as ordinary pieces) cannot be
        # training data: the chat format refuses it. It keeps its place among the samples with reward 0, never kept.
        usables = [[i for i, text in enumerate(texts) if not forbidden_in(text)] for texts in responses]
        rewards = score_samples(tokenizer, reward_models, prompts[start : start + batch], responses, usables)
        for prompt, texts, usable, reward in zip(prompts[start : start + batch], responses, usables, rewards,
                                                 strict=True):  # fmt: skip
            samples = [{"response": r, "reward": x} for r, x in zip(texts, reward.tolist(), strict=True)]
            for i in set(range(len(texts))) - set(usable):
                samples[i]["refused"] = True
            if not usable:
                refused += 1
                continue
            best = max(usable, key=lambda i: reward[i])
            records.append(
                {
                    "messages": [*prompt["messages"], {"role": "assistant", "content": texts[best]}],
                    "reward": reward[best].item(),
                    "samples": samples,
                }
            )
        progress.update(len(sampled))
    progress.close()
    if refused:
        logger.warning(f"Dropped {refused} prompt(s) all of whose samples spell a control token or chat tag in text.")
    return records


def score_samples(
    tokenizer: PreTrainedTokenizerBase,
    reward_models: dict[str, PreTrainedModel],
    prompts: list[dict],
    responses: list[list[str]],
    usables: list[list[int]],
) -> list[torch.Tensor]:
    """Reward of each prompt's responses (the combined reward with both models), scored in one batch per reward
    model; only the `usables` (indices per prompt) are scored, the others keep reward 0. A response drawn several
    times for a prompt is scored once: a policy worth sampling from repeats its answers (in the recipe's first round,
    37% of the samples were distinct), and scoring costs more than sampling did."""
    where, rows, unsafe, row_of = [], [], [], {}
    for p, (prompt, texts, usable) in enumerate(zip(prompts, responses, usables, strict=True)):
        for i in usable:
            if (key := (p, texts[i])) not in row_of:
                row_of[key] = len(rows)
                rows.append(encode_response(tokenizer, prompt["messages"], texts[i])[0])
                unsafe.append(prompt["unsafe"])
            where.append((p, i, row_of[key]))
    rewards = [torch.zeros(len(texts)) for texts in responses]
    if not rows:
        return rewards
    scores = {name: score(model, rows, tokenizer.pad_token_id).float().cpu() for name, model in reward_models.items()}
    if len(scores) == 2:
        logits = combined_reward(scores["helpfulness"], scores["safety"], torch.tensor(unsafe))
    else:
        (logits,) = scores.values()
    per_row = torch.sigmoid(logits).tolist()
    for p, i, row in where:
        rewards[p][i] = per_row[row]
    return rewards


def reward_curve(rewards: torch.Tensor) -> list[dict]:
    """Mean over prompts of the maximum and the median reward among the first N samples, N = 1, 2, 4, ... (the paper's
    Figure 7). `rewards` is prompts x samples; samples are i.i.d., so the first N stand for any N."""
    curve, n = [], 1
    while n <= rewards.shape[1]:
        first = rewards[:, :n]
        curve.append(
            {"n": n, "max": first.max(1).values.mean().item(), "median": first.quantile(0.5, dim=1).mean().item()}
        )
        n *= 2
    return curve


def plot_reward_curve(curve: list[dict], path: str) -> bool:
    """Plot `reward_curve` to `path`; returns False, plotting nothing, where matplotlib (optional) is not
    installed: the curve is in `reward_vs_n.json` anyway."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [point["n"] for point in curve]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(n, [p["max"] for p in curve], "o-", label="max of N")
    ax.plot(n, [p["median"] for p in curve], "s--", label="median of N")
    ax.fill_between(n, [p["median"] for p in curve], [p["max"] for p in curve], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(v) for v in n])
    ax.set_xlabel("N samples")
    ax.set_ylabel("reward (mean over prompts)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@cli  # a mistake in the arguments or data: one `error: ...` line, exit code 2
def main(argv: list[str] | None = None) -> None:
    """`llama2-rejection-sampling`: best of N under the reward model(s), written as SFT data with the reward curve,
    optionally fine-tuned on right away."""
    model_args, args, training_args = parse_args(
        ModelArguments,
        SamplingArguments,
        argv=argv,
        learning_rate=2e-5,
        lr_scheduler_type="cosine",
        num_train_epochs=2,
    )
    # Everything that can be checked without weights is checked before the policy is loaded.
    check_sampling_args(args)
    prompts = load_prompts(args.prompts)
    paths = {name: path for name, path in (("helpfulness", args.helpfulness_rm), ("safety", args.safety_rm)) if path}
    for name, path in paths.items():
        reward_model_config(path, name)

    set_seed(training_args.seed)
    device = training_args.device
    tokenizer = load_tokenizer(model_args.model)
    policy = Llama2ForCausalLM.from_pretrained(
        model_args.model, dtype="auto", attn_implementation=model_args.attn_implementation
    )
    policy = policy.to(device).eval()
    reward_models = {
        name: Llama2ForSequenceClassification.from_pretrained(path, dtype="auto").to(device).eval()
        for name, path in paths.items()
    }
    records = rejection_sample(policy, tokenizer, reward_models, prompts, args)

    os.makedirs(training_args.output_dir, exist_ok=True)
    data_path = os.path.join(training_args.output_dir, "best_of_n.jsonl")
    write_jsonl(data_path, records)
    curve = reward_curve(torch.tensor([[sample["reward"] for sample in r["samples"]] for r in records]))
    with open(os.path.join(training_args.output_dir, "reward_vs_n.json"), "w") as f:
        json.dump(curve, f, indent=2)
    if not plot_reward_curve(curve, os.path.join(training_args.output_dir, "reward_vs_n.png")):
        print("reward_vs_n.png skipped: matplotlib is not installed (pip install matplotlib); see reward_vs_n.json.")
    print("    N   mean max   mean median")
    for point in curve:
        print(f"{point['n']:5d}   {point['max']:.4f}     {point['median']:.4f}")

    if args.finetune:
        del policy, reward_models
        gc.collect()
        run_sft(model_args, SFTArguments(train_file=data_path, max_length=args.max_length), training_args)


if __name__ == "__main__":
    main()
