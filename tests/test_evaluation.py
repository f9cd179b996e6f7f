"""Held-out evaluation (common/evaluation.py): what each number means."""

import torch

from common.arithmetic import heldout_problems
from common.evaluation import Evaluator
from common.model import load_model, load_tokenizer
from common.data import render_prompt
from common.rollout import TransformersEngine, generate
from common.verify import score_batch


def test_one_sample_adds_mean_at_1_and_leaves_greedy_pass_at_1_alone():
    policy, tokenizer = load_model("tiny", "cpu"), load_tokenizer("tiny")
    problems = list(heldout_problems()[:12])
    torch.manual_seed(0)
    # Samples at temperature 5 are noise (mean@1 near 0), so a sampled pass@1 could not pass for the greedy one.
    results = Evaluator(TransformersEngine(policy, tokenizer), {"arithmetic": problems}, "chat", 96, 12, samples=1,
                        temperature=5.0)()
    prompts = [render_prompt(tokenizer, problem["question"], "chat") for problem in problems]
    greedy = score_batch(generate(policy, tokenizer, prompts, 96, greedy=True).texts, [p["answer"] for p in problems])
    assert set(results["arithmetic"]) == {"pass@1", "mean@1"}
    assert results["arithmetic"]["pass@1"] == sum(greedy) / len(problems) > results["arithmetic"]["mean@1"]
