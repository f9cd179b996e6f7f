"""hicra.py: the amplified advantage and semantic entropy (properties, and small vectors worked by
hand from the advantage of the paper's section 3 and its definition of semantic entropy; arXiv
2509.03646), the exact reduction to GRPO at alpha = 0, the amplified advantages really reaching
the loss, and whole runs on the tiny model and on the real test model.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import grpo
import hicra
from common.model import load_tokenizer
from common.phrases import index_phrases, load_phrases, phrase_token_mask
from grpo_runs import (ON_CPU, REAL_MODEL_GSM8K_RUN, assert_fails_at_start_up_with_one_line, read_steps,
                       run_trainer)
from hicra import hicra_advantages, high_entropy_tokens, semantic_entropy

PROPERTY = settings(max_examples=200, deadline=None)  # no deadline: the machine is shared
WORKED = 1e-6  # the hand-worked vectors are given to 6 decimals
SHORT_RUN = [*ON_CPU, "--num-prompts", "4", "--group-size", "4", "--micro-batch-size", "8", "--eval-size", "8",
             "--max-new-tokens", "64", "--eval-every", "0"]
ARITHMETIC_GRAMS = index_phrases(load_phrases(Path(hicra.__file__).parent / "data" / "arithmetic_strategic_grams.txt", "-"))


@st.composite
def advantages_and_masks(draw):
    """Per-token advantages [B, C] in float64 (zeros included) and a 0/1 planning mask of the same shape."""
    rows, cols = draw(st.integers(1, 6)), draw(st.integers(1, 12))
    # Non-zero magnitudes of at least 1e-300: times (1 - alpha) >= 1.1e-16 they stay non-zero in float64, where a
    # subnormal such as -4.9e-324 would underflow to -0 and lose its sign (rounding, not the rule under test).
    nonzero = st.floats(-1e6, 1e6).filter(lambda value: value == 0 or abs(value) >= 1e-300)
    values = draw(st.lists(st.one_of(st.just(0.0), nonzero), min_size=rows * cols, max_size=rows * cols))
    mask = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(values, dtype=torch.float64).view(rows, cols), torch.tensor(mask, dtype=torch.float64).view(rows, cols)


ALPHAS = st.one_of(st.just(0.2), st.floats(0.0, 1.0))


@PROPERTY
@given(advantages_and_masks(), ALPHAS)
def test_only_planning_tokens_change_and_signs_never_flip(data, alpha):
    advantages, planning = data
    amplified = hicra_advantages(advantages, planning, alpha)
    assert torch.equal(amplified[planning == 0], advantages[planning == 0])
    assert (torch.sign(amplified) * torch.sign(advantages) >= 0).all()
    if alpha < 1:  # at alpha = 1 a bad response's planning tokens get exactly 0
        assert torch.equal(torch.sign(amplified), torch.sign(advantages))


@PROPERTY
@given(advantages_and_masks(), ALPHAS)
def test_planning_magnitudes_are_scaled_by_exactly_one_plus_or_minus_alpha(data, alpha):
    advantages, planning = data
    amplified = hicra_advantages(advantages, planning, alpha)
    good, bad = (planning == 1) & (advantages > 0), (planning == 1) & (advantages < 0)
    assert torch.equal(amplified[good].abs(), (1 + alpha) * advantages[good].abs())
    assert torch.equal(amplified[bad].abs(), (1 - alpha) * advantages[bad].abs())
    # The paper's form A + alpha |A| agrees up to rounding: a few ulps of |A| (its sum cancels as alpha -> 1).
    paper = advantages + alpha * advantages.abs() * planning
    assert ((amplified - paper).abs() <= 1e-15 * advantages.abs()).all()


@PROPERTY
@given(advantages_and_masks(), ALPHAS)
def test_alpha_zero_and_an_empty_mask_are_the_identity(data, alpha):
    advantages, planning = data
    assert torch.equal(hicra_advantages(advantages, planning, 0.0), advantages)
    assert torch.equal(hicra_advantages(advantages, torch.zeros_like(planning), alpha), advantages)


def test_planning_tokens_of_a_good_response_gain_alpha_and_of_a_bad_one_lose_alpha():
    advantages = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    amplified = hicra_advantages(advantages, torch.ones_like(advantages), 0.2)
    assert amplified[0].tolist() == pytest.approx([1.8, -0.4], abs=WORKED)  # (1 + 0.2) 1.5 and (1 - 0.2) (-0.5)
    assert torch.equal(hicra_advantages(advantages, torch.zeros_like(advantages), 0.2), advantages)


GRAM_COUNTS = st.dictionaries(st.text("abcdefgh", min_size=1, max_size=3), st.integers(0, 1000), max_size=12)


@PROPERTY
@given(GRAM_COUNTS)
def test_semantic_entropy_lies_between_zero_and_log_of_the_grams_used(counts):
    used = sum(1 for count in counts.values() if count)
    entropy = semantic_entropy(counts)
    assert 0.0 <= entropy <= math.log(max(used, 1)) + 1e-12


@PROPERTY
@given(st.integers(1, 50), st.integers(1, 1000))
def test_semantic_entropy_of_grams_used_equally_is_log_k(k, count):
    assert semantic_entropy({f"gram {i}": count for i in range(k)}) == pytest.approx(math.log(k), abs=1e-12)
    assert semantic_entropy({"wait": count}) == 0.0


def test_semantic_entropy_of_hand_worked_gram_counts_in_nats():
    assert semantic_entropy({"wait": 3, "let's": 1}) == pytest.approx(0.562335, abs=WORKED)
    assert semantic_entropy({"wait": 1, "but": 1, "so": 1, "let me": 1}) == pytest.approx(1.386294, abs=WORKED)
    assert semantic_entropy({}) == 0.0


def test_the_third_party_variant_takes_the_top_entropy_tokens_of_long_correct_responses():
    # One group of three: a long correct response, a short correct one, a long wrong one.
    mask = torch.tensor([[1.0] * 10, [1.0] * 4 + [0.0] * 6, [1.0] * 10])
    entropy = torch.arange(30, dtype=torch.float).view(3, 10).flip(1)  # decreasing along each response
    chosen = high_entropy_tokens(entropy, mask, torch.tensor([[1.0, 1.0, 0.0]]))
    assert chosen[0].tolist() == [1.0] * 3 + [0.0] * 7  # ceil(0.3 * 10) highest-entropy tokens
    assert chosen[1:].sum() == 0  # not longer than the group's mean (8), or not correct


def run_in_process(module, flags, tmp_path):
    """Run `module.main(flags)` and return, for every update, the advantages it was handed, the
    loss it reported and the gradient the optimizer stepped with (update_policy frees it after)."""
    updates = []
    original = module.update_policy

    def recording_update(policy, ref_model, optimizer, scheduler, batch, args):
        grads = []
        hook = optimizer.register_step_pre_hook(lambda *_: grads.append(
            [p.grad.clone() for p in policy.parameters() if p.grad is not None]))
        try:
            metrics, old_logp = original(policy, ref_model, optimizer, scheduler, batch, args)
        finally:
            hook.remove()
        [stepped] = grads  # one optimizer step per update in these runs
        updates.append({"batch": {key: value.clone() for key, value in batch.items()}, "loss": metrics["loss"],
                        "grads": stepped})
        return metrics, old_logp

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "update_policy", recording_update)
        module.main([*SHORT_RUN, *flags, "--runs-dir", str(tmp_path)])
    [run_dir] = tmp_path.iterdir()
    return updates, read_steps(run_dir)


@pytest.fixture(scope="module")
def grpo_on_the_papers_base(tmp_path_factory):
    """Two grpo.py steps with HICRA's base spelled out: mean-only advantages and clip-higher."""
    return run_in_process(grpo, ["--total-steps", "2", "--no-scale-by-std", "--clip-eps-high", "0.28"],
                          tmp_path_factory.mktemp("grpo"))


