"""Train a Llama 2-Chat reward model (helpfulness or safety) from the SFT model with the margin ranking loss.

    accelerate launch examples/reward_model.py --model out/sft --train-file pairs.jsonl --eval-file pairs_eval.jsonl \
        --objective helpfulness --margin small --output-dir out/rm_helpfulness --num-epochs 1

See examples/README.md for the data format and flags; every `TrainingArguments` flag works too.
"""

from modeling_llama2.alignment.reward import RewardArguments, run_reward_model
from modeling_llama2.alignment.training import ModelArguments, cli, parse_args


@cli  # a data error: one `error: ...` line, exit code 2
def main(argv: list[str] | None = None) -> None:
    model_args, reward_args, training_args = parse_args(
        ModelArguments,
        RewardArguments,
        argv=argv,
        learning_rate=1e-5,
        lr_scheduler_type="cosine",
        num_train_epochs=1,
    )
    run_reward_model(model_args, reward_args, training_args)


if __name__ == "__main__":
    main()
