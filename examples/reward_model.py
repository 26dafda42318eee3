"""Train a Llama 2-Chat reward model (helpfulness or safety) from the SFT model with the margin ranking loss.

    accelerate launch examples/reward_model.py --model out/sft --train-file pairs.jsonl --eval-file pairs_eval.jsonl \
        --objective helpfulness --margin small --output-dir out/rm_helpfulness --num-epochs 1

The same as `llama2-reward-model` and `python -m modeling_llama2.alignment.reward`.
See examples/README.md for the data format and flags; every `TrainingArguments` flag works too.
"""

from modeling_llama2.alignment.reward import main

if __name__ == "__main__":
    main()