def test_alpha_zero_reproduces_grpo_on_the_same_base(grpo_on_the_papers_base, tmp_path):
    expected, _ = grpo_on_the_papers_base
    got, metrics = run_in_process(hicra, ["--total-steps", "2", "--hicra-alpha", "0"], tmp_path)
    assert len(got) == len(expected) == 2
    for step, (ours, theirs) in enumerate(zip(got, expected), 1):
        for key in ("input_ids", "mask", "advantages"):
            assert torch.equal(ours["batch"][key], theirs["batch"][key]), (step, key)
        assert ours["loss"] == theirs["loss"], step
        assert len(ours["grads"]) == len(theirs["grads"]) > 0 and any(g.abs().sum() > 0 for g in theirs["grads"])
        assert all(torch.equal(a, b) for a, b in zip(ours["grads"], theirs["grads"])), step
    assert all(m["planning_fraction"] > 0 for m in metrics), "planning tokens were found, alpha just had no effect"


def test_the_loss_gets_the_amplified_advantages(grpo_on_the_papers_base, tmp_path):
    # Same seed, so step 1 samples the same batch as grpo.py; only the advantages may differ, and
    # exactly as HICRA says: not a copy left unchanged (the bug of a public port), not anything else.
    [theirs, _], _ = grpo_on_the_papers_base
    [ours], [metrics] = run_in_process(hicra, ["--total-steps", "1"], tmp_path)
    assert torch.equal(ours["batch"]["input_ids"], theirs["batch"]["input_ids"])
    tokenizer = load_tokenizer("tiny")
    prompt_length = ours["batch"]["input_ids"].shape[1] - ours["batch"]["mask"].shape[1]
    planning, counts = phrase_token_mask(tokenizer, ours["batch"]["input_ids"][:, prompt_length:],
                                         ours["batch"]["mask"].long(), ARITHMETIC_GRAMS)
    base = theirs["batch"]["advantages"]
    assert torch.equal(ours["batch"]["advantages"], hicra_advantages(base, planning, 0.2))
    touched = (planning == 1) & (base != 0)
    assert touched.any() and not torch.equal(ours["batch"]["advantages"], base)
    assert torch.allclose(ours["batch"]["advantages"][touched].abs(), base[touched].abs() * (1 + 0.2 * base[touched].sign()))
    assert ours["loss"] != theirs["loss"]
    assert metrics["planning_fraction"] == pytest.approx((planning.sum() / ours["batch"]["mask"].sum()).item())
    assert metrics["semantic_entropy"] == pytest.approx(semantic_entropy(counts))
    assert set(counts) <= {"first", "then", "check", "wait"} and counts["first"] > 0
    advantages = ours["batch"]["advantages"]
    other = ours["batch"]["mask"] - planning
    assert metrics["advantage_planning"] == pytest.approx((advantages * planning).sum().item() / planning.sum().item())
    assert metrics["advantage_other"] == pytest.approx((advantages * other).sum().item() / other.sum().item())


