"""GiGPO: its advantage arithmetic (properties and the spec's numbers), the built-in environment,
the episode runner, and gigpo.py end to end on the tiny agent model and on the real test model."""

import contextlib
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common import UsageError
from common.data import render_prompt
from common.envs import (KEYDOOR, Turn, agent_prompt, describe_task, load_eval_tasks, parse_action,
                         run_episodes, stack_turns, TaskStream)
from common.keydoor import (COMMANDS, WIN_REWARD, KeyDoorEnv, expert_action_probabilities, heldout_seeds,
                            layout_for_seed, train_seed)
from common.model import load_model, load_tokenizer
from common.rollout import Rollout, TransformersEngine
import gigpo
from gigpo import discounted_returns, gigpo_advantages, group_relative, grpo_advantages, step_groups
from grpo_runs import read_steps, run_trainer

# A short run: 2 layouts x 4 episodes, 20 held-out layouts.
SHORT_RUN = ["--num-prompts", "2", "--group-size", "4", "--eval-size", "20", "--max-turns", "8"]
EVAL_KEYS = {"pass@1", "pass@1_low", "pass@1_high", "greedy_correct", "return", "turns", "invalid_rate"}


def spec_example():
    """Section 6's test vector: two episodes of one task, anchors s0..s3, gamma 0.95."""
    rewards = [[0.0, 0.0, 10.0], [0.0, 0.0, 0.0, 0.0]]
    anchors = ["s0", "s1", "s2", "s0", "s1", "s3", "s3"]
    step_returns = torch.tensor([r for episode in rewards for r in discounted_returns(episode, 0.95)])
    episode_returns = torch.tensor([[sum(episode) for episode in rewards]])
    turn_episode = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    return episode_returns, step_returns, turn_episode, step_groups(anchors, [0] * 7)


def test_spec_vector_without_std():
    episode_returns, step_returns, turn_episode, groups = spec_example()
    assert torch.allclose(step_returns, torch.tensor([9.025, 9.5, 10, 0, 0, 0, 0]))
    assert groups.tolist() == [0, 1, 2, 0, 1, 3, 3]  # the revisit of s3 joins its own group
    episode_level = gigpo_advantages(episode_returns, step_returns, turn_episode, groups, omega=0.0, scale_by_std=False)
    assert torch.allclose(episode_level, torch.tensor([5.0, 5, 5, -5, -5, -5, -5]))
    combined = gigpo_advantages(episode_returns, step_returns, turn_episode, groups, omega=1.0, scale_by_std=False)
    step_level = torch.tensor([4.5125, 4.75, 0, -4.5125, -4.75, 0, 0])
    assert torch.allclose(combined - episode_level, step_level, atol=1e-5)


def test_spec_vector_with_std():
    episode_returns, step_returns, turn_episode, groups = spec_example()
    combined = gigpo_advantages(episode_returns, step_returns, turn_episode, groups, omega=1.0, eps=1e-6)
    # Two members a > b: (a - mean) / std = (a - b) / 2 / ((a - b) / sqrt 2) = 1 / sqrt 2, less the eps.
    half = 1 / math.sqrt(2)
    episode_level = torch.tensor([half] * 3 + [-half] * 4)
    step_level = torch.tensor([half, half, 0, -half, -half, 0, 0])
    assert torch.allclose(combined, episode_level + step_level, atol=1e-5)


def test_episode_stats_over_step_rows_weigh_long_episodes_more():
    # Episode 1 (return 10) has 3 turns, episode 2 (return 0) one: over rows the mean is 7.5, over episodes 5.
    episode_returns, step_returns = torch.tensor([[10.0, 0.0]]), torch.zeros(4)
    turn_episode, groups = torch.tensor([0, 0, 0, 1]), torch.arange(4)
    by_episode = gigpo_advantages(episode_returns, step_returns, turn_episode, groups, scale_by_std=False)
    by_rows = gigpo_advantages(episode_returns, step_returns, turn_episode, groups, scale_by_std=False,
                               episode_stats="steps")
    assert by_episode.tolist() == [5.0, 5.0, 5.0, -5.0]
    assert by_rows.tolist() == [2.5, 2.5, 2.5, -7.5]


