"""Llama 2-Chat's alignment steps on transformers' `Trainer`: supervised fine-tuning with the prompt masked out of
the loss (`sft`), margin-ranking reward models (`reward`) and best-of-N rejection sampling (`rejection_sampling`).
They are peers that share `training` (data, command line, the run and the save) and `scoring` (reward models)."""
