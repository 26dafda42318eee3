"""Convert Llama 2 checkpoints between Meta's release format, llama2.c and Hugging Face.

Run `llama2-convert --help` (or `python -m conversion --help`).
"""