@st.composite
def batches(draw):
    """Random tasks x G episodes of random lengths, rewards and anchors (a few anchors, so some repeat)."""
    tasks, group_size = draw(st.integers(1, 3)), draw(st.integers(2, 4))
    lengths = draw(st.lists(st.integers(1, 5), min_size=tasks * group_size, max_size=tasks * group_size))
    rewards = [draw(st.lists(st.sampled_from([0.0, -0.1, 1.0, 10.0]), min_size=n, max_size=n)) for n in lengths]
    anchors = [draw(st.lists(st.sampled_from("abcd"), min_size=n, max_size=n)) for n in lengths]
    return tasks, group_size, rewards, anchors


def unpack(batch, unique_anchors=False):
    tasks, group_size, rewards, anchors = batch
    turn_episode = torch.tensor([e for e, episode in enumerate(rewards) for _ in episode])
    flat_anchors = [f"{e}-{t}" if unique_anchors else a for e, episode in enumerate(anchors) for t, a in enumerate(episode)]
    groups = step_groups(flat_anchors, (turn_episode // group_size).tolist())
    episode_returns = torch.tensor([sum(episode) for episode in rewards]).view(tasks, group_size)
    step_returns = torch.tensor([r for episode in rewards for r in discounted_returns(episode, 0.95)])
    return episode_returns, step_returns, turn_episode, groups


@settings(max_examples=60, deadline=None)
@given(batches(), st.booleans())
def test_singleton_step_groups_contribute_nothing(batch, scale_by_std):
    episode_returns, step_returns, turn_episode, groups = unpack(batch)
    step_level = gigpo_advantages(episode_returns, step_returns, turn_episode, groups, scale_by_std=scale_by_std) - \
        gigpo_advantages(episode_returns, step_returns, turn_episode, groups, omega=0.0, scale_by_std=scale_by_std)
    alone = torch.bincount(groups)[groups] == 1
    assert (step_level[alone] == 0).all()


@settings(max_examples=60, deadline=None)
@given(batches(), st.booleans())
def test_unique_anchors_leave_the_episode_advantage(batch, scale_by_std):
    episode_returns, step_returns, turn_episode, groups = unpack(batch, unique_anchors=True)
    combined = gigpo_advantages(episode_returns, step_returns, turn_episode, groups, scale_by_std=scale_by_std)
    assert torch.equal(combined, grpo_advantages(episode_returns, 1e-6, scale_by_std).flatten()[turn_episode])


@settings(max_examples=60, deadline=None)
@given(batches())
def test_mean_normalised_step_advantages_sum_to_zero_in_each_group(batch):
    episode_returns, step_returns, turn_episode, groups = unpack(batch)
    step_level = group_relative(step_returns, groups, scale_by_std=False)
    sums = torch.zeros(int(groups.max()) + 1).index_add_(0, groups, step_level)
    assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(batches(), st.booleans())
def test_omega_zero_is_grpo_over_episodes(batch, scale_by_std):
    episode_returns, step_returns, turn_episode, groups = unpack(batch)
    advantages = gigpo_advantages(episode_returns, step_returns, turn_episode, groups, omega=0.0, scale_by_std=scale_by_std)
    assert torch.equal(advantages, grpo_advantages(episode_returns, 1e-6, scale_by_std).flatten()[turn_episode])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=12), st.floats(0, 1))
def test_discounted_returns_obey_the_recursion(rewards, gamma):
    returns = discounted_returns(rewards, gamma)
    assert returns[-1] == rewards[-1]
    for t in range(len(rewards) - 1):
        assert returns[t] == pytest.approx(rewards[t] + gamma * returns[t + 1], abs=1e-9)


def test_step_groups_never_join_different_tasks_and_similarity_joins_near_copies():
    assert step_groups(["a", "a", "a"], [0, 1, 0]).tolist() == [0, 1, 0]
    near = ["The key is 2 north. The door is 3 west.", "The key is 2 north. The door is 3 east.", "You have the key."]
    assert step_groups(near, [0, 0, 0]).tolist() == [0, 1, 2]
    assert step_groups(near, [0, 0, 0], similarity_threshold=0.9).tolist() == [0, 0, 1]


# The built-in environment.

def test_keydoor_is_deterministic_under_a_seed():
    def play(seed):
        env, rng = KeyDoorEnv(), random.Random(0)
        trace = [env.reset(seed)]
        for _ in range(30):
            trace.append(env.step(rng.choice(COMMANDS)))
        return trace

    assert play(12345) == play(12345)
    assert play(12345) != play(54321)
    assert layout_for_seed(7) == layout_for_seed(7)


