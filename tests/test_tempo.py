"""tempo.py: TEMPO's prefix-tree advantage, checked against an explicit trie, and the trainer end to end.

`explicit_trie_advantages` is the slow, obvious version: a trie of Python dicts built token by
token, V(node) the mean reward of the responses through it. `tempo_advantages` must agree with
it on random groups full of shared prefixes, duplicates, strict prefixes and padding. The spec's
vectors are ../shared/spec/methods.md section 5 (6 decimals, compared at 1e-5 as the spec says).
Properties run in float64; ROUNDING is the slack of a few float64 operations on values of order 1
(the trie and the tensor code add the same rewards in different orders).
"""

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tempo
from common.data import DEFAULT_DATA_DIR
from grpo_runs import read_steps, run_grpo, run_trainer
from tempo import grpo_advantages, tempo_advantages

PROPERTY = settings(max_examples=100, deadline=None)  # no deadline: the machine is shared
SPEC = 1e-5
ROUNDING = 1e-9
EOS = 0
A, B, C, D, E, F = 1, 2, 3, 4, 5, 6
SHORT_RUN = ["--num-prompts", "4", "--group-size", "4", "--micro-batch-size", "8", "--eval-size", "20",
             "--max-new-tokens", "64", "--eval-every", "0", "--total-steps", "2"]
TREE_METRICS = ("branch_token_fraction", "first_branch_depth", "td_mass_share")


class TrieNode:
    def __init__(self):
        self.children, self.rewards, self.ends = {}, [], 0


def explicit_trie_advantages(rewards, responses, td_coef=1.0, eps=1e-6, scale_by_std=True):
    """TEMPO by the book, one token at a time. rewards [P][G] floats, responses [P][G] token lists
    (EOS included where there is one). Returns advantages and branch flags, nested lists like responses."""
    advantages, branches = [], []
    for group_rewards, group in zip(rewards, responses):
        root = TrieNode()
        for tokens, reward in zip(group, group_rewards):
            node = root
            node.rewards.append(reward)
            for token in tokens:
                node = node.children.setdefault(token, TrieNode())
                node.rewards.append(reward)
            node.ends += 1
        no_signal = len(group) < 2 or len(set(group_rewards)) == 1
        mu = statistics.fmean(group_rewards)
        scale = statistics.stdev(group_rewards) + eps if scale_by_std and not no_signal else 1.0
        advantages.append([]), branches.append([])
        for tokens, reward in zip(group, group_rewards):
            node, row, flags = root, [], []
            for token in tokens:
                child = node.children[token]
                delta = statistics.fmean(child.rewards) - statistics.fmean(node.rewards)
                row.append(0.0 if no_signal else (reward - mu + td_coef * delta) / scale)
                flags.append(len(node.children) + node.ends >= 2)
                node = child
            advantages[-1].append(row), branches[-1].append(flags)
    return advantages, branches


def padded(responses, length, pad):
    """ids and mask [P, G, length] of token lists, right-padded with `pad`."""
    ids = torch.full((len(responses), len(responses[0]), length), pad)
    mask = torch.zeros(ids.shape)
    for p, group in enumerate(responses):
        for i, tokens in enumerate(group):
            ids[p, i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[p, i, :len(tokens)] = 1
    return ids, mask


def unpadded(values, responses):
    """A [P, G, T] tensor as nested lists cut to each response's length."""
    return [[values[p, i, :len(tokens)].tolist() for i, tokens in enumerate(group)] for p, group in enumerate(responses)]


# ---------------------------------------------------------------------------------------------
# Strategies: groups whose responses share prefixes, repeat, end inside each other, and pad
# ---------------------------------------------------------------------------------------------

LENGTH = 7
REWARD_LEVELS = st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, 2.0])


@st.composite
def responses_of_a_group(draw, group_size, generate_like):
    """Token lists over a three-token vocabulary plus EOS (0). Each is new, a copy of an earlier
    one, a strict prefix of an earlier one plus EOS, or an earlier one continued. Without EOS a
    response is truncated: full length when `generate_like` (as from generate), else any length."""
    group = []
    for _ in range(group_size):
        kind = draw(st.sampled_from(["new", "copy", "prefix", "continue"])) if group else "new"
        earlier = [token for token in draw(st.sampled_from(group)) if token != EOS] if group else []
        if kind == "copy":
            group.append(list(draw(st.sampled_from(group))))
            continue
        body = {"new": draw(st.lists(st.integers(1, 3), max_size=LENGTH)),
                "prefix": earlier[:draw(st.integers(0, max(len(earlier) - 1, 0)))],
                "continue": earlier + draw(st.lists(st.integers(1, 3), min_size=1, max_size=LENGTH))}[kind]
        truncated = draw(st.booleans()) and len(body) >= (LENGTH if generate_like else 1)
        group.append(body[:LENGTH] if truncated else body[:LENGTH - 1] + [EOS])
    return group


