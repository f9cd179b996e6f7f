"""TextWorld games as agent environments (common.envs.Environment), offline.

TextWorld (Microsoft; `pip install -r requirements-textworld.txt`) is the text-game engine that
ALFWorld is built on. Its `tw-make` command generates games offline, the same game for the same
seed:

    tw-make tw-coin_collector --level 5 --seed 1 --output games/train/coin5_1.z8 -f
    tw-make custom --world-size 3 --nb-objects 5 --quest-length 3 --seed 1 --output games/train/custom_1.z8 -f

Two things make a game's raw text a poor state key for GiGPO's step groups, so the anchor is
(room description, inventory) instead:
- the observation is the reply to the last command, and many replies ("You are carrying nothing.",
  "That's not a verb I recognise.") are the same in every room, so keying on them merges states;
- the score is cumulative, so the reward of a step is the change of the score.
The observations shown to the agent are the room description after a reset (the objective is
the task line) and the game's replies without their status line. Games are deterministic:
reset's seed is not used.
"""

from pathlib import Path

from common import UsageError

try:
    import textworld
    import textworld.gym
except ImportError:  # optional: only TextWorld tasks need it, and the error below says how to get it
    textworld = None

_REGISTERED: dict[str, str] = {}  # game file -> gym id, so that a game is registered once per process


def _compact(text: str) -> str:
    """Text without blank lines, for shorter prompts."""
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def _reply(observation: str) -> str:
    """The game's reply without its status line ("> -= Kitchen =-0/4": room, score, move counter)."""
    return _compact(observation.rsplit("\n>", 1)[0])


class TextWorldEnv:
    """One TextWorld game file, played one episode at a time."""

    def __init__(self, game: str):
        if textworld is None:
            raise UsageError("TextWorld games need the textworld package: pip install -r requirements-textworld.txt")
        if not Path(game).with_suffix(".json").is_file():  # the objective, score and win conditions are in it
            raise UsageError(f"TextWorld game {game} needs {Path(game).with_suffix('.json').name} beside it, as tw-make writes it")
        if game not in _REGISTERED:
            requested = textworld.EnvInfos(admissible_commands=True, won=True, score=True, description=True,
                                           inventory=True, objective=True)
            _REGISTERED[game] = textworld.gym.register_game(game, request_infos=requested)
        self.env = textworld.gym.make(_REGISTERED[game])
        self.task, self.infos, self.score = "", {}, 0

    def reset(self, seed: int) -> str:
        _, self.infos = self.env.reset()  # the raw text: a banner, the objective, the room
        self.task, self.score = self.infos["objective"].strip(), self.infos["score"]
        return _compact(self.infos["description"])

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        observation, score, done, self.infos = self.env.step(action)
        reward, self.score = score - self.score, score
        return _reply(observation), float(reward), done, {"won": bool(self.infos["won"])}

    def anchor(self) -> str:
        return f"{self.infos['description'].strip()}\n{self.infos['inventory'].strip()}"

    def admissible_actions(self) -> list[str]:
        return list(self.infos["admissible_commands"])

    def close(self):
        self.env.close()