def test_keydoor_rules_and_anchor():
    env = KeyDoorEnv()
    env.reset(3)
    env.agent, env.key, env.door = (0, 0), (1, 0), (1, 2)  # key east, door south-east
    assert env.observation() == "The key is 1 east. The door is 2 south, 1 east."
    assert env.anchor() == env.observation()
    assert env.step("go north") == ("The key is 1 east. The door is 2 south, 1 east.", 0.0, False, {"won": False})  # wall
    assert env.step("open door")[1:3] == (0.0, False)
    env.step("go east")
    assert env.step("take key")[0] == "You have the key. The door is 2 south."
    env.step("go south")
    env.step("go south")
    assert env.step("dance") == ("You have the key. The door is here.", 0.0, False, {"won": False})
    assert env.step("open door") == ("You have the key. The door is here.", WIN_REWARD, True, {"won": True})


def test_heldout_layouts_are_fixed_distinct_and_never_trained_on():
    seeds = heldout_seeds()
    layouts = {layout_for_seed(seed) for seed in seeds}
    assert len(seeds) == len(layouts) == 200
    assert all(layout_for_seed(train_seed(1, index)) not in layouts for index in range(2000))
    assert [task["seed"] for task in load_eval_tasks(KEYDOOR, 5)] == list(seeds[:5])


def test_the_expert_is_lured_to_the_door_in_its_row():
    env = KeyDoorEnv()
    env.reset(0)
    env.agent, env.key, env.door, env.has_key = (0, 2), (0, 0), (3, 2), False  # door 3 east, key 2 north
    lured = expert_action_probabilities(env)
    assert lured["go east"] > lured["go north"] > 0
    env.door = (3, 3)  # out of line: the key first
    assert expert_action_probabilities(env)["go north"] > 0.9
    assert sum(lured.values()) == pytest.approx(1.0)


# Prompts, parsing, the episode runner.

@pytest.mark.parametrize("response, action", [
    ("<action>go north</action>", "go north"), ("I think <action> Take  KEY </action> then", "take key"),
    ("go north", None), ("<action></action>", None), ("<action>go north", None),
])
def test_parse_action(response, action):
    assert parse_action(response) == action


def test_prompt_holds_task_actions_history_and_observation():
    prompt = agent_prompt("Do it.", ["a", "b"], [("o1", "a")], "o2")
    assert prompt == "Do it. Reply with one action as <action>...</action>.\nActions: a, b.\nObservation: o1\nAction: a\nObservation: o2"
    assert "Actions" not in agent_prompt("Do it.", None, [], "o")


class ScriptedEngine:
    """A rollout engine that answers each turn with chosen texts, as an engine returns them: the
    prompts it was sent, two placeholder tokens per response and, when sampling, log-probs that
    tell the calls and rows apart (call k, row r: -(k + 1) - (2r + position) / 10)."""

    def __init__(self, replies: list[list[str]]):
        self.policy, self.tokenizer = load_model("tiny-agent", "cpu"), load_tokenizer("tiny-agent")
        self.replies, self.prompts = iter(replies), []

    def generate(self, prompts, max_new_tokens, temperature=1.0, greedy=False):
        texts = next(self.replies)
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        completion_ids = torch.arange(2 * len(texts)).view(-1, 2) + 5
        logprobs = -(len(self.prompts) + 1) - torch.arange(2 * len(texts), dtype=torch.float).view(-1, 2) / 10
        self.prompts.append(prompts)
        return Rollout(encoded["input_ids"], encoded["attention_mask"], completion_ids, torch.ones_like(completion_ids),
                       torch.zeros(len(texts), dtype=torch.bool), texts, None if greedy else logprobs)

    def awake(self):
        return contextlib.nullcontext()


def test_an_invalid_action_keeps_the_state_and_costs_the_penalty():
    tasks = [describe_task(KEYDOOR, 11)] * 2
    engine = ScriptedEngine([["no tags", "<action>go north</action>"]])
    episodes = run_episodes(engine, tasks, "chat", 4, 1, 2, 0.1)
    invalid, valid = episodes[0].turns[0], episodes[1].turns[0]
    assert invalid.action is None and invalid.reward == -0.1 and not episodes[0].won
    assert valid.action == "go north" and valid.reward == 0.0
    assert invalid.anchor == valid.anchor == tasks[0]["question"].rsplit("Observation: ", 1)[1]
    assert engine.prompts == [[render_prompt(engine.tokenizer, task["question"], "chat") for task in tasks]]


