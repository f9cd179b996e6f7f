"""Held-out evaluation (common/evaluation.py): what each number means."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from common.arithmetic import heldout_problems
from common.evaluation import (GREEDY_KEYS, Evaluator, greedy_results, pass_at_k, pass_at_k_sizes, sampled_results,
                               wilson_interval)
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
    assert set(results["arithmetic"]) == {*GREEDY_KEYS, "mean@1"}
    assert results["arithmetic"]["pass@1"] == sum(greedy) / len(problems) > results["arithmetic"]["mean@1"]
    assert results["arithmetic"]["greedy_correct"] == "".join(str(int(score)) for score in greedy)


# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Statistics in Medicine
# 17:857-872, Table II, method 3 (Wilson score interval without continuity correction).
@pytest.mark.parametrize("successes, trials, low, high", [
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718),
    (5, 10, 0.2366, 0.7634),  # symmetric about 1/2: 1/2 -+ 1.96 sqrt(1/40 + 1.96^2/400) / (1 + 1.96^2/10)
])
def test_wilson_interval_matches_published_values(successes, trials, low, high):
    assert wilson_interval(successes, trials) == pytest.approx((low, high), abs=5e-5)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_holds_the_rate_inside_zero_one(case):
    successes, trials = case
    low, high = wilson_interval(successes, trials)
    assert 0.0 <= low <= successes / trials <= high <= 1.0 and high - low > 0


@pytest.mark.parametrize("num_samples, num_correct, k, expected", [
    (4, 1, 2, 0.5),  # 1 - C(3, 2) / C(4, 2) = 1 - 3/6
    (5, 2, 2, 0.7),  # 1 - C(3, 2) / C(5, 2) = 1 - 3/10
    (10, 3, 1, 0.3),  # pass@1 is c / n
    (8, 0, 4, 0.0), (8, 5, 4, 1.0),  # no correct sample; fewer than k incorrect ones, so every draw of k holds one
    (200, 13, 10, 1 - math.prod(1 - 10 / i for i in range(188, 201))),  # Chen et al.'s numerically stable form
])
def test_unbiased_pass_at_k_on_hand_computed_values(num_samples, num_correct, k, expected):
    assert pass_at_k(num_samples, num_correct, k) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_is_the_chance_that_k_draws_without_replacement_hold_a_correct_one(case):
    num_samples, num_correct, k = case
    all_wrong = math.prod((num_samples - num_correct - i) / (num_samples - i) for i in range(k))
    assert pass_at_k(num_samples, num_correct, k) == pytest.approx(1 - all_wrong, abs=1e-12)


def test_sampled_results_average_pass_at_k_over_problems():
    correct = [True, False, False, False, True, True, False, False]  # two problems of 4 samples: c = 1 and c = 2
    assert pass_at_k_sizes(4) == [2, 4] and pass_at_k_sizes(6) == [2, 4, 6] and pass_at_k_sizes(1) == []
    expected = {"mean@4": 3 / 8, "pass@2": (0.5 + (1 - 1 / 6)) / 2, "pass@4": 1.0}  # pass@2 of c = 2: 1 - C(2,2)/C(4,2)
    assert sampled_results(correct, 4) == pytest.approx(expected)


def test_greedy_results_record_each_problem_and_the_interval():
    results = greedy_results([True, False, False, True, False])
    assert results["greedy_correct"] == "10010" and results["pass@1"] == 0.4
    assert (results["pass@1_low"], results["pass@1_high"]) == wilson_interval(2, 5)
