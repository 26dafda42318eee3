"""Convert Llama 2 checkpoints between Meta's release format, llama2.c and Hugging Face.

Run `llama2-convert --help` (or `python -m llama2_convert --help`).
"""


class ConversionError(ValueError):
    """Bad input: the message says what is wrong and what to do about it."""