def test_turns_keep_the_samplers_logprobs_and_stack_them_row_for_row():
    """What the rollout engine's check and --tis-cap read on gigpo's batch of turns, padded minibatches included."""
    tasks = [describe_task(KEYDOOR, seed) for seed in heldout_seeds()[:2]]
    replies = [["<action>dance</action>", "no tags"], ["<action>go west</action>", "<action>take key</action>"]]
    turns = [turn for episode in run_episodes(ScriptedEngine(replies), tasks, "chat", 4, 2, 0, 0.1) for turn in episode.turns]
    # Episode 0's turns were rows 0 of the two generate calls, episode 1's rows 1.
    assert [turn.logprobs.tolist() for turn in turns] == [pytest.approx(row) for row in
                                                          ([-1.0, -1.1], [-2.0, -2.1], [-1.2, -1.3], [-2.2, -2.3])]
    rows = [3, 0, 2, 0]  # an order with a copy, as the trainer's minibatch padding makes
    stacked = stack_turns([turns[row] for row in rows], pad_token_id=0)
    assert torch.equal(stacked.logprobs, torch.stack([turns[row].logprobs for row in rows]))
    greedy = run_episodes(ScriptedEngine(replies), tasks, "chat", 4, 2, 0, 0.1, greedy=True)
    assert stack_turns([turn for episode in greedy for turn in episode.turns], pad_token_id=0).logprobs is None


def test_each_turn_is_one_generate_call_for_the_episodes_still_running():
    calls = []

    class CountingEngine(TransformersEngine):
        def generate(self, prompts, *args, **kwargs):
            calls.append(len(prompts))
            return super().generate(prompts, *args, **kwargs)

    engine = CountingEngine(load_model("tiny-agent", "cpu"), load_tokenizer("tiny-agent"))
    tasks = [describe_task(KEYDOOR, seed) for seed in heldout_seeds()[:3] for _ in range(2)]
    torch.manual_seed(0)
    episodes = run_episodes(engine, tasks, "chat", 16, 8, 2, 0.1)
    running = [sum(len(episode.turns) > turn for episode in episodes) for turn in range(8)]
    assert calls == [count for count in running if count] and calls[0] == 6
    assert all(episode.won == (episode.turns[-1].reward == WIN_REWARD) for episode in episodes)


def test_stack_turns_pads_like_generate():
    turns = [Turn(torch.tensor([1, 2, 3]), torch.tensor([4]), False, "x", "a", "s", 0.0, torch.tensor([-0.5])),
             Turn(torch.tensor([5]), torch.tensor([6, 7]), True, "y", None, "s", -0.1, torch.tensor([-1.0, -2.0]))]
    rollout = stack_turns(turns, pad_token_id=0)
    assert rollout.prompt_ids.tolist() == [[1, 2, 3], [0, 0, 5]] and rollout.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert rollout.completion_ids.tolist() == [[4, 0], [6, 7]] and rollout.completion_mask.tolist() == [[1, 0], [1, 1]]
    assert rollout.truncated.tolist() == [False, True] and rollout.texts == ["x", "y"]
    assert rollout.logprobs.tolist() == [[-0.5, 0.0], [-1.0, -2.0]]  # 0 on padding, as the vLLM engine pads them


def test_task_streams_are_seeded_and_sources_are_checked():
    assert TaskStream(KEYDOOR, 1)[5] == TaskStream(KEYDOOR, 1)[5] != TaskStream(KEYDOOR, 2)[5]
    with pytest.raises(UsageError, match="unknown environment"):
        load_eval_tasks("gsm8k")


# gigpo.py end to end.

def test_short_run_learns_nothing_wrong_and_logs_the_agent_metrics(tmp_path):
    result = run_trainer("gigpo.py", *SHORT_RUN, "--total-steps", "2", "--eval-every", "1", "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = tmp_path.iterdir()
    assert run_dir.name.startswith("keydoor__gigpo__1__")
    metrics = read_steps(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert 0 <= m["success_rate"] <= 1 and 1 <= m["episode_turns"] <= 8 and 0 <= m["invalid_action_rate"] <= 1
        assert m["turns"] == round(m["episode_turns"] * 8) and m["grouped_turn_fraction"] > 0 and m["step_group_size"] >= 1
        assert 0 <= m["eval_accuracy"] <= 1 and set(m["eval"]["keydoor"]) == EVAL_KEYS
        won = m["eval"]["keydoor"]["greedy_correct"]  # one 0/1 per held-out layout
        assert len(won) == 20 and m["eval_accuracy"] == won.count("1") / 20
    assert "turns in step groups of 2+" in result.stdout
    assert (run_dir / "checkpoints" / "step_2" / "model.safetensors").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--similarity-threshold", "1.5"], "--similarity-threshold"),
    (["--dataset", "nowhere.z8"], "unknown environment"),
    (["--prompt-key", "q"], "prompt-key"),
    (["--eval-dataset", "gsm8k"], "unknown environment"),
])
def test_bad_settings_stop_at_start_up_in_one_line(tmp_path, flags, message):
    with pytest.raises(SystemExit) as stopped:
        gigpo.main([*flags, "--runs-dir", str(tmp_path)])
    assert str(stopped.value).startswith("gigpo.py: error:") and message in str(stopped.value)
    assert "\n" not in str(stopped.value) and not any(tmp_path.iterdir())


