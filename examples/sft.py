"""Supervised fine-tuning of Llama 2 on chat data, loss on answers only, packed (Llama 2-Chat's SFT stage).

    accelerate launch examples/sft.py --model PATH --train-file sft.jsonl --output-dir out/sft --num-epochs 2

See examples/README.md for the data format and flags; every `TrainingArguments` flag works too.
"""

from modeling_llama2.alignment.sft import SFTArguments, run_sft
from modeling_llama2.alignment.training import ModelArguments, cli, parse_args


@cli  # a data error: one `error: ...` line, exit code 2
def main(argv: list[str] | None = None) -> None:
    model_args, sft_args, training_args = parse_args(
        ModelArguments,
        SFTArguments,
        argv=argv,
        learning_rate=2e-5,
        lr_scheduler_type="cosine",
        num_train_epochs=2,
    )
    run_sft(model_args, sft_args, training_args)


if __name__ == "__main__":
    main()
