"""Rejection sampling (Llama 2-Chat RLHF V1-V4): best of N responses per prompt under the reward model(s), written
as a new SFT data set, optionally fine-tuned on right away.

    python examples/rejection_sampling.py --model out/sft --helpfulness-rm out/rm_helpfulness \
        --safety-rm out/rm_safety --prompts prompts.jsonl --num-samples 16 --output-dir out/rs_v1 [--finetune]

Writes best_of_n.jsonl, reward_vs_n.json and reward_vs_n.png (when matplotlib is installed) to --output-dir (and the
fine-tuned model with --finetune). The same as `llama2-rejection-sampling`. See examples/README.md.
"""

from modeling_llama2.alignment.rejection_sampling import main

if __name__ == "__main__":
    main()