def test_two_steps_on_the_real_model_in_the_built_in_environment(real_model_dir, tmp_path):
    gigpo.main(["--model", str(real_model_dir), "--num-prompts", "2", "--group-size", "2", "--max-new-tokens", "16",
                "--max-turns", "2", "--eval-size", "2", "--total-steps", "2", "--eval-every", "0",
                "--learning-rate", "1e-5", "--kl-coef", "0.01", "--runs-dir", str(tmp_path)])
    [run_dir] = tmp_path.iterdir()
    metrics = read_steps(run_dir)
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        # 4 episodes of 1-2 turns; with a KL term every turn is trained, beside the reference model.
        assert 4 <= m["turns"] <= 8 and m["skipped_sequences"] == 0 and m["kl"] is not None and math.isfinite(m["loss"])
        assert m["grouped_turn_fraction"] >= 4 / m["turns"]  # the 2 x 2 first turns share their task's start state
    assert set(metrics[-1]["eval"]["keydoor"]) == EVAL_KEYS
    assert (run_dir / "checkpoints" / "step_2" / "model.safetensors").is_file()


# TextWorld: a real game, generated here offline.

@pytest.fixture(scope="module")
def coin_game(tmp_path_factory):
    """Coin collector level 5, seed 1: the coin is south, east, north, north of the start."""
    folder = tmp_path_factory.mktemp("games")
    made = subprocess.run([str(Path(sys.executable).parent / "tw-make"), "tw-coin_collector", "--level", "5", "--seed", "1",
                           "--output", str(folder / "coin5.z8"), "-f"], capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    return folder / "coin5.z8"


COIN5_WALKTHROUGH = ["go south", "go east", "go north", "go north", "take coin"]


def test_textworld_anchors_are_states_and_rewards_are_score_changes(coin_game):
    from common.textworlds import TextWorldEnv

    first, second = TextWorldEnv(str(coin_game)), TextWorldEnv(str(coin_game))
    assert first.reset(0) == second.reset(0) and "coin" in first.task and first.anchor() == second.anchor()
    start = first.anchor()
    assert "go south" in first.admissible_actions()
    # A wall and a look at the inventory change nothing: same state, same anchor, though the replies differ.
    replies = [first.step("go west")[0], first.step("inventory")[0]]
    assert first.anchor() == start and replies == ["You can't go that way.", "You are carrying nothing."]
    assert all("0/" not in reply and ">" not in reply for reply in replies)  # no status line, no move counter
    second.step("go south")
    assert second.anchor() != start
    rewards, done = [], False
    for action in COIN5_WALKTHROUGH:
        observation, reward, done, info = first.step(action)
        rewards.append(reward)
    assert rewards == [0, 0, 0, 0, 1] and done and info["won"]  # the cumulative score went 0 -> 1
    first.close()
    second.close()


def test_one_gigpo_step_on_a_textworld_game(coin_game, tmp_path):
    result = run_trainer("gigpo.py", "--dataset", str(coin_game.parent), "--eval-dataset", str(coin_game),
                         "--num-prompts", "1", "--group-size", "4", "--max-turns", "4", "--history-length", "1",
                         "--total-steps", "1", "--runs-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = tmp_path.iterdir()
    assert run_dir.name.startswith("games")
    [metrics] = read_steps(run_dir)
    # The 4 episodes start in the same room, so at least their first turns share an anchor state.
    assert 4 <= metrics["turns"] <= 16 and metrics["step_group_size"] > 1
    assert metrics["grouped_turn_fraction"] >= 4 / metrics["turns"]
    assert set(metrics["eval"][str(coin_game)]) == EVAL_KEYS
