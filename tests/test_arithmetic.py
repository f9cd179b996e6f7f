"""The built-in task: problems, demonstrations, steps and the per-step checker."""

import random

from hypothesis import given, settings, strategies as st

from common.arithmetic import (HELDOUT_SIZE, PLANNING_WORDS, check_step, demonstration, heldout_problems,
                               split_steps, train_problem)
from common.verify import score


def _value_of(problem: dict) -> int:
    value = problem["terms"][0]
    for op, term in zip(problem["ops"], problem["terms"][1:]):
        value = value + term if op == "+" else value - term
    return value


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 10**6), index=st.integers(0, 10**9))
def test_training_problems_are_well_formed_and_reproducible(seed, index):
    problem = train_problem(seed, index)
    assert problem == train_problem(seed, index)
    assert len(problem["ops"]) in (2, 3)
    assert problem["answer"] == str(_value_of(problem))
    assert problem["question"] == "Compute " + str(problem["terms"][0]) + "".join(
        op + str(term) for op, term in zip(problem["ops"], problem["terms"][1:])) + "."
    running = problem["terms"][0]
    for op, term in zip(problem["ops"], problem["terms"][1:]):
        running = running + term if op == "+" else running - term
        assert 10 <= term <= 99 and 10 <= running <= 99


def test_heldout_set_is_fixed_distinct_and_never_trained_on():
    heldout = heldout_problems()
    questions = {problem["question"] for problem in heldout}
    assert len(heldout) == len(questions) == HELDOUT_SIZE
    assert heldout[0]["question"] == heldout_problems()[0]["question"]
    assert not questions & {train_problem(seed, i)["question"] for seed in (1, 2) for i in range(5000)}


def test_correct_demonstrations_check_step_by_step_and_verify():
    rng = random.Random(0)
    for index in range(200):
        problem = train_problem(0, index)
        text = demonstration(problem, rng, slip_prob=0.0, corrected_slip_prob=0.0)
        steps = split_steps(text)
        assert steps[0].startswith("first ") and steps[-1] == f"\\boxed{{{problem['answer']}}}"
        assert all(check_step(step) for step in steps[:-1])
        assert check_step(steps[-1]) is None  # the boxed answer is not an equation
        assert score(text, problem["answer"]) == 1.0


def test_slipped_demonstrations_are_caught_by_the_checker():
    rng = random.Random(1)
    carried = corrected = 0
    for index in range(300):
        problem = train_problem(0, index)
        steps = split_steps(demonstration(problem, rng))
        wrong_steps = [step for step in steps[:-1] if check_step(step) is False]
        solved = score(steps[-1], problem["answer"]) == 1.0
        if wrong_steps and not solved:
            carried += 1
            assert len(wrong_steps) == 1
        elif wrong_steps:
            corrected += 1
            assert any(step.startswith("wait ") for step in steps)
        else:
            assert solved
    # 30% carried and 10% corrected slips by default.
    assert 60 <= carried <= 120 and 15 <= corrected <= 50


def test_demonstrations_use_the_planning_words():
    rng = random.Random(2)
    words = {step.split()[0] for index in range(300)
             for step in split_steps(demonstration(train_problem(0, index), rng))}
    assert set(PLANNING_WORDS) <= words


def test_check_step_judges_equations_and_leaves_other_lines_undecided():
    assert check_step("first 44-21=23") is True
    assert check_step("then 23+62=85") is True
    assert check_step("then 23+62=84") is False
    assert check_step("45-50=-5") is True
    assert check_step("\\boxed{85}") is None and check_step("so the answer is 85") is None