@st.composite
def groups(draw, generate_like=False, min_group_size=1, rewards_follow_text=False):
    """(rewards [P, G] float64, responses [P][G] token lists, ids [P, G, LENGTH], mask). The pad id is
    EOS itself (as for SmolLM2), a real token, or neither: padding must match nothing either way.
    With `rewards_follow_text`, identical responses get the same reward, as from a verifier."""
    num_prompts, group_size = draw(st.integers(1, 3)), draw(st.integers(min_group_size, 6))
    responses = [draw(responses_of_a_group(group_size, generate_like)) for _ in range(num_prompts)]
    if rewards_follow_text:
        reward_of = {}
        rewards = [[reward_of.setdefault(tuple(tokens), draw(REWARD_LEVELS)) for tokens in group] for group in responses]
    else:
        rewards = [[draw(REWARD_LEVELS) for _ in group] for group in responses]
    ids, mask = padded(responses, LENGTH, pad=draw(st.sampled_from([EOS, A, 9])))
    return torch.tensor(rewards, dtype=torch.float64), responses, ids, mask.double()


# ---------------------------------------------------------------------------------------------
# The spec's vectors and the edge cases the lead and the spec name
# ---------------------------------------------------------------------------------------------


def test_spec_vector_two_responses():
    ids, mask = padded([[[A, B, C], [A, B, D]]], 3, pad=9)
    advantages, _, _ = tempo_advantages(torch.tensor([[1.0, 0.0]]), ids, mask)
    assert advantages[0, 0].tolist() == pytest.approx([0.707107, 0.707107, 1.414214], abs=SPEC)
    assert advantages[0, 1].tolist() == pytest.approx([-0.707107, -0.707107, -1.414214], abs=SPEC)


def test_spec_vector_four_responses():
    responses = [[[A, B, C], [A, B, D], [A, E], [F]]]
    ids, mask = padded(responses, 3, pad=9)
    advantages, _, _ = tempo_advantages(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), ids, mask)
    expected = [[1.154701, 0.577350, 1.732051], [-0.577350, -1.154701, -1.732051], [1.154701, 1.443376], [-1.732051]]
    for got, want in zip(unpadded(advantages, responses)[0], expected):
        assert got == pytest.approx(want, abs=SPEC)
    assert advantages[0, 2, 2] == 0 and (advantages[0, 3, 1:] == 0).all()  # nothing on padding


def test_a_strict_prefix_branches_at_its_eos_and_padding_equal_to_eos_matches_nothing():
    # [A, B, EOS] r=1 against [A, B, C, EOS] r=0, padded with the EOS id itself (SmolLM2's pad).
    ids, mask = padded([[[A, B, EOS], [A, B, C, EOS]]], 4, pad=EOS)
    advantages, td_term, branch = tempo_advantages(torch.tensor([[1.0, 0.0]]), ids, mask, scale_by_std=False)
    assert branch[0].tolist() == [[False, False, True, False], [False, False, True, False]]
    assert td_term[0].tolist() == [[0.0, 0.0, 0.5, 0.0], [0.0, 0.0, -0.5, 0.0]]
    assert advantages[0].tolist() == [[0.5, 0.5, 1.0, 0.0], [-0.5, -0.5, -1.0, -0.5]]


def test_a_truncated_response_ends_at_its_last_token_and_a_longer_one_branches_there():
    # [A, B] without EOS (cut off) r=1 against [A, B, C, EOS] r=0: the continuation is a branch token
    # (as in the authors' code), but no token of the truncated response carries its end, so its
    # deltas add up to V([A, B]) - mu = 0 rather than r - mu.
    ids, mask = padded([[[A, B], [A, B, C, EOS]]], 4, pad=C)
    advantages, td_term, branch = tempo_advantages(torch.tensor([[1.0, 0.0]]), ids, mask, scale_by_std=False)
    assert branch[0].tolist() == [[False, False, False, False], [False, False, True, False]]
    assert td_term[0].tolist() == [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -0.5, 0.0]]
    assert advantages[0, 0].tolist() == [0.5, 0.5, 0.0, 0.0]


