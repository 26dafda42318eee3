"""Supervised fine-tuning of Llama 2 on chat data, loss on answers only, packed (Llama 2-Chat's SFT stage).

    accelerate launch examples/sft.py --model PATH --train-file sft.jsonl --output-dir out/sft --num-epochs 2

The same as `llama2-sft` and `python -m modeling_llama2.alignment.sft`.
See examples/README.md for the data format and flags; every `TrainingArguments` flag works too.
"""

from modeling_llama2.alignment.sft import main

if __name__ == "__main__":
    main()
