"""Held-out evaluation: greedy pass@1 with its 95% interval, and from k samples mean@k and pass@k, on any sets.

The same code scores a model during training (every --eval-every steps) and with --eval-only.
Beside each set's numbers it logs which problems greedy decoding solved ("greedy_correct", one
0/1 character per problem, in the set's order), so that two runs on the same held-out problems
can be compared problem by problem from their metrics.jsonl alone (benchmarks/compare.py does).
"""

import math
import time
from pathlib import Path

from common.data import render_prompt
from common.verify import score_batch


Z_95 = 1.959964  # the standard normal's 97.5% quantile: two-sided 95% intervals


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a success rate (Wilson 1927; Brown, Cai and DasGupta 2001, eq. 4).

        center = (p + z^2 / 2n) / (1 + z^2 / n),   half width = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

    Unlike p +- z sqrt(p (1 - p) / n) it stays inside [0, 1] and does not shrink to a point at 0/n or n/n.
    """
    p, n = successes / trials, trials
    center = (p + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
    half_width = z / (1 + z ** 2 / n) * math.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2))
    # At 0/n and n/n one end is exactly 0 or 1, which rounding would miss by an ulp.
    return (center - half_width if successes > 0 else 0.0), (center + half_width if successes < trials else 1.0)


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of one problem, c of them correct (Chen et al. 2021,
    arXiv 2107.03374, eq. 1): the chance that k of the n, drawn without replacement, hold a correct one.

        pass@k = 1 - C(n - c, k) / C(n, k)
    """
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def pass_at_k_sizes(num_samples: int) -> list[int]:
    """The k of pass@k logged from n samples: powers of two from 2 below n, and n itself (none for n = 1)."""
    powers_of_two = [2 ** i for i in range(1, num_samples.bit_length()) if 2 ** i < num_samples]
    return powers_of_two + [num_samples] if num_samples > 1 else []


GREEDY_KEYS = ("pass@1", "pass@1_low", "pass@1_high", "greedy_correct")  # what greedy_results returns


def greedy_results(correct: list[bool]) -> dict:
    """pass@1 of greedy answers, its 95% Wilson interval, and which problems were solved as a 0/1 string."""
    low, high = wilson_interval(sum(correct), len(correct))
    return {"pass@1": sum(correct) / len(correct), "pass@1_low": low, "pass@1_high": high,
            "greedy_correct": "".join("1" if solved else "0" for solved in correct)}


def format_pass_at_1(results: dict) -> str:
    """greedy_results' pass@1 with its interval, for a screen: "0.412 [0.369, 0.456]"."""
    return f"{results['pass@1']:.3f} [{results['pass@1_low']:.3f}, {results['pass@1_high']:.3f}]"


def sampled_results(correct: list[bool], num_samples: int) -> dict:
    """mean@n and the unbiased pass@k (for pass_at_k_sizes) from n sampled answers per problem,
    `correct` flat and problem by problem: [problem 1's n, problem 2's n, ...]."""
    solved = [sum(correct[start:start + num_samples]) for start in range(0, len(correct), num_samples)]
    results = {f"mean@{num_samples}": sum(solved) / len(correct)}
    for k in pass_at_k_sizes(num_samples):  # a sampled pass@1 is mean@n; "pass@1" stays the greedy one
        results[f"pass@{k}"] = sum(pass_at_k(num_samples, c, k) for c in solved) / len(solved)
    return results


class Evaluator:
    """Scores the policy on fixed held-out sets ({name: problems}) with one prompt template.

    It samples through the run's rollout `engine` (common.rollout), so a vLLM run evaluates with
    vLLM, on the weights of its latest sync. `samples` k > 0 adds, from k samples per problem at
    `temperature`, mean@k (mean accuracy of the samples) and the unbiased pass@k (sampled_results)
    to greedy pass@1. `batch_size` prompts go to one generate call.
    """

    def __init__(self, engine, eval_sets: dict[str, list[dict]], template: str, max_new_tokens: int,
                 batch_size: int, samples: int = 0, temperature: float = 1.0):
        self.engine, self.tokenizer, self.eval_sets, self.template = engine, engine.tokenizer, eval_sets, template
        self.max_new_tokens, self.batch_size, self.samples, self.temperature = max_new_tokens, batch_size, samples, temperature

    def evaluate(self, problems: list[dict]) -> dict:
        """greedy_results and, with samples n, sampled_results of the policy on `problems`."""
        greedy_correct, sampled_correct = [], []
        k = self.samples
        for start in range(0, len(problems), self.batch_size):
            chunk = problems[start:start + self.batch_size]
            prompts = [render_prompt(self.tokenizer, problem["question"], self.template) for problem in chunk]
            answers = [problem["answer"] for problem in chunk]
            greedy = self.engine.generate(prompts, self.max_new_tokens, greedy=True)
            greedy_correct += [score == 1.0 for score in score_batch(greedy.texts, answers)]
            if k:
                sampled = self.engine.generate([p for p in prompts for _ in range(k)], self.max_new_tokens, self.temperature)
                scores = score_batch(sampled.texts, [answer for answer in answers for _ in range(k)])
                sampled_correct += [score == 1.0 for score in scores]
        return {**greedy_results(greedy_correct), **(sampled_results(sampled_correct, k) if k else {})}

    def __call__(self) -> dict:
        """evaluate() on every held-out set: {name: {"pass@1": ..., ...}}."""
        return {name: self.evaluate(problems) for name, problems in self.eval_sets.items()}

    def run_only(self, run_log, model_name: str):
        """--eval-only: every set scored, one line each on screen and in the run's metrics.jsonl (`run_log`)."""
        print(f"evaluating {model_name} ({self.template} template, {self.engine.name} rollouts), run folder {run_log.run_dir}")
        for name, problems in self.eval_sets.items():
            started = time.time()
            results = self.evaluate(problems)
            run_log.log({"step": 0, "eval_dataset": name, "problems": len(problems), **results,
                         "time_eval": time.time() - started})
            others = [f"{key} {value:.3f}" for key, value in results.items() if key not in GREEDY_KEYS]
            print(f"  {name:<24} {len(problems):>5} problems  pass@1 {format_pass_at_1(results)}  " + "  ".join(others))
        run_log.close()


def eval_run_name(eval_sets) -> str:
    """The task part of an --eval-only run folder's name: the sets' names joined by '+'."""
    return "+".join(Path(name).stem for name in eval_sets)
