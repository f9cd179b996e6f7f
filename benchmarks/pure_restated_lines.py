"""How much a policy farms the toy PRM's flaw: restated lines per response (README, PURE section).

    python benchmarks/pure_restated_lines.py tiny runs/<run>/checkpoints/step_80 ...

The toy PRM of the built-in task (common/prm.py) over-rates a true equation the response already
wrote earlier, so a policy trained on summed process rewards can gain by restating lines. For
each model this samples 4 responses (temperature 1, seed 0) to each of the first 128 held-out
problems and prints sampled accuracy, steps per response, and restated lines per response (a
step that checks as a true equation whose `a+b=c` already appeared earlier in the same response).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # common/ lives in the project root
from common.arithmetic import check_step, heldout_problems
from common.data import render_prompt
from common.model import load_model, load_tokenizer
from common.prm import split_into_steps
from common.rollout import generate
from common.verify import score_batch

PROBLEMS, SAMPLES, MAX_NEW_TOKENS = 128, 4, 96


def restated_lines(step_texts: list[str]) -> int:
    """Steps of one response that are true equations already written earlier in it."""
    seen, restated = set(), 0
    for text in step_texts:
        if check_step(text):
            equation = text.split()[-1]
            restated += equation in seen
            seen.add(equation)
    return restated


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="`tiny` or checkpoint folders (runs/<run>/checkpoints/step_N)")
    args = parser.parse_args()
    problems = list(heldout_problems())[:PROBLEMS]
    answers = [problem["answer"] for problem in problems for _ in range(SAMPLES)]
    for source in args.models:
        torch.manual_seed(0)
        policy, tokenizer = load_model(source, "cpu"), load_tokenizer(source)
        prompts = [render_prompt(tokenizer, problem["question"], "chat") for problem in problems for _ in range(SAMPLES)]
        rollout = generate(policy, tokenizer, prompts, MAX_NEW_TOKENS, 1.0)
        responses = split_into_steps(rollout.completion_ids, rollout.completion_mask, tokenizer)
        steps = sum(len(response.texts) for response in responses)
        restated = sum(restated_lines(response.texts) for response in responses)
        accuracy = sum(score_batch(rollout.texts, answers)) / len(answers)
        print(f"{source}: sampled accuracy {accuracy:.3f}, steps per response {steps / len(responses):.2f}, "
              f"restated lines per response {restated / len(responses):.3f}")


if __name__ == "__main__":
    main()
