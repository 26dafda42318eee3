"""Rejection sampling (Llama 2-Chat RLHF V1-V4): best of N responses per prompt under the reward model(s), written
as a new SFT data set, optionally fine-tuned on right away.

    python examples/rejection_sampling.py --model out/sft --helpfulness-rm out/rm_helpfulness \
        --safety-rm out/rm_safety --prompts prompts.jsonl --num-samples 16 --output-dir out/rs_v1 [--finetune]

Writes best_of_n.jsonl, reward_vs_n.json and reward_vs_n.png (when matplotlib is installed) to --output-dir (and the
fine-tuned model with --finetune). See examples/README.md.
"""

import gc
import json
import os

import torch
from transformers import set_seed

from modeling_llama2 import Llama2ForCausalLM, Llama2ForSequenceClassification
from modeling_llama2.alignment.rejection_sampling import (
    SamplingArguments,
    check_sampling_args,
    load_prompts,
    plot_reward_curve,
    rejection_sample,
    reward_curve,
    reward_model_config,
)
from modeling_llama2.alignment.sft import SFTArguments, run_sft
from modeling_llama2.alignment.training import ModelArguments, cli, load_tokenizer, parse_args, write_jsonl


@cli  # a mistake in the arguments or data: one `error: ...` line, exit code 2
def main(argv: list[str] | None = None) -> None:
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
