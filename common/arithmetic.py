"""The built-in task: multi-step arithmetic whose every step can be checked on its own.

A problem chains two or three additions or subtractions of two-digit numbers:

    Compute 44-21+62.

and a worked answer writes one operation per step, steps separated by a blank line, ending in
`\\boxed{}` so that the verifier, the step splitting and the prompt path are the same as for
GSM8K or MATH:

    first 44-21=23

    then 23+62=85

    \\boxed{85}

Demonstrations (used only to warm-start the tiny model, see `common/build_tiny.py`) are
deliberately imperfect, so that reinforcement learning has something left to fix:
- a share of them make one slip (off by 1 or 10) and carry it to a wrong answer;
- a share slip, notice it with "wait" and redo the step;
- a share of the correct ones "check" the last step again before answering.
"first", "then", "wait" and "check" are the planning phrases that methods looking for planning
tokens (HICRA) can find. Training problems are unlimited (drawn by index from a seed); the
held-out set is a fixed 500 problems that never occur in training.
"""

import random
import re
from functools import lru_cache

STEP_SEPARATOR = "\n\n"
HELDOUT_SIZE = 500
HELDOUT_SEED = "heldout"
MIN_VALUE, MAX_VALUE = 10, 99
PLANNING_WORDS = ("first", "then", "wait", "check")

# A step such as "then 23+62=85": an optional planning word, then one equation.
_STEP_PATTERN = re.compile(r"^(?:(first|then|wait|check) )?(\d+)([+-])(\d+)=(-?\d+)$")


def _apply(left: int, op: str, right: int) -> int:
    return left + right if op == "+" else left - right


def sample_problem(rng: random.Random) -> dict:
    """A random problem whose operands and intermediate results all lie in [10, 99]."""
    num_ops = rng.choice((2, 3))
    value = rng.randint(MIN_VALUE, MAX_VALUE)
    terms = [value]
    ops = []
    for _ in range(num_ops):
        op = rng.choice("+-")
        # Pick the right operand so that the running value stays two-digit.
        low, high = (MIN_VALUE, MAX_VALUE - value) if op == "+" else (MIN_VALUE, value - MIN_VALUE)
        if high < low:
            op = "-" if op == "+" else "+"
            low, high = (MIN_VALUE, MAX_VALUE - value) if op == "+" else (MIN_VALUE, value - MIN_VALUE)
        right = rng.randint(low, high)
        value = _apply(value, op, right)
        ops.append(op)
        terms.append(right)
    expression = str(terms[0]) + "".join(f"{op}{term}" for op, term in zip(ops, terms[1:]))
    return {"question": f"Compute {expression}.", "answer": str(value), "terms": terms, "ops": ops}


@lru_cache(maxsize=1)
def heldout_problems() -> tuple[dict, ...]:
    """The fixed held-out set: 500 distinct problems drawn from their own seed."""
    rng = random.Random(HELDOUT_SEED)
    problems: dict[str, dict] = {}
    while len(problems) < HELDOUT_SIZE:
        problem = sample_problem(rng)
        problems.setdefault(problem["question"], problem)
    return tuple(problems.values())


@lru_cache(maxsize=1)
def _heldout_questions() -> frozenset[str]:
    return frozenset(problem["question"] for problem in heldout_problems())


def train_problem(seed: int, index: int) -> dict:
    """Training problem number `index` of the unlimited stream for `seed`; never a held-out one.

    Drawn from its own string-seeded generator, so any position of the stream can be produced
    directly (a resumed run sees exactly the problems it would have seen).
    """
    rng = random.Random(f"train-{seed}-{index}")
    while True:
        problem = sample_problem(rng)
        if problem["question"] not in _heldout_questions():
            return problem


def demonstration(problem: dict, rng: random.Random, slip_prob: float = 0.3,
                  corrected_slip_prob: float = 0.1, check_prob: float = 0.2) -> str:
    """A worked answer for `problem`, imperfect on purpose (see the module docstring)."""
    terms, ops = problem["terms"], problem["ops"]
    kind = rng.random()
    slip_step = rng.randrange(len(ops)) if kind < slip_prob + corrected_slip_prob else -1
    corrected = slip_prob <= kind < slip_prob + corrected_slip_prob
    steps = []
    value = terms[0]
    for index, (op, right) in enumerate(zip(ops, terms[1:])):
        word = "first" if index == 0 else "then"
        result = _apply(value, op, right)
        if index == slip_step:
            slipped = result + rng.choice((-10, -1, 1, 10))
            steps.append(f"{word} {value}{op}{right}={slipped}")
            if corrected:
                steps.append(f"wait {value}{op}{right}={result}")
            else:
                result = slipped
        else:
            steps.append(f"{word} {value}{op}{right}={result}")
        last_equation = f"{value}{op}{right}={result}"
        value = result
    if slip_step < 0 and rng.random() < check_prob:
        steps.append(f"check {last_equation}")
    steps.append(f"\\boxed{{{value}}}")
    return STEP_SEPARATOR.join(steps)


def split_steps(response: str) -> list[str]:
    """The steps of a response: the text between blank lines, empty pieces dropped."""
    return [step.strip() for step in response.split(STEP_SEPARATOR) if step.strip()]


def check_step(step: str) -> bool | None:
    """Whether one step is right on its own: True/False for an equation, None for anything else.

    The per-step checker that process-reward methods can use as an exact step verifier.
    """
    match = _STEP_PATTERN.match(step.strip())
    if match is None:
        return None
    _, left, op, right, claimed = match.groups()
    return _apply(int(left), op, int(right)) == int(claimed)
