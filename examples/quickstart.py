"""The package end to end in about a minute on a laptop CPU, with nothing downloaded.

    python examples/quickstart.py [--output-dir runs/quickstart] [--steps 300]

1. trains a small sentencepiece tokenizer on built-in arithmetic text ("12+7=19");
2. trains a tiny Llama 2 (grouped-query attention, 2 layers) on it for a few hundred steps;
3. saves model and fast tokenizer with `save_pretrained`;
4. loads them back with `AutoModelForCausalLM` / `AutoTokenizer` and answers held-out sums through
   `pipeline("text-generation")`, printing the measured accuracy before and after training.
"""

import argparse
import io
import random
import tempfile
from pathlib import Path

import sentencepiece
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import modeling_llama2  # noqa: F401  (registers Llama 2 with the Auto classes)
from conversion.tokenizer import save_tokenizer
from modeling_llama2 import Llama2Config, Llama2ForCausalLM


def sums(rng: random.Random, n: int) -> list[str]:
    return [f"{a}+{b}={a + b}" for a, b in ((rng.randrange(50), rng.randrange(50)) for _ in range(n))]


def train_tokenizer(corpus: list[str], path: Path) -> None:
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=300, hard_vocab_limit=False,
        byte_fallback=True, split_digits=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )  # fmt: skip
    path.write_bytes(model.getvalue())


def accuracy(generator, questions: list[str]) -> float:
    prompts = [q.split("=")[0] + "=" for q in questions]
    outputs = generator(prompts, max_new_tokens=4, do_sample=False, return_full_text=False)
    answers = [out[0]["generated_text"].strip().split()[0] if out[0]["generated_text"].strip() else "" for out in outputs]
    return sum(a == q.split("=")[1] for a, q in zip(answers, questions)) / len(questions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    train, held_out = sums(rng, 5000), sums(rng, 100)

    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(train, Path(tmp) / "tokenizer.model")
        tokenizer = save_tokenizer(Path(tmp) / "tokenizer.model", args.output_dir, chat=False, model_max_length=64)
    config = Llama2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=352, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = Llama2ForCausalLM(config)
    print(f"tiny Llama 2: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, GQA 4 query / 2 KV heads")

    tokenizer.pad_token = tokenizer.eos_token
    before = accuracy(pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu"), held_out)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=args.steps, pct_start=0.1)
    model.train()
    for step in (bar := tqdm(range(args.steps), desc="training")):
        batch = tokenizer([s + tokenizer.eos_token for s in rng.sample(train, 64)], return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval().save_pretrained(args.output_dir)

    loaded = AutoModelForCausalLM.from_pretrained(args.output_dir)
    loaded_tokenizer = AutoTokenizer.from_pretrained(args.output_dir)
    loaded_tokenizer.pad_token = loaded_tokenizer.eos_token
    generator = pipeline("text-generation", model=loaded, tokenizer=loaded_tokenizer, device="cpu")
    after = accuracy(generator, held_out)
    example = held_out[0].split("=")[0] + "="
    print(f"\nloaded {type(loaded).__name__} from {args.output_dir}")
    print(f"pipeline: {example!r} -> {generator(example, max_new_tokens=4, do_sample=False)[0]['generated_text']!r}")
    print(f"held-out sums answered exactly: {before:.0%} before training, {after:.0%} after {args.steps} steps")


if __name__ == "__main__":
    main()
