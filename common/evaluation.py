"""Held-out evaluation: greedy pass@1, and from k samples mean@k and pass@k, on any number of sets.

The same code scores a model during training (every --eval-every steps) and with --eval-only.
"""

import time
from pathlib import Path

import torch

from common.data import render_prompt
from common.verify import score_batch


class Evaluator:
    """Scores the policy on fixed held-out sets ({name: problems}) with one prompt template.

    It samples through the run's rollout `engine` (common.rollout), so a vLLM run evaluates with
    vLLM, on the weights of its latest sync. `samples` k > 0 adds, from k samples per problem at
    `temperature`, mean@k (mean accuracy of the samples) and pass@k (share of problems with any
    correct sample) to greedy pass@1. `batch_size` prompts go to one generate call.
    """

    def __init__(self, engine, eval_sets: dict[str, list[dict]], template: str, max_new_tokens: int,
                 batch_size: int, samples: int = 0, temperature: float = 1.0):
        self.engine, self.tokenizer, self.eval_sets, self.template = engine, engine.tokenizer, eval_sets, template
        self.max_new_tokens, self.batch_size, self.samples, self.temperature = max_new_tokens, batch_size, samples, temperature

    def evaluate(self, problems: list[dict]) -> dict:
        """{"pass@1": ..., and with samples k: "mean@k", "pass@k" (k > 1)} of the policy on `problems`."""
        greedy_correct, sampled_correct = [], []
        k = self.samples
        for start in range(0, len(problems), self.batch_size):
            chunk = problems[start:start + self.batch_size]
            prompts = [render_prompt(self.tokenizer, problem["question"], self.template) for problem in chunk]
            answers = [problem["answer"] for problem in chunk]
            greedy = self.engine.generate(prompts, self.max_new_tokens, greedy=True)
            greedy_correct += score_batch(greedy.texts, answers)
            if k:
                sampled = self.engine.generate([p for p in prompts for _ in range(k)], self.max_new_tokens, self.temperature)
                sampled_correct += torch.tensor(score_batch(sampled.texts, [a for a in answers for _ in range(k)])).view(-1, k).tolist()
        results = {"pass@1": sum(greedy_correct) / len(problems)}
        if k:
            correct = torch.tensor(sampled_correct)  # [problems, k]
            results[f"mean@{k}"] = correct.mean().item()
            if k > 1:  # a sampled pass@1 is mean@1; "pass@1" stays the greedy one
                results[f"pass@{k}"] = correct.max(dim=1).values.mean().item()
        return results

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
            print(f"  {name:<24} {len(problems):>5} problems  " + "  ".join(f"{key} {value:.3f}" for key, value in results.items()))
        run_log.close()


def eval_run_name(eval_sets) -> str:
    """The task part of an --eval-only run folder's name: the sets' names joined by '+'."""
    return "+".join(Path(name).stem for name in eval_sets)