@pytest.mark.parametrize("rewards", [[[1.0]], [[0.1, 0.1, 0.1]], [[0.7, 0.7, 0.7, 0.7]]])
def test_a_group_of_one_and_an_all_equal_group_give_exactly_zero(rewards):
    # 0.1 and 0.7 are not exact in binary: the means of the tree's nodes round differently from the
    # rewards, which is where the authors' code leaves float32 noise (and NaN for a group of one).
    size = len(rewards[0])
    ids, mask = padded([[[A, B, EOS], [A, C, C, EOS], [B, EOS], [A, B, C, EOS]][:size]], 4, pad=EOS)
    advantages, td_term, _ = tempo_advantages(torch.tensor(rewards), ids, mask)
    assert torch.equal(advantages, torch.zeros_like(advantages)) and torch.equal(td_term, torch.zeros_like(td_term))


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------


@PROPERTY
@given(group=groups(), td_coef=st.sampled_from([1.0, 0.0, 0.5, 2.0]), scale_by_std=st.booleans())
def test_agrees_with_an_explicit_trie(group, td_coef, scale_by_std):
    rewards, responses, ids, mask = group
    advantages, _, branch = tempo_advantages(rewards, ids, mask, td_coef, 1e-6, scale_by_std)
    expected, expected_branch = explicit_trie_advantages(rewards.tolist(), responses, td_coef, 1e-6, scale_by_std)
    for got, want in zip(unpadded(advantages, responses), expected):
        for got_row, want_row in zip(got, want):
            assert got_row == pytest.approx(want_row, abs=ROUNDING, rel=0)
    assert unpadded(branch, responses) == expected_branch
    assert (advantages[mask == 0] == 0).all() and not branch[mask == 0].any()


@PROPERTY
@given(group=groups(generate_like=True, rewards_follow_text=True))
def test_the_deltas_along_a_response_add_up_to_its_outcome_advantage(group):
    rewards, _, ids, mask = group
    _, delta, _ = tempo_advantages(rewards, ids, mask, scale_by_std=False)  # unscaled, td_coef 1: the deltas
    outcome = grpo_advantages(rewards, scale_by_std=False)
    assert ((delta.sum(dim=2) - outcome).abs() <= ROUNDING).all()


@PROPERTY
@given(group=groups(), scale_by_std=st.booleans())
def test_the_td_term_is_exactly_zero_off_branch_tokens(group, scale_by_std):
    rewards, _, ids, mask = group
    _, td_term, branch = tempo_advantages(rewards, ids, mask, scale_by_std=scale_by_std)
    assert (td_term[~branch] == 0).all()


@PROPERTY
@given(group=groups(), scale_by_std=st.booleans())
def test_td_coef_zero_is_grpo_exactly(group, scale_by_std):
    rewards, _, ids, mask = group
    advantages, _, _ = tempo_advantages(rewards, ids, mask, td_coef=0.0, scale_by_std=scale_by_std)
    assert torch.equal(advantages, grpo_advantages(rewards, scale_by_std=scale_by_std).unsqueeze(2) * mask)


@PROPERTY
@given(group=groups(), data=st.data())
def test_permuting_a_group_permutes_the_advantages(group, data):
    rewards, _, ids, mask = group
    order = torch.tensor(data.draw(st.permutations(range(rewards.shape[1]))))
    advantages, td_term, branch = tempo_advantages(rewards, ids, mask)
    permuted, permuted_td, permuted_branch = tempo_advantages(rewards[:, order], ids[:, order], mask[:, order])
    assert torch.allclose(permuted, advantages[:, order], rtol=0, atol=ROUNDING)
    assert torch.allclose(permuted_td, td_term[:, order], rtol=0, atol=ROUNDING)
    assert torch.equal(permuted_branch, branch[:, order])


@PROPERTY
@given(group=groups(rewards_follow_text=True))
def test_identical_responses_get_identical_advantages(group):
    rewards, responses, ids, mask = group
    advantages, _, _ = tempo_advantages(rewards, ids, mask)
    for p, group_responses in enumerate(responses):
        for i, tokens in enumerate(group_responses):
            for k in range(i):
                if group_responses[k] == tokens:
                    assert torch.equal(advantages[p, i], advantages[p, k])


