"""A synthetic task whose answers can be checked exactly: sorting eight digits (`51706749=01456779`).

Two-digit addition was tried first and is out of reach of the recipe's budget: a 0.6M model pretrained for 2500 steps
on CPU memorized training sums (2% right on new ones), and with the sum written least significant digit first (which
makes addition learnable for small transformers, given far more steps) it got 7% right. The same model sorts eight
digits right 44% of the time after 250 steps and 92% after 400 (measured), and with 10^8 problems held-out ones are
never memorized.

It supplies every data set of the recipe (`examples/recipe.py`): raw pretraining text (`51706749=01456779`), chat
instructions for SFT (`51706749=` -> `01456779`: the prompt as in pretraining, so SFT can reuse what pretraining
learned), preference pairs whose rating says how many digits of the rejected answer are wrong, prompts for rejection
sampling, and a checker.
"""

import random
import re
from typing import NamedTuple

LENGTH = 8


class Problem(NamedTuple):
    digits: str

    @property
    def answer(self) -> str:
        return "".join(sorted(self.digits))


def split_problems(rng: random.Random, sizes: dict[str, int]) -> dict[str, list[Problem]]:
    """Disjoint sets of distinct problems, one per name in `sizes` (so held-out problems are never trained on)."""
    every = [Problem(f"{n:0{LENGTH}d}") for n in rng.sample(range(10**LENGTH), sum(sizes.values()))]
    splits, start = {}, 0
    for name, n in sizes.items():
        splits[name], start = every[start : start + n], start + n
    return splits


def question(problem: Problem) -> str:
    """`39140=`, the start of a pretraining line and the chat prompt."""
    return f"{problem.digits}="


def equation(problem: Problem) -> str:
    """`39140=01349`, the pretraining text."""
    return question(problem) + problem.answer


def sft_record(problem: Problem) -> dict:
    return {"prompt": question(problem), "response": problem.answer}


def near_miss(problem: Problem, rng: random.Random) -> str:
    """A plausible wrong answer: the sorted digits with one to three of them replaced."""
    while True:
        answer = list(problem.answer)
        for i in rng.sample(range(LENGTH), rng.randint(1, 3)):
            answer[i] = rng.choice("0123456789")
        if "".join(answer) != problem.answer:
            return "".join(answer)


def rating(wrong_digits: int) -> str:
    """How much better the right answer is than one with `wrong_digits` digits wrong (the paper's four levels)."""
    return "significantly better" if wrong_digits >= 3 else ("slightly better", "better")[wrong_digits - 1]


def preference_pair(problem: Problem, rng: random.Random, rejected: str | None = None) -> dict:
    """A comparison for the reward model: the right answer is chosen over `rejected` (a wrong answer; by default a
    near miss), rated by how many digits are wrong (an answer of the wrong length counts as far off)."""
    if rejected is None:
        rejected = near_miss(problem, rng)
    wrong = sum(map(str.__ne__, rejected, problem.answer)) if len(rejected) == LENGTH else LENGTH
    return {"prompt": question(problem), "chosen": problem.answer, "rejected": rejected, "rating": rating(wrong)}


def is_correct(problem: Problem, response: str) -> bool:
    """Exact-answer check: the response's last number is the sorted digits."""
    numbers = re.findall(r"\d+", response)
    return bool(numbers) and numbers[-1] == problem.answer
