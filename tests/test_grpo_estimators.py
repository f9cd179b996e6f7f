"""Tests of GRPO's pure arithmetic in grpo.py: group advantages, the clipped surrogate, the KL
estimators and the loss aggregation modes.

The exact vectors are small inputs worked by hand from the formulas: the group advantage of
DeepSeekMath (arXiv 2402.03300) section 4.1.2 and Dr.GRPO's form without the std, the clipped
surrogate with DAPO's clip-higher and verl's dual clip, the KL estimators of DeepSeekMath eq. 4, and
the loss aggregation modes of verl's `agg_loss` (verl/trainer/ppo/core_algos.py; Dr.GRPO's as in
TRL's GRPOTrainer). They are given to 6 decimals, so compared with abs=1e-6. The properties run
under hypothesis, in float64 unless stated, with tolerances derived from float rounding rather than
picked to make the tests pass; each is stated next to the test that uses it.
"""

import math
import statistics

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from grpo import aggregate_loss, clipped_surrogate, grpo_advantages, kl_penalty

PROPERTY = settings(max_examples=100, deadline=None)  # no deadline: the machine is shared
WORKED = 1e-6  # the hand-worked vectors are given to 6 decimals
ROUNDING = 1e-12  # float64 slack for a handful of operations on values of order 1-100
AGGREGATION_MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "dr-grpo"]


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

BOUNDED_REWARD = st.floats(-10, 10)
BINARY_REWARD = st.sampled_from([0.0, 1.0])
FEW_LEVELS_REWARD = st.sampled_from([0.0, 0.25, 0.5, 1.0])  # many ties and all-equal groups


@st.composite
def reward_matrices(draw, values=BOUNDED_REWARD, min_group_size=2, max_group_size=8):
    """Rewards [P, G] in float64."""
    num_prompts = draw(st.integers(1, 4))
    group_size = draw(st.integers(min_group_size, max_group_size))
    flat = draw(st.lists(values, min_size=num_prompts * group_size, max_size=num_prompts * group_size))
    return f64(flat).view(num_prompts, group_size)


ANY_REWARDS = st.one_of(reward_matrices(BOUNDED_REWARD), reward_matrices(BINARY_REWARD),
                        reward_matrices(FEW_LEVELS_REWARD))


@st.composite
def extreme_reward_matrices(draw):
    """Rewards base + spread * u with base up to 1e100 and spreads from 1e-300 to 1e100."""
    num_prompts = draw(st.integers(1, 3))
    group_size = draw(st.integers(2, 8))
    base = draw(st.floats(-1e100, 1e100))
    spread = 10.0 ** draw(st.integers(-300, 100))
    units = draw(st.lists(st.floats(-1, 1), min_size=num_prompts * group_size, max_size=num_prompts * group_size))
    return (base + spread * f64(units)).view(num_prompts, group_size)


def group_all_equal(rewards: torch.Tensor) -> torch.Tensor:
    """[P] bool: the group's rewards are all the same value."""
    return (rewards == rewards[:, :1]).all(dim=1)


def advantage_tolerance(rewards: torch.Tensor, eps: float, scale_by_std: bool = True) -> torch.Tensor:
    """[P, 1] float64 rounding bound on A: rounding of the mean and std is a few ulps of the largest
    reward per element (G of them summed), and dividing by std + eps amplifies it by 1 / (std + eps).
    The factor 1e-13 is about 1000 ulps of 1: a margin for summation order, far below any formula error."""
    group_size = rewards.shape[1]
    magnitude = 1.0 + rewards.abs().amax(dim=1, keepdim=True)
    rounding = 1e-13 * group_size * magnitude
    return rounding / (rewards.std(dim=1, keepdim=True) + eps) if scale_by_std else rounding


def std_advantage_bound(group_size: int) -> float:
    """Largest |A| possible in std mode: with sum x = 0 and sum x^2 = (G-1) s^2, |x_i| <= s (G-1)/sqrt(G)."""
    return (group_size - 1) / math.sqrt(group_size)


# ---------------------------------------------------------------------------------------------
# 1. Vectors worked by hand
# ---------------------------------------------------------------------------------------------