@PROPERTY
@given(rewards=st.lists(REWARD_LEVELS, min_size=2, max_size=6), scale_by_std=st.booleans(), data=st.data())
def test_without_shared_prefixes_it_is_grpo_plus_one_outcome_term_on_the_first_token(rewards, scale_by_std, data):
    # Every response starts with its own token: the root is the only branch, and V(child) = r_i.
    responses = [[first] + data.draw(st.lists(st.integers(1, 3), max_size=4)) + [EOS]
                 for first in range(10, 10 + len(rewards))]
    ids, mask = padded([responses], 6, pad=EOS)
    rewards = torch.tensor([rewards], dtype=torch.float64)
    advantages, _, branch = tempo_advantages(rewards, ids, mask, scale_by_std=scale_by_std)
    outcome = grpo_advantages(rewards, scale_by_std=scale_by_std).unsqueeze(2)
    expected = outcome * mask
    expected[:, :, 0] *= 2
    assert torch.allclose(advantages, expected, rtol=0, atol=ROUNDING)
    assert torch.equal(branch[..., 0], torch.ones_like(branch[..., 0])) and not branch[..., 1:].any()


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def test_short_run_logs_the_tree_statistics_beside_every_grpo_metric(tmp_path):
    result = run_trainer("tempo.py", *SHORT_RUN, "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    [run_dir] = tmp_path.iterdir()
    assert run_dir.name.startswith("arithmetic__tempo__1__")
    metrics = read_steps(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    for key in ("reward_mean", "loss", "kl", "clip_fraction", "entropy", "response_length", "truncated_fraction",
                "skipped_sequences", "time_generate", "time_score", "time_train", "tokens_per_sec", "eval_accuracy",
                *TREE_METRICS):
        assert key in metrics[0]
    for step in metrics:
        assert 0 < step["branch_token_fraction"] < 1 and 0 <= step["td_mass_share"] < 1
        assert 0 <= step["first_branch_depth"] < 64
    assert "branch tokens" in result.stdout and "TD term" in result.stdout


def test_td_coef_zero_trains_exactly_as_grpo(tmp_path):
    tempo_run = run_trainer("tempo.py", *SHORT_RUN, "--td-coef", "0", "--runs-dir", str(tmp_path / "tempo"))
    grpo_run = run_grpo(*SHORT_RUN, "--runs-dir", str(tmp_path / "grpo"))
    assert tempo_run.returncode == 0 and grpo_run.returncode == 0, tempo_run.stderr[-2000:] + grpo_run.stderr[-2000:]
    [tempo_dir], [grpo_dir] = (tmp_path / "tempo").iterdir(), (tmp_path / "grpo").iterdir()
    for ours, theirs in zip(read_steps(tempo_dir), read_steps(grpo_dir), strict=True):
        for key in ("reward_mean", "loss", "entropy", "skipped_sequences", "eval_accuracy", "response_length"):
            assert ours[key] == theirs[key], key
        assert ours["td_mass_share"] == 0


def test_two_steps_on_the_real_model_match_the_explicit_trie(real_model_dir, monkeypatch, tmp_path):
    """SmolLM2-135M: BPE tokens and a pad token that is its EOS. Rewards alternate within each group,
    so every group has signal; every advantage the trainer computes is checked against the trie."""
    seen = []

    def checked(rewards, ids, mask, *rest):
        result = tempo_advantages(rewards, ids, mask, *rest)
        seen.append((rewards, ids, mask, result))
        return result

    monkeypatch.setattr(tempo, "tempo_advantages", checked)
    monkeypatch.setattr(tempo, "score_batch", lambda texts, answers: [float(i % 2) for i in range(len(texts))])
    tempo.main(["--model", str(real_model_dir), "--dataset", str(DEFAULT_DATA_DIR / "gsm8k_train.jsonl"),
                "--eval-dataset", "gsm8k", "--eval-size", "2", "--total-steps", "2", "--num-prompts", "2",
                "--group-size", "2", "--max-new-tokens", "16", "--learning-rate", "1e-5", "--eval-every", "0",
                "--runs-dir", str(tmp_path)])
    [run_dir] = tmp_path.iterdir()
    metrics = read_steps(run_dir)
    assert [m["step"] for m in metrics] == [1, 2] and len(seen) == 2
    for step, (rewards, ids, mask, (advantages, _, branch)) in zip(metrics, seen):
        responses = [[row[:int(length)] for row, length in zip(group, lengths)]
                     for group, lengths in zip(ids.tolist(), mask.sum(dim=2).tolist())]
        expected, expected_branch = explicit_trie_advantages(rewards.tolist(), responses)
        for got, want in zip(unpadded(advantages, responses), expected):
            for got_row, want_row in zip(got, want):
                assert got_row == pytest.approx(want_row, abs=1e-5)  # float32 rewards
        assert unpadded(branch, responses) == expected_branch
        flags = [flag for group in expected_branch for row in group for flag in row]
        assert step["branch_token_fraction"] == pytest.approx(sum(flags) / len(flags))
        assert step["skipped_sequences"] == 0
