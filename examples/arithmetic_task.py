"""A synthetic task whose answers can be checked exactly: adding two numbers below 100.

It supplies every data set of the recipe (`examples/recipe.py`): raw pretraining text (`23+45=68`), chat
instructions for SFT ("What is 23+45?" -> "23+45=68"), preference pairs whose rating says how wrong the rejected
answer is, prompts for rejection sampling, and a checker for the answers a model gives.
"""

import random
import re
from typing import NamedTuple

QUESTIONS = (  # each spells the sum as in pretraining, so a tiny model can find the operands
    "What is {a}+{b}?",
    "Compute {a}+{b}.",
    "How much is {a}+{b}?",
    "Please work out {a}+{b} for me.",
    "{a}+{b} is what?",
    "Tell me the value of {a}+{b}.",
)
LARGEST = 99


class Problem(NamedTuple):
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b


def split_problems(rng: random.Random, sizes: dict[str, int]) -> dict[str, list[Problem]]:
    """Disjoint sets of distinct problems, one per name in `sizes` (so held-out problems are never trained on)."""
    every = [Problem(a, b) for a in range(LARGEST + 1) for b in range(LARGEST + 1)]
    if sum(sizes.values()) > len(every):
        raise ValueError(f"asked for {sum(sizes.values())} problems; there are only {len(every)}")
    rng.shuffle(every)
    splits, start = {}, 0
    for name, n in sizes.items():
        splits[name], start = every[start : start + n], start + n
    return splits


def equation(problem: Problem, result: int | None = None) -> str:
    """`23+45=68`, the pretraining text and the assistant's answer (with `result` instead of the sum if given)."""
    return f"{problem.a}+{problem.b}={problem.answer if result is None else result}"


def question(problem: Problem, rng: random.Random) -> str:
    return rng.choice(QUESTIONS).format(a=problem.a, b=problem.b)


def sft_record(problem: Problem, rng: random.Random) -> dict:
    return {"prompt": question(problem, rng), "response": equation(problem)}


def wrong_result(problem: Problem, rng: random.Random) -> int:
    """A plausible wrong sum: off by one or two, a carry dropped or added (off by ten), or far off."""
    while True:
        offset = rng.choice([rng.choice([1, 2]), 10, rng.randint(3, 60)]) * rng.choice([-1, 1])
        if problem.answer + offset >= 0:
            return problem.answer + offset


def rating(error: int) -> str:
    """How much better the right answer is than one that is `error` off (the Llama 2 paper's four levels)."""
    error = abs(error)
    if error >= 10:
        return "significantly better"
    if error >= 3:
        return "better"
    if error == 2:
        return "slightly better"
    return "negligibly better / unsure"


def preference_pair(problem: Problem, rng: random.Random) -> dict:
    """A comparison for the reward model: the right answer is chosen over a wrong one."""
    wrong = wrong_result(problem, rng)
    return {
        "prompt": question(problem, rng),
        "chosen": equation(problem),
        "rejected": equation(problem, wrong),
        "rating": rating(wrong - problem.answer),
    }


def is_correct(problem: Problem, response: str) -> bool:
    """Exact-answer check: the response's last number is the sum."""
    numbers = re.findall(r"\d+", response)
    return bool(numbers) and int(numbers[-1]) == problem.answer
