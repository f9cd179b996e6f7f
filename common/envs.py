"""Multi-turn agent tasks: the environment protocol, the turn prompt, episodes, held-out evaluation.

An agent trainer (gigpo.py) reads these where a single-turn trainer reads problems: a task is a
dict with a "question" like a problem's (the first turn's prompt text, which the start-up check of
prompt lengths reads) that also names its environment ("env") and what to reset it with ("seed",
or a TextWorld "game" file). Sources:

    keydoor                 the built-in environment (common/keydoor.py): unlimited training
                            layouts, 200 held-out layouts never trained on
    a .z8/.ulx file or a    TextWorld games (common/textworlds.py), e.g. made with tw-make;
    folder of them          needs `pip install -r requirements-textworld.txt`

Every turn is one sample: the prompt holds the task, the admissible actions where the environment
knows them, the last `history_length` (observation, action) pairs and the current observation;
the response must put its action in <action>...</action>. A response without one is an invalid
action: the environment does not see it, the state stays as it was, and the turn gets
`-invalid_penalty` as its reward.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from common import UsageError
from common.data import ProblemStream, render_prompt
from common.evaluation import Evaluator, greedy_results, sampled_results
from common.keydoor import KeyDoorEnv, heldout_seeds, train_seed
from common.rollout import Rollout, check_context_length

KEYDOOR = "keydoor"  # the built-in environment's name wherever a data set is expected
GAME_SUFFIXES = (".z8", ".ulx")
_ACTION = re.compile(r"<action>(.*?)</action>", re.DOTALL)
INVALID_ACTION = "(no action)"  # how an unparseable response appears in later prompts' history


class Environment(Protocol):
    """What an agent trainer needs of an environment. One instance plays one episode at a time."""

    task: str  # the instruction every prompt starts with (may be set by reset)

    def reset(self, seed: int) -> str:
        """Start an episode; returns the first observation."""

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        """Apply a parsed action: (observation, reward, done, info); info["won"] says whether the task was done."""

    def anchor(self) -> str:
        """Key of the current state, without history or counters: equal keys are the same state (GiGPO's anchors)."""

    def admissible_actions(self) -> list[str] | None:
        """The actions that make sense now, where the environment knows them; None otherwise."""

    def close(self):
        """Free what the episode holds (a game interpreter)."""


def parse_action(response: str) -> str | None:
    """The text of the first <action>...</action>, lowercased with spaces collapsed; None if there is none."""
    match = _ACTION.search(response)
    action = " ".join(match.group(1).split()).lower() if match else ""
    return action or None


def agent_prompt(task: str, admissible: list[str] | None, history: list[tuple[str, str]], observation: str) -> str:
    """The user message of one turn: task, admissible actions, recent (observation, action) pairs, observation."""
    lines = [f"{task} Reply with one action as <action>...</action>."]
    if admissible:
        lines.append(f"Actions: {', '.join(admissible)}.")
    for past_observation, past_action in history:
        lines += [f"Observation: {past_observation}", f"Action: {past_action}"]
    lines.append(f"Observation: {observation}")
    return "\n".join(lines)


def make_env(task: dict) -> Environment:
    if task["env"] == KEYDOOR:
        return KeyDoorEnv()
    from common.textworlds import TextWorldEnv  # imported only when a TextWorld game is played

    return TextWorldEnv(task["game"])


def describe_task(env_name: str, seed: int = 0, game: str | None = None) -> dict:
    """A task dict: its environment, how to reset it, and its first turn's prompt as "question"."""
    task = {"env": env_name, "seed": seed, "game": game}
    env = make_env(task)
    observation = env.reset(seed)
    task["question"] = agent_prompt(env.task, env.admissible_actions(), [], observation)
    env.close()
    return task


def _games(source: str) -> list[str]:
    path = Path(source)
    if path.is_dir():
        games = sorted(str(p) for p in path.iterdir() if p.suffix in GAME_SUFFIXES)
        if not games:
            raise UsageError(f"{source} holds no TextWorld games ({', '.join(GAME_SUFFIXES)} files); make some with tw-make")
        return games
    if path.is_file() and path.suffix in GAME_SUFFIXES:
        return [str(path)]
    raise UsageError(f"unknown environment {source!r}: use {KEYDOOR} (built-in), a TextWorld game "
                     f"({', '.join(GAME_SUFFIXES)}) or a folder of them")


class TaskStream(ProblemStream):
    """The endless stream of training tasks: task number i is the same on every run with this seed.

    keydoor draws a fresh layout for every index (never a held-out one); a set of TextWorld games
    is walked in a new seeded order each epoch, as ProblemStream walks a data set.
    """

    def __init__(self, source: str, seed: int):
        self.seed, self._epoch_order = seed, None
        self.problems = None if source == KEYDOOR else [describe_task("textworld", game=g) for g in _games(source)]

    def __getitem__(self, index: int) -> dict:
        if self.problems is None:
            return describe_task(KEYDOOR, train_seed(self.seed, index))
        return super().__getitem__(index)


def load_eval_tasks(source: str, size: int = 0) -> list[dict]:
    """The first `size` (0: all) held-out tasks of `source`: keydoor's held-out layouts or TextWorld games."""
    if source == KEYDOOR:
        seeds = heldout_seeds()[:size] if size > 0 else heldout_seeds()
        return [describe_task(KEYDOOR, seed) for seed in seeds]
    games = _games(source)
    return [describe_task("textworld", game=game) for game in (games[:size] if size > 0 else games)]


@dataclass
class Turn:
    """One turn of an episode, which is also one training sample."""
    prompt_ids: torch.Tensor  # [P] the prompt's tokens, unpadded
    completion_ids: torch.Tensor  # [C] sampled tokens, up to and including EOS
    truncated: bool  # no EOS within max_new_tokens
    text: str  # the decoded response
    action: str | None  # the parsed action; None: invalid
    anchor: str  # the environment's state key before the action
    reward: float
    logprobs: torch.Tensor | None = None  # [C] the sampler's log-prob of each completion token, where it gives them


@dataclass
class Episode:
    task: dict
    turns: list[Turn] = field(default_factory=list)
    done: bool = False
    won: bool = False

    @property
    def total_reward(self) -> float:
        return sum(turn.reward for turn in self.turns)


def run_episodes(engine, tasks: list[dict], template: str, max_new_tokens: int, max_turns: int, history_length: int,
                 invalid_penalty: float, temperature: float = 1.0, greedy: bool = False) -> list[Episode]:
    """Play one episode per task, all at once: each turn, one batched `engine.generate` call for the running ones.

    `engine`: the run's rollout engine (common.rollout), so a vLLM run plays its episodes with vLLM.
    The first turn's prompt is the task's "question" (no history yet); copies of a task side by
    side (a group) send theirs together, which vLLM serves as one request for G samples. An
    episode ends when its environment says done or after `max_turns` turns.
    """
    envs = [make_env(task) for task in tasks]
    observations = [env.reset(task["seed"]) for env, task in zip(envs, tasks)]
    histories: list[list[tuple[str, str]]] = [[] for _ in tasks]
    episodes = [Episode(task) for task in tasks]
    with engine.awake():  # a vLLM engine in sleep mode sleeps after the last turn, not after every one
        for turn in range(max_turns):
            running = [i for i, episode in enumerate(episodes) if not episode.done]
            if not running:
                break
            prompts = [render_prompt(engine.tokenizer, agent_prompt(
                envs[i].task, envs[i].admissible_actions(), histories[i][-history_length:] if history_length else [],
                observations[i]), template) for i in running]
            check_context_length(engine.policy, engine.tokenizer, f"turn {turn + 1}", prompts, max_new_tokens)
            rollout = engine.generate(prompts, max_new_tokens, temperature, greedy=greedy)
            for row, i in enumerate(running):
                env, episode = envs[i], episodes[i]
                action, anchor = parse_action(rollout.texts[row]), env.anchor()
                if action is None:  # the environment never sees it: same state, a penalty
                    reward = -invalid_penalty
                else:
                    observation, reward, episode.done, info = env.step(action)
                    episode.won = bool(info.get("won"))
                histories[i].append((observations[i], action or INVALID_ACTION))
                if action is not None:
                    observations[i] = observation
                completion = rollout.completion_mask[row].bool()
                episode.turns.append(Turn(rollout.prompt_ids[row][rollout.prompt_mask[row].bool()],
                                          rollout.completion_ids[row][completion], bool(rollout.truncated[row]),
                                          rollout.texts[row], action, anchor, reward,
                                          None if rollout.logprobs is None else rollout.logprobs[row][completion]))
    for env, episode in zip(envs, episodes):
        env.close()
        episode.done = True  # the ones still running hit max_turns
    return episodes


def stack_turns(turns: list[Turn], pad_token_id: int) -> Rollout:
    """Turns of any episodes as one batch: prompts left-padded, completions right-padded, as generate returns them.

    The sampler's log-probs come along, row for row (0 on padding, as the vLLM engine gives them),
    when the turns have them (a vLLM run's sampled turns); the rollout engine's check and --tis-cap
    compare them with the trainer's.
    """
    prompt_width = max(len(turn.prompt_ids) for turn in turns)
    completion_width = max(len(turn.completion_ids) for turn in turns)
    device = turns[0].prompt_ids.device
    prompt_ids = torch.full((len(turns), prompt_width), pad_token_id, dtype=torch.long, device=device)
    completion_ids = torch.full((len(turns), completion_width), pad_token_id, dtype=torch.long, device=device)
    prompt_mask, completion_mask = torch.zeros_like(prompt_ids), torch.zeros_like(completion_ids)
    for row, turn in enumerate(turns):
        prompt_ids[row, prompt_width - len(turn.prompt_ids):] = turn.prompt_ids
        prompt_mask[row, prompt_width - len(turn.prompt_ids):] = 1
        completion_ids[row, :len(turn.completion_ids)] = turn.completion_ids
        completion_mask[row, :len(turn.completion_ids)] = 1
    truncated = torch.tensor([turn.truncated for turn in turns], device=device)
    logprobs = None
    if turns[0].logprobs is not None:  # then every turn has them: one engine sampled them all
        logprobs = torch.zeros(completion_ids.shape, device=device)
        for row, turn in enumerate(turns):
            logprobs[row, :len(turn.logprobs)] = turn.logprobs
    return Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, [turn.text for turn in turns], logprobs)


