"""The built-in agent environment: fetch a key, then open a door, in a 5x5 grid of rooms.

A layout places the agent, a key and a door in three different rooms of the grid. The
observation says where the key and the door are, relative to the agent:

    The key is 2 north, 1 east. The door is 3 west.
    The key is here. The door is 1 south, 2 west.
    You have the key. The door is here.

Commands: `go north|south|east|west` (a wall stops the move), `take key`, `open door`. Opening
the door while holding the key wins the episode (reward 10, as ALFWorld gives for a win); any
other command leaves the state unchanged. The observation is the state and nothing else (no
reply text, no move counter), so it is also the anchor key of GiGPO's step groups, and the G
episodes of a layout keep meeting the same states.

Layouts come from a seed. The held-out set is a fixed 200 layouts drawn from their own seed;
training layouts are never one of them.

Demonstrations (only for warm-starting `common/tiny_agent_model/`, see
`common/build_tiny_agent.py`) come from a noisy expert with a habit that costs it episodes:
without the key, whenever it stands in the door's row or column it is drawn to the door it
sees (walks to it, tries to open it) with probability LURE, instead of fetching the key first;
and with probability SLIP any step is a random move. Greedy imitation copies the habit, so
reinforcement learning has something to fix.
"""

import random
from functools import lru_cache

GRID_SIZE = 5
MAX_OPTIMAL_TURNS = 10  # layouts solvable in at most this many commands (path to key, take, path to door, open)
WIN_REWARD = 10.0
HELDOUT_SIZE = 200
HELDOUT_SEED = "keydoor-heldout"
TASK = "Take the key, then open the door."
MOVES = {"north": (0, -1), "south": (0, 1), "east": (1, 0), "west": (-1, 0)}
COMMANDS = tuple(f"go {direction}" for direction in MOVES) + ("take key", "open door")
LURE, SLIP = 0.65, 0.1  # the expert's habit and its random moves (see the module docstring)


def distance(a: tuple[int, int], b: tuple[int, int]) -> int:
    return abs(a[0] - b[0]) + abs(a[1] - b[1])


def sample_layout(rng: random.Random) -> tuple:
    """(agent, key, door) cells, all different, solvable in at most MAX_OPTIMAL_TURNS commands."""
    while True:
        agent, key, door = [(rng.randrange(GRID_SIZE), rng.randrange(GRID_SIZE)) for _ in range(3)]
        if len({agent, key, door}) == 3 and distance(agent, key) + distance(key, door) + 2 <= MAX_OPTIMAL_TURNS:
            return agent, key, door


def layout_for_seed(seed: int) -> tuple:
    return sample_layout(random.Random(f"keydoor-{seed}"))


@lru_cache(maxsize=1)
def heldout_seeds() -> tuple[int, ...]:
    """The seeds of the fixed held-out layouts: HELDOUT_SIZE distinct layouts."""
    rng, seeds, layouts = random.Random(HELDOUT_SEED), [], set()
    while len(seeds) < HELDOUT_SIZE:
        seed = rng.getrandbits(40)
        if layout_for_seed(seed) not in layouts:
            layouts.add(layout_for_seed(seed))
            seeds.append(seed)
    return tuple(seeds)


@lru_cache(maxsize=1)
def _heldout_layouts() -> frozenset:
    return frozenset(layout_for_seed(seed) for seed in heldout_seeds())


def train_seed(run_seed: int, index: int) -> int:
    """The layout seed of training task number `index` for `run_seed`; never a held-out layout."""
    rng = random.Random(f"keydoor-train-{run_seed}-{index}")
    while True:
        seed = rng.getrandbits(40)
        if layout_for_seed(seed) not in _heldout_layouts():
            return seed


def _offset(here: tuple[int, int], there: tuple[int, int]) -> str:
    """Where `there` is seen from `here`: "here", "3 west", "2 north, 1 east"."""
    dx, dy = there[0] - here[0], there[1] - here[1]
    parts = ([f"{abs(dy)} {'south' if dy > 0 else 'north'}"] if dy else []) + \
            ([f"{abs(dx)} {'east' if dx > 0 else 'west'}"] if dx else [])
    return ", ".join(parts) or "here"


class KeyDoorEnv:
    """One episode at a time of a seeded layout; see the module docstring. Implements common.envs.Environment."""

    task = TASK

    def __init__(self):
        self.agent = self.key = self.door = None
        self.has_key = False

    def reset(self, seed: int) -> str:
        self.agent, self.key, self.door = layout_for_seed(seed)
        self.has_key = False
        return self.observation()

    def observation(self) -> str:
        key = "You have the key." if self.has_key else f"The key is {_offset(self.agent, self.key)}."
        return f"{key} The door is {_offset(self.agent, self.door)}."

    def anchor(self) -> str:
        return self.observation()  # the observation is exactly the state

    def admissible_actions(self) -> list[str]:
        return list(COMMANDS)

    def close(self):
        pass  # nothing to free

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        words = action.split()
        if len(words) == 2 and words[0] == "go" and words[1] in MOVES:
            x, y = self.agent[0] + MOVES[words[1]][0], self.agent[1] + MOVES[words[1]][1]
            if 0 <= x < GRID_SIZE and 0 <= y < GRID_SIZE:
                self.agent = (x, y)
        elif action == "take key" and self.agent == self.key:
            self.has_key = True
        elif action == "open door" and self.agent == self.door and self.has_key:
            return self.observation(), WIN_REWARD, True, {"won": True}
        return self.observation(), 0.0, False, {"won": False}


def _toward(here: tuple[int, int], there: tuple[int, int]) -> list[str]:
    moves = []
    if there[1] != here[1]:
        moves.append("go south" if there[1] > here[1] else "go north")
    if there[0] != here[0]:
        moves.append("go east" if there[0] > here[0] else "go west")
    return moves


def expert_action_probabilities(env: KeyDoorEnv) -> dict[str, float]:
    """The noisy expert's distribution over commands in the current state of `env`."""
    probabilities = dict.fromkeys(COMMANDS, 0.0)

    def spread(actions, weight):
        for action in actions:
            probabilities[action] += weight / len(actions)

    spread([f"go {direction}" for direction in MOVES], SLIP)
    if env.has_key:
        spread(["open door"] if env.agent == env.door else _toward(env.agent, env.door), 1 - SLIP)
    elif env.agent == env.key:
        spread(["take key"], 1 - SLIP)
    elif env.agent[0] == env.door[0] or env.agent[1] == env.door[1]:  # the door in sight lures it
        spread(["open door"] if env.agent == env.door else _toward(env.agent, env.door), (1 - SLIP) * LURE)
        spread(_toward(env.agent, env.key), (1 - SLIP) * (1 - LURE))
    else:
        spread(_toward(env.agent, env.key), 1 - SLIP)
    return probabilities


def expert_action(env: KeyDoorEnv, rng: random.Random) -> str:
    probabilities = expert_action_probabilities(env)
    return rng.choices(list(probabilities), weights=list(probabilities.values()))[0]