def test_the_third_party_variant_amplifies_more_tokens_of_the_same_batch(grpo_on_the_papers_base, tmp_path):
    [theirs, _], _ = grpo_on_the_papers_base
    [ours], [metrics] = run_in_process(hicra, ["--total-steps", "1", "--third-party-entropy-variant"], tmp_path)
    assert torch.equal(ours["batch"]["input_ids"], theirs["batch"]["input_ids"])
    base, amplified = theirs["batch"]["advantages"], ours["batch"]["advantages"]
    changed = amplified != base
    prompt_length = ours["batch"]["input_ids"].shape[1] - base.shape[1]
    planning, _ = phrase_token_mask(load_tokenizer("tiny"), ours["batch"]["input_ids"][:, prompt_length:],
                                    ours["batch"]["mask"].long(), ARITHMETIC_GRAMS)
    assert (changed & (planning == 0)).any(), "tokens beyond the strategic grams were amplified"
    assert (amplified[changed] > base[changed]).all(), "only correct responses get the extra tokens"
    assert metrics["planning_fraction"] > (planning.sum() / ours["batch"]["mask"].sum()).item()


def test_short_run_logs_hicra_metrics_and_mines_grams(tmp_path):
    mined = tmp_path / "mined.txt"
    result = run_trainer("hicra.py", *SHORT_RUN, "--total-steps", "2", "--mine-grams", str(mined),
                         "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr[-2000:]
    for label in ("planning tokens", "semantic entropy", "token entropy"):
        assert f"  {label} " in result.stdout, f"the summary has no {label} line"
    [run_dir] = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("arithmetic__hicra__1__")
    args = json.loads((run_dir / "args.json").read_text())
    assert args["scale_by_std"] is False and args["clip_eps_high"] == 0.28 and args["hicra_alpha"] == 0.2
    metrics = read_steps(run_dir)
    for line in metrics:
        assert 0.05 < line["planning_fraction"] < 0.5  # "first" and "then" in a ~45-token answer
        assert 0.0 <= line["semantic_entropy"] <= math.log(4) + 1e-12  # four grams on this task
        assert line["entropy"] > 0 and line["advantage_planning"] is not None and line["advantage_other"] is not None
    assert metrics[-1]["eval_accuracy"] is not None
    grams = mined.read_text().splitlines()
    assert 0 < len(grams) <= 249 and all(3 <= len(gram.split()) <= 5 for gram in grams)
    assert load_phrases(mined, "--strategic-grams") == sorted(grams)
    state = torch.load(run_dir / "checkpoints" / "step_2" / "trainer_state.pt", weights_only=True)
    assert max(state["mined_grams"].values()) >= 1 and set(grams) <= set(state["mined_grams"])


@pytest.mark.parametrize("flags, message", [
    (["--hicra-alpha", "1.5"], "--hicra-alpha must be in [0, 1] (got 1.5)"),
    (["--strategic-grams", "no/such/grams.txt"], "--strategic-grams no/such/grams.txt: cannot read it"),
    (["--mine-grams", "no/such/folder/mined.txt"], "--mine-grams no/such/folder/mined.txt: there is no such folder"),
])
def test_bad_arguments_fail_at_start_up_with_one_line(flags, message, tmp_path):
    assert_fails_at_start_up_with_one_line("hicra.py", flags, message, tmp_path)


def test_two_steps_on_the_real_model_with_the_papers_grams(real_model_dir, tmp_path):
    hicra.main(["--model", str(real_model_dir), *REAL_MODEL_GSM8K_RUN, "--runs-dir", str(tmp_path)])
    [run_dir] = tmp_path.iterdir()
    metrics = read_steps(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 0.0 <= m["planning_fraction"] < 1.0 and m["semantic_entropy"] >= 0.0
    assert (run_dir / "checkpoints" / "step_2" / "model.safetensors").is_file()