class EpisodeEvaluator(Evaluator):
    """Evaluator for agent tasks: success rate of greedy episodes (reported as pass@1, with its 95%
    interval and which tasks were won in "greedy_correct"), their mean return and length, and with
    `samples` k > 0, mean@k (mean success of k sampled episodes per task) and the unbiased pass@k."""

    def __init__(self, engine, eval_sets: dict[str, list[dict]], template: str, max_new_tokens: int,
                 batch_size: int, samples: int, temperature: float, max_turns: int, history_length: int,
                 invalid_penalty: float):
        super().__init__(engine, eval_sets, template, max_new_tokens, batch_size, samples, temperature)
        self.episode_settings = {"template": template, "max_new_tokens": max_new_tokens, "max_turns": max_turns,
                                 "history_length": history_length, "invalid_penalty": invalid_penalty}

    def _play(self, tasks: list[dict], **sampling) -> list[Episode]:
        return [episode for start in range(0, len(tasks), self.batch_size)
                for episode in run_episodes(self.engine, tasks[start:start + self.batch_size],
                                            **self.episode_settings, **sampling)]

    def evaluate(self, problems: list[dict]) -> dict:
        greedy = self._play(problems, greedy=True)
        turns = [turn for episode in greedy for turn in episode.turns]
        results = {**greedy_results([episode.won for episode in greedy]),
                   "return": sum(e.total_reward for e in greedy) / len(greedy),
                   "turns": len(turns) / len(greedy),
                   "invalid_rate": sum(turn.action is None for turn in turns) / max(len(turns), 1)}
        if self.samples:
            sampled = self._play([task for task in problems for _ in range(self.samples)], temperature=self.temperature)
            results.update(sampled_results([episode.won for episode in sampled], self.samples))
        return results