class TestHandWorkedVectors:
    """Small inputs worked by hand from the formulas in grpo.py's docstrings, to 6 decimals."""

    @pytest.mark.parametrize("rewards, scale_by_std, expected", [
        ([1, 0, 0, 0], True, [1.499997, -0.499999, -0.499999, -0.499999]),
        ([1, 0, 0, 0], False, [0.75, -0.25, -0.25, -0.25]),
        ([1, 0.5, 0, 0], True, [1.305580, 0.261116, -0.783348, -0.783348]),
        ([1, 1, 1, 1], True, [0, 0, 0, 0]),
        ([1, 1, 1, 1], False, [0, 0, 0, 0]),
    ])
    def test_advantages(self, rewards, scale_by_std, expected):
        advantages = grpo_advantages(f64([rewards]), eps=1e-6, scale_by_std=scale_by_std)
        assert advantages.shape == (1, len(rewards))
        assert advantages[0].tolist() == pytest.approx(expected, abs=WORKED)

    @pytest.mark.parametrize("advantage, ratio, eps_high, dual_clip, expected_loss", [
        (+1.0, 1.5, 0.2, None, -1.2),
        (+1.0, 0.5, 0.2, None, -0.5),
        (-1.0, 0.5, 0.2, None, 0.8),
        (-1.0, 4.0, 0.2, None, 4.0),
        (-1.0, 4.0, 0.2, 3.0, 3.0),
        (+1.0, 1.5, 0.28, None, -1.28),
    ])
    def test_clipped_surrogate(self, advantage, ratio, eps_high, dual_clip, expected_loss):
        logp = f64([[math.log(ratio) - 0.7]])
        old_logp = f64([[-0.7]])
        loss, _ = clipped_surrogate(logp, old_logp, f64([[advantage]]), eps_low=0.2, eps_high=eps_high,
                                    dual_clip=dual_clip)
        assert loss.item() == pytest.approx(expected_loss, abs=WORKED)

    @pytest.mark.parametrize("estimator, expected", [("k1", 0.5), ("k2", 0.125), ("k3", 0.106531)])
    def test_kl_estimators(self, estimator, expected):
        value = kl_penalty(f64([-1.0]), f64([-1.5]), estimator)
        assert value.item() == pytest.approx(expected, abs=WORKED)

    @pytest.mark.parametrize("mode, expected", [
        ("token-mean", 1.6), ("seq-mean-token-mean", 2.5), ("seq-mean-token-sum", 4.0), ("dr-grpo", 1.0),
    ])
    def test_aggregation(self, mode, expected):
        padding = 99.0  # masked positions hold junk: it must not leak into any mode
        token_loss = f64([[1, 1, 1, 1], [4, padding, padding, padding]])
        mask = f64([[1, 1, 1, 1], [1, 0, 0, 0]])
        assert aggregate_loss(token_loss, mask, mode).item() == pytest.approx(expected, abs=WORKED)


# ---------------------------------------------------------------------------------------------
# 2. Group advantages
# ---------------------------------------------------------------------------------------------


