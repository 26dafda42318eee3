"""Tiny tokenizer, models and data for the alignment trainer tests (no downloads)."""

import importlib.util
import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from modeling_llama2 import Llama2Config, Llama2ForCausalLM
from modeling_llama2.alignment.training import write_jsonl  # noqa: F401  (the tests' too)

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a cat dog bird sat ran flew on under mat tree house red blue green big small happy sad".split()
COLORS = ["red", "blue", "green"]
ANIMALS = ["cat", "dog", "bird"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-like fast tokenizer (metaspace BPE, byte fallback, `<unk>`/`<s>`/`</s>` = 0/1/2) trained on a few KB."""
    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    text += ["[INST] <<SYS>>\n be nice \n<</SYS>>\n\n what color is the cat? [/INST] the cat is red"] * 20
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(text, trainers.BpeTrainer(vocab_size=360, special_tokens=specials, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    pad_token_id=0,
)
# The alignment tests' models: narrower, a longer context, no pad token unless given.
ALIGNMENT = dict(hidden_size=32, intermediate_size=64, max_position_embeddings=256, pad_token_id=None)


def tiny_config(**overrides) -> Llama2Config:
    return Llama2Config(**{**TINY, **overrides})


def prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random prompt ids for a `tiny_config` model (no pad id 0, no id past its vocabulary)."""
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_reference(model, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """transformers' default `generate`, greedy, no EOS: the tokens a decode path must reproduce."""
    return model.generate(
        input_ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None, **kwargs
    )


def alignment_config(vocab_size: int, **overrides) -> Llama2Config:
    return tiny_config(**{**ALIGNMENT, "vocab_size": vocab_size, **overrides})


def save_causal_lm(path: Path, seed: int = 0) -> Path:
    """A tiny random causal LM with its tokenizer, saved like a real checkpoint."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    Llama2ForCausalLM(alignment_config(len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def qa_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Questions with one right, learnable answer each."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        animal, color = rng.choice(ANIMALS), rng.choice(COLORS)
        pairs.append((f"the {animal} is {color}. what color is the {animal}?", f"the {animal} is {color}"))
    return pairs


def run_script(name: str, *args) -> None:
    """Run `examples/<name>`'s `main(argv)` in this process: the command line's whole path without paying a fresh
    interpreter's imports, and under the tests' fixtures (`cheap_compile` included). On one thread, as
    `launch_script` runs them: the tiny models' kernels gain nothing from more, and lose much when cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        load_script(name).main([str(arg) for arg in args])
    finally:
        torch.set_num_threads(threads)


def launch_script(launcher: tuple[str, ...], name: str, *args, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run `examples/<name>` under `launcher` (torchrun, say) in fresh processes on one CPU thread each; fail with
    their output if they fail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    command = [*launcher, str(REPO / "examples" / name), *map(str, args)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def logged_losses(output_dir: Path, key: str = "loss") -> list[float]:
    return losses_in(json.loads((output_dir / "trainer_state.json").read_text())["log_history"], key)


def losses_in(log_history: list[dict], key: str = "loss") -> list[float]:
    return [entry[key] for entry in log_history if key in entry]


def load_script(name: str):
    """`examples/<name>` as a module, so a test can call its `main(argv)` in this process."""
    spec = importlib.util.spec_from_file_location(f"examples_{name.removesuffix('.py')}", REPO / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_error(name: str, *args, capsys) -> str:
    """Run `examples/<name>`'s `main` in-process on arguments that must be refused: it exits with code 2 after one
    `error: ...` line (the last, after any progress bar of the data's loading) and no traceback. Returns that line."""
    capsys.readouterr()  # what the test printed before
    with pytest.raises(SystemExit) as exit_info:
        load_script(name).main([str(arg) for arg in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]