class TestAdvantageProperties:
    """grpo_advantages on rewards [P, G]: centred, shift- and scale-free, no signal -> exactly 0, always finite."""

    @PROPERTY
    @given(rewards=reward_matrices(BOUNDED_REWARD, min_group_size=2, max_group_size=6))
    def test_std_mode_matches_python_statistics(self, rewards):
        """An independent reference: (r - mean) / (stdev + eps), stdev with Bessel's correction."""
        eps = 1e-6
        advantages = grpo_advantages(rewards, eps=eps)
        tolerance = advantage_tolerance(rewards, eps)
        for row, group in enumerate(rewards.tolist()):
            if len(set(group)) == 1:
                expected = [0.0] * len(group)
            else:
                mean, stdev = statistics.fmean(group), statistics.stdev(group)
                expected = [(r - mean) / (stdev + eps) for r in group]
            assert advantages[row].tolist() == pytest.approx(expected, abs=tolerance[row].item(), rel=0)

    @PROPERTY
    @given(rewards=ANY_REWARDS, scale_by_std=st.booleans())
    def test_zero_mean_per_group(self, rewards, scale_by_std):
        eps = 1e-6
        advantages = grpo_advantages(rewards, eps=eps, scale_by_std=scale_by_std)
        tolerance = advantage_tolerance(rewards, eps, scale_by_std)
        assert (advantages.mean(dim=1, keepdim=True).abs() <= tolerance).all()

    @PROPERTY
    @given(rewards=ANY_REWARDS, scale_by_std=st.booleans(), data=st.data())
    def test_invariant_to_adding_a_constant_to_a_group(self, rewards, scale_by_std, data):
        eps = 1e-6
        shifts = f64(data.draw(st.lists(st.floats(-10, 10), min_size=rewards.shape[0], max_size=rewards.shape[0])))
        shifted = rewards + shifts.unsqueeze(1)
        before = grpo_advantages(rewards, eps=eps, scale_by_std=scale_by_std)
        after = grpo_advantages(shifted, eps=eps, scale_by_std=scale_by_std)
        # Adding the shift rounds each reward to a few ulps of (|r| + |shift|) <= 20: the bound of the
        # shifted rewards covers it. A group whose spread the shift rounds away entirely (spread below
        # an ulp of 20) becomes all-equal -> 0; its |A| was below the same bound.
        tolerance = torch.maximum(advantage_tolerance(rewards, eps, scale_by_std),
                                  advantage_tolerance(shifted, eps, scale_by_std))
        assert ((after - before).abs() <= tolerance).all()

    @PROPERTY
    @given(rewards=ANY_REWARDS, scale=st.floats(1e-3, 1e3))
    def test_std_mode_invariant_to_positive_scaling_without_eps(self, rewards, scale):
        """With eps = 0, A = x / s is exactly scale-free (only rounding differs)."""
        std = rewards.std(dim=1)
        assume(((std > 1e-6) | group_all_equal(rewards)).all())  # eps = 0 needs a std that did not underflow
        before = grpo_advantages(rewards, eps=0.0)
        after = grpo_advantages(rewards * scale, eps=0.0)
        tolerance = torch.where(group_all_equal(rewards).unsqueeze(1), 0.0, advantage_tolerance(rewards, 0.0))
        assert ((after - before).abs() <= tolerance).all()

    @PROPERTY
    @given(rewards=reward_matrices(BINARY_REWARD), scale=st.floats(0.1, 100))
    def test_std_mode_scaling_changes_a_only_through_eps(self, rewards, scale):
        """With eps > 0: A_eps = A_0 / (1 + eps / s), so |A(k r) - A(r)| <= |A_0| eps / (min(1, k) s)."""
        eps = 1e-6
        before = grpo_advantages(rewards, eps=eps)
        after = grpo_advantages(rewards * scale, eps=eps)
        std = rewards.std(dim=1, keepdim=True)
        eps_effect = std_advantage_bound(rewards.shape[1]) * eps / (min(1.0, scale) * std)
        bound = torch.where(std > 0, eps_effect + ROUNDING, 0.0)  # all-equal groups: exactly 0 both times
        assert ((after - before).abs() <= bound).all()

    @PROPERTY
    @given(rewards=ANY_REWARDS, scale_by_std=st.booleans(), data=st.data())
    def test_permutation_within_a_group_permutes_the_advantages(self, rewards, scale_by_std, data):
        eps = 1e-6
        permutation = torch.tensor(data.draw(st.permutations(range(rewards.shape[1]))))
        before = grpo_advantages(rewards, eps=eps, scale_by_std=scale_by_std)
        after = grpo_advantages(rewards[:, permutation], eps=eps, scale_by_std=scale_by_std)
        tolerance = advantage_tolerance(rewards, eps, scale_by_std)  # summation order may differ
        assert ((after - before[:, permutation]).abs() <= tolerance).all()

    @PROPERTY
    @given(rewards=ANY_REWARDS)
    def test_std_mode_advantages_are_bounded_by_group_size(self, rewards):
        """|A| <= (G-1)/sqrt(G) with the sample std (it would be sqrt(G-1) with the population std)."""
        advantages = grpo_advantages(rewards, eps=1e-6)
        bound = std_advantage_bound(rewards.shape[1])
        assert (advantages.abs() <= bound * (1 + 1e-12)).all()

    @PROPERTY
    @given(value=st.one_of(BOUNDED_REWARD, st.sampled_from([0.1, 1 / 3, -0.7, 1e-300, 1e100])),
           group_size=st.integers(2, 9), other_rewards=reward_matrices(BOUNDED_REWARD, min_group_size=9, max_group_size=9),
           scale_by_std=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
    def test_all_equal_groups_give_exactly_zero(self, value, group_size, other_rewards, scale_by_std, dtype):
        """Even where the float mean of equal values is not the value itself (0.1 * 3 / 3), and next to groups with signal."""
        assume(dtype == torch.float64 or abs(value) < 1e30)
        constant_group = torch.full((1, group_size), value, dtype=dtype)
        rewards = torch.cat([constant_group, other_rewards[:, :group_size].to(dtype)])
        advantages = grpo_advantages(rewards, eps=1e-6, scale_by_std=scale_by_std)
        assert torch.equal(advantages[0], torch.zeros(group_size, dtype=dtype))
        assert torch.isfinite(advantages).all()

    @PROPERTY
    @given(rewards=reward_matrices(BOUNDED_REWARD, min_group_size=1, max_group_size=1), scale_by_std=st.booleans())
    def test_group_of_one_gives_zero(self, rewards, scale_by_std):
        advantages = grpo_advantages(rewards, eps=1e-6, scale_by_std=scale_by_std)
        assert advantages.shape == rewards.shape
        assert torch.equal(advantages, torch.zeros_like(rewards))

    @PROPERTY
    @given(rewards=st.one_of(extreme_reward_matrices(), ANY_REWARDS), scale_by_std=st.booleans(),
           eps=st.sampled_from([1e-6, 1e-4]))
    def test_always_finite(self, rewards, scale_by_std, eps):
        """Only finiteness here, not the |A| bound: where huge rewards differ by a few ulps (and by more
        than eps), the rounded mean alone decides A, e.g. [1e100, 1e100 + ulp] -> [-1, 0]."""
        advantages = grpo_advantages(rewards, eps=eps, scale_by_std=scale_by_std)
        assert torch.isfinite(advantages).all()

    @PROPERTY
    @given(rewards=st.one_of(ANY_REWARDS, extreme_reward_matrices()))
    def test_no_std_mode_is_exactly_reward_minus_mean(self, rewards):
        advantages = grpo_advantages(rewards, eps=1e-6, scale_by_std=False)
        centred = rewards - rewards.mean(dim=1, keepdim=True)
        constant = group_all_equal(rewards)
        assert torch.equal(advantages[~constant], centred[~constant])
        assert torch.equal(advantages[constant], torch.zeros_like(advantages[constant]))


# ---------------------------------------------------------------------------------------------
# 3. Clipped surrogate
# ---------------------------------------------------------------------------------------------


@st.composite
def surrogate_inputs(draw, max_log_ratio=3.0):
    """(logp, old_logp, advantages), float64 [1, T], with |A| >= 1e-3 so that a zero gradient means clipping."""
    num_tokens = draw(st.integers(1, 16))
    tokens = st.lists(st.floats(-20, 0), min_size=num_tokens, max_size=num_tokens)
    log_ratios = st.lists(st.floats(-max_log_ratio, max_log_ratio), min_size=num_tokens, max_size=num_tokens)
    magnitudes = st.lists(st.floats(1e-3, 10), min_size=num_tokens, max_size=num_tokens)
    signs = st.lists(st.sampled_from([-1.0, 1.0]), min_size=num_tokens, max_size=num_tokens)
    old_logp = f64([draw(tokens)])
    logp = old_logp + f64([draw(log_ratios)])
    advantages = f64([draw(magnitudes)]) * f64([draw(signs)])
    return logp, old_logp, advantages


CLIP_EPS = st.floats(0.05, 0.5)
DUAL_CLIP = st.floats(1.5, 10)


def surrogate_with_gradient(logp, old_logp, advantages, **clip_args):
    """Loss [1, T], clipped mask [1, T] and d(sum loss) / d logp [1, T]."""
    logp = logp.clone().requires_grad_(True)
    loss, clipped = clipped_surrogate(logp, old_logp, advantages, **clip_args)
    loss.sum().backward()
    return loss.detach(), clipped, logp.grad


def away_from(ratio: torch.Tensor, boundary: float) -> bool:
    """The ratio is not within rounding of a clip boundary, where min/max split the gradient."""
    return bool(((ratio - boundary).abs() > 1e-9).all())


class TestClippedSurrogate:
    """clipped_surrogate: loss bounds, gradients that stop exactly where the clipped branch is active, dual clip."""

    @PROPERTY
    @given(inputs=surrogate_inputs(), eps_low=CLIP_EPS, eps_high=CLIP_EPS)
    def test_loss_is_bounded_below_by_the_clip_range(self, inputs, eps_low, eps_high):
        """A > 0: objective rho A <= (1 + eps_high) A, so loss >= -(1 + eps_high) A.
        A < 0: objective max(rho, clip(rho)) A <= (1 - eps_low) A, so loss >= (1 - eps_low) |A|.
        And the loss is pessimistic: never below the unclipped -rho A."""
        logp, old_logp, advantages = inputs
        loss, _ = clipped_surrogate(logp, old_logp, advantages, eps_low=eps_low, eps_high=eps_high)
        slack = ROUNDING * advantages.abs()
        positive = advantages > 0
        assert (loss[positive] >= -(1 + eps_high) * advantages[positive] - slack[positive]).all()
        assert (loss[~positive] >= -(1 - eps_low) * advantages[~positive] - slack[~positive]).all()
        ratio = torch.exp(logp - old_logp)
        assert (loss >= -ratio * advantages - slack * ratio).all()

    @PROPERTY
    @given(inputs=surrogate_inputs(), eps_low=CLIP_EPS, eps_high=CLIP_EPS)
    def test_gradient_vanishes_exactly_where_clipped(self, inputs, eps_low, eps_high):
        """Clipped branch active iff (A > 0 and rho > 1 + eps_high) or (A < 0 and rho < 1 - eps_low):
        there d loss / d logp == 0 and the mask is True; elsewhere the gradient is -rho A and the mask False."""
        logp, old_logp, advantages = inputs
        ratio = torch.exp(logp - old_logp)
        assume(away_from(ratio, 1 + eps_high) and away_from(ratio, 1 - eps_low))
        loss, clipped, grad = surrogate_with_gradient(logp, old_logp, advantages, eps_low=eps_low, eps_high=eps_high)
        expected_clipped = ((advantages > 0) & (ratio > 1 + eps_high)) | ((advantages < 0) & (ratio < 1 - eps_low))
        assert torch.equal(clipped, expected_clipped)
        assert torch.equal(grad == 0, expected_clipped)
        torch.testing.assert_close(grad[~clipped], (-ratio * advantages)[~clipped], rtol=ROUNDING, atol=0)

    @PROPERTY
    @given(inputs=surrogate_inputs(), eps_low=CLIP_EPS, eps_high=CLIP_EPS)
    def test_each_clip_side_only_touches_its_sign_of_advantage(self, inputs, eps_low, eps_high):
        """For A > 0 the loss is -A min(rho, 1 + eps_high): eps_low plays no part; for A < 0, eps_high none.
        Catches eps_low and eps_high swapped (which the symmetric 0.2 / 0.2 default would hide)."""
        logp, old_logp, advantages = inputs
        loss, _ = clipped_surrogate(logp, old_logp, advantages, eps_low=eps_low, eps_high=eps_high)
        loss_other_low, _ = clipped_surrogate(logp, old_logp, advantages, eps_low=0.01, eps_high=eps_high)
        loss_other_high, _ = clipped_surrogate(logp, old_logp, advantages, eps_low=eps_low, eps_high=0.99)
        positive = advantages > 0
        assert torch.equal(loss[positive], loss_other_low[positive])
        assert torch.equal(loss[~positive], loss_other_high[~positive])

    @PROPERTY
    @given(inputs=surrogate_inputs(), eps_low=CLIP_EPS, eps_high=CLIP_EPS,
           dual_clip=st.one_of(st.none(), DUAL_CLIP))
    def test_on_policy_loss_is_minus_advantage_and_gradient_minus_advantage(self, inputs, eps_low, eps_high, dual_clip):
        """logp == old_logp: rho = 1, so loss = -A and d loss / d logp = -A, whatever the clip settings."""
        logp, _, advantages = inputs
        loss, clipped, grad = surrogate_with_gradient(logp, logp.clone(), advantages, eps_low=eps_low,
                                                      eps_high=eps_high, dual_clip=dual_clip)
        assert torch.equal(loss, -advantages)
        torch.testing.assert_close(grad, -advantages, rtol=ROUNDING, atol=0)
        assert not clipped.any()

    @PROPERTY
    @given(inputs=surrogate_inputs(max_log_ratio=4.0), eps_low=CLIP_EPS, eps_high=CLIP_EPS, dual_clip=DUAL_CLIP)
    def test_dual_clip_caps_negative_advantages_and_leaves_positive_ones(self, inputs, eps_low, eps_high, dual_clip):
        """A < 0: loss = min(plain loss, -c A) <= -c A, and the gradient is 0 where the cap binds (rho > c).
        A > 0: loss, mask and gradient are those without dual clip."""
        logp, old_logp, advantages = inputs
        ratio = torch.exp(logp - old_logp)
        assume(away_from(ratio, 1 + eps_high) and away_from(ratio, 1 - eps_low) and away_from(ratio, dual_clip))
        clip_range = {"eps_low": eps_low, "eps_high": eps_high}
        plain_loss, plain_clipped, plain_grad = surrogate_with_gradient(logp, old_logp, advantages, **clip_range)
        loss, clipped, grad = surrogate_with_gradient(logp, old_logp, advantages, **clip_range, dual_clip=dual_clip)
        positive = advantages > 0
        assert torch.equal(loss[positive], plain_loss[positive])
        assert torch.equal(clipped[positive], plain_clipped[positive])
        assert torch.equal(grad[positive], plain_grad[positive])
        negative = ~positive
        cap = -dual_clip * advantages
        assert torch.equal(loss[negative], torch.minimum(plain_loss, cap)[negative])
        assert (loss[negative] <= cap[negative]).all()
        capped = negative & (ratio > dual_clip)
        assert (grad[capped] == 0).all()
        assert torch.equal(grad[negative & ~capped], plain_grad[negative & ~capped])


# ---------------------------------------------------------------------------------------------
# 4. Loss aggregation
# ---------------------------------------------------------------------------------------------


@st.composite
def masked_token_losses(draw, min_sequences=1):
    """(token_loss [B, T] float64, mask [B, T] float64 or bool with at least one token per row)."""
    num_sequences = draw(st.integers(min_sequences, 6))
    length = draw(st.integers(1, 8))
    losses = draw(st.lists(st.floats(-100, 100), min_size=num_sequences * length, max_size=num_sequences * length))
    rows = []
    for _ in range(num_sequences):
        row = draw(st.lists(st.booleans(), min_size=length, max_size=length))
        row[draw(st.integers(0, length - 1))] = True
        rows.append(row)
    mask_dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bool]))
    return f64(losses).view(num_sequences, length), torch.tensor(rows).to(mask_dtype)


def hand_aggregate(token_loss: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int) -> float:
    """The four modes as aggregate_loss's docstring defines them, with Python loops over lists."""
    losses, masks = token_loss.tolist(), mask.bool().tolist()
    kept = [[l for l, m in zip(row, row_mask) if m] for row, row_mask in zip(losses, masks)]
    num_sequences = len(kept)
    if mode == "token-mean":
        return sum(sum(row) for row in kept) / sum(len(row) for row in kept)
    if mode == "seq-mean-token-mean":
        return sum(sum(row) / len(row) for row in kept) / num_sequences
    if mode == "seq-mean-token-sum":
        return sum(sum(row) for row in kept) / num_sequences
    assert mode == "dr-grpo"
    return sum(sum(row) for row in kept) / (num_sequences * max_len)


class TestAggregateLoss:
    """aggregate_loss: the four modes against hand computation, and micro-batches that add up to the batch."""

    @PROPERTY
    @given(batch=masked_token_losses(), mode=st.sampled_from(AGGREGATION_MODES), extra_length=st.integers(0, 5),
           pass_max_len=st.booleans())
    def test_matches_hand_computation(self, batch, mode, extra_length, pass_max_len):
        token_loss, mask = batch
        max_len = token_loss.shape[1] + extra_length if pass_max_len else token_loss.shape[1]
        kwargs = {"max_len": max_len} if pass_max_len else {}
        value = aggregate_loss(token_loss, mask, mode, **kwargs)
        assert value.shape == ()
        assert value.item() == pytest.approx(hand_aggregate(token_loss, mask, mode, max_len), rel=ROUNDING, abs=ROUNDING)

    @PROPERTY
    @given(batch=masked_token_losses(min_sequences=2), mode=st.sampled_from(AGGREGATION_MODES), data=st.data())
    def test_micro_batches_add_up_to_the_full_batch(self, batch, mode, data):
        token_loss, mask = batch
        num_sequences, length = token_loss.shape
        split = data.draw(st.integers(1, num_sequences - 1))
        totals = {"num_sequences": num_sequences, "num_tokens": mask.sum(), "max_len": length}
        halves = [aggregate_loss(token_loss[:split], mask[:split], mode, **totals),
                  aggregate_loss(token_loss[split:], mask[split:], mode, **totals)]
        full = aggregate_loss(token_loss, mask, mode)
        assert (halves[0] + halves[1]).item() == pytest.approx(full.item(), rel=ROUNDING, abs=ROUNDING)

    @PROPERTY
    @given(batch=masked_token_losses(), mode=st.sampled_from(AGGREGATION_MODES), junk=st.floats(-1e6, 1e6))
    def test_masked_positions_do_not_matter(self, batch, mode, junk):
        token_loss, mask = batch
        with_junk = torch.where(mask.bool(), token_loss, junk)
        assert aggregate_loss(with_junk, mask, mode).item() == aggregate_loss(token_loss, mask, mode).item()


# ---------------------------------------------------------------------------------------------
# 5. KL estimators
# ---------------------------------------------------------------------------------------------

LOGP = st.floats(-20, 0)


class TestKlPenalty:
    """kl_penalty with d = ref_logp - logp: k3 >= 0, all zero on the reference, k2 ~ k3 near 0, k1 and k3 unbiased."""

    @PROPERTY
    @given(logp=LOGP, ref_logp=LOGP)
    def test_k3_is_non_negative(self, logp, ref_logp):
        """exp(d) - d - 1 >= 0 exactly, however small |d| is (computed as expm1(d) - d)."""
        assert kl_penalty(f64([logp]), f64([ref_logp]), "k3").item() >= 0

    @pytest.mark.parametrize("dtype, spread", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
    def test_k3_is_non_negative_when_policy_is_close_to_reference(self, dtype, spread):
        """10,000 confident tokens (log-probs in [-0.5, 0]) with the reference a hair away: the float32
        case is what the trainer sees early on, where about 3.5% of the tokens come out negative."""
        generator = torch.Generator().manual_seed(0)
        logp = (-0.5 * torch.rand(10_000, generator=generator, dtype=torch.float64)).to(dtype)
        ref_logp = logp + (spread * torch.randn(10_000, generator=generator, dtype=torch.float64)).to(dtype)
        assert (kl_penalty(logp, ref_logp, "k3") >= 0).all()

    @PROPERTY
    @given(logp=st.lists(LOGP, min_size=1, max_size=8), estimator=st.sampled_from(["k1", "k2", "k3"]))
    def test_all_estimators_are_zero_on_the_reference(self, logp, estimator):
        logp = f64(logp)
        assert torch.equal(kl_penalty(logp, logp.clone(), estimator), torch.zeros_like(logp))

    @PROPERTY
    @given(logp=LOGP, d=st.floats(-0.1, 0.1))
    def test_k2_and_k3_agree_to_second_order(self, logp, d):
        """k3 - k2 = sum_{n >= 3} d^n / n!, so |k3 - k2| <= |d|^3 / 6 * e^|d|, plus the rounding of exp(d) near 1."""
        ref_logp = logp + d
        d = ref_logp - logp  # the difference the function actually sees, after rounding
        k2 = kl_penalty(f64([logp]), f64([ref_logp]), "k2").item()
        k3 = kl_penalty(f64([logp]), f64([ref_logp]), "k3").item()
        assert abs(k3 - k2) <= abs(d) ** 3 / 6 * math.exp(abs(d)) + 1e-15
        assert k2 == pytest.approx(d * d / 2, rel=ROUNDING)

    @PROPERTY
    @given(logp=LOGP, ref_logp=LOGP)
    def test_k1_is_the_log_ratio(self, logp, ref_logp):
        k1 = kl_penalty(f64([logp]), f64([ref_logp]), "k1").item()
        assert k1 == pytest.approx(logp - ref_logp, rel=ROUNDING, abs=ROUNDING)

    @PROPERTY
    @given(data=st.data(), size=st.integers(2, 6))
    def test_k1_and_k3_are_unbiased_under_the_policy(self, data, size):
        """Averaged over tokens drawn from pi_theta, k1 and k3 both equal KL(pi_theta || pi_ref) exactly
        (for k3 because E_pi[pi_ref / pi - 1] = 0); k2 does not, except by accident."""
        logits = st.lists(st.floats(-5, 5), min_size=size, max_size=size)
        logp = torch.log_softmax(f64(data.draw(logits)), dim=0)
        ref_logp = torch.log_softmax(f64(data.draw(logits)), dim=0)
        probs = logp.exp()
        kl = (probs * (logp - ref_logp)).sum().item()
        for estimator in ("k1", "k3"):
            expectation = (probs * kl_penalty(logp, ref_logp, estimator)).sum().item()
            assert expectation == pytest.approx(kl, rel=1e-9, abs=1e-12)
