"""TextWorld's generated games as environment families: coin collector, treasure hunter and cooking.

Games are made on this machine with TextWorld's own challenge generators (`tw-make tw-coin_collector`, …), from
integer seeds, the first time a session needs one, and cached under `DYPO_CACHE_DIR/textworld-1.7.0/<settings>/
<split>/<seed>/` (or `env.textworld.games_dir`). `train` games use seeds 0, 1, 2, … and `heldout` games seeds
1000000, 1000001, …, so the two sets are disjoint by construction; a task id names family, split and index:
`textworld-coin/train/000042`. The difficulty comes from `env.textworld` (coin and treasure levels, the cooking
skills) and is part of the cache path, so changing it plays another set of games.

Reproducibility. TextWorld's generator iterates Python sets, so the same seed gives an equivalent game with
differently ordered files under another hash seed. Each game is therefore made in a child interpreter with
PYTHONHASHSEED=0: two machines make byte-identical games. Making one takes 1.5-3.5 s (plus ~1 s to start the
child); a file lock lets one worker make a game while the others of its group wait for it, and a game is moved
into place only when complete, so a crash leaves nothing half-written behind.

Playing. A session is one TextWorld environment (its Z-machine runs in this process through jericho) that loads
the task's game at reset unless it is loaded already; a step takes a few milliseconds. The first observation is
the game's objective and the room, without TextWorld's banner; later ones are the game's answer, with the end-of-
game menu ("Would you like to RESTART…") cut after its "*** The End ***" line. The score is the game's points over
its maximum; `won` is TextWorld's own verdict. TextWorld lists the admissible commands at every step; they are
returned by `admissible_commands()` and, with `env.textworld.show_admissible_commands`, appended to observations.

Expert. Every generated game carries the generator's walkthrough; the expert replays it with a one-sentence reason
per command and raises unless the game is won.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from dypo.stages.config import EnvConfig, TextWorldOptions
from dypo.stages.context import cache_dir
from dypo.stages.environments.protocol import (
    HELDOUT,
    TRAIN,
    Availability,
    EnvFamily,
    ExpertTurn,
    GameSession,
    Status,
    StepResult,
    format_prompt,
)
from dypo.stages.trajectory import Task

if TYPE_CHECKING:
    import textworld

TEXTWORLD_VERSION = "1.7.0"  # games and walkthroughs change across generator versions; the cache path names it
_INSTALL = f"pip install textworld=={TEXTWORLD_VERSION}"
FIRST_SEED = {TRAIN: 0, HELDOUT: 1_000_000}  # a split's game i is made from seed FIRST_SEED[split] + i
_GAME_FILE = "game.z8"  # beside it game.json, which TextWorld reads for scores, admissible commands, walkthrough


# --- Making games ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GameSpec:
    """Everything a generated game depends on: TextWorld's challenge, its settings and the seed."""

    challenge: str  # TextWorld's challenge name, e.g. "tw-coin_collector"
    settings: dict[str, Any]  # the challenge's settings, as `tw-make` passes them
    seed: int

    @property
    def settings_key(self) -> str:
        """A directory name for the settings: "coin_collector-level5", "cooking-recipe2-take1-go6-open-splittrain"."""
        parts = [self.challenge.removeprefix("tw-")]
        for name, value in self.settings.items():
            if value is True:
                parts.append(name)
            elif value not in (False, None):
                parts.append(f"{name}{value}")
        return "-".join(parts)


def game_directory(root: Path, spec: GameSpec, split: str) -> Path:
    return root / f"textworld-{TEXTWORLD_VERSION}" / spec.settings_key / split / f"{spec.seed:07d}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (a lock file) across processes, released when the block ends or the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_game(root: Path, spec: GameSpec, split: str) -> Path:
    """The game file of `spec`, made first (in a child interpreter with a fixed hash seed) if it is not cached."""
    directory = game_directory(root, spec, split)
    game = directory / _GAME_FILE
    if game.is_file():
        return game
    with _locked(directory.with_name(directory.name + ".lock")):
        if game.is_file():  # another worker made it while this one waited
            return game
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
        try:
            command = [sys.executable, "-m", __name__, json.dumps({"challenge": spec.challenge,
                                                                   "settings": spec.settings, "seed": spec.seed}),
                       str(staging / _GAME_FILE)]
            made = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
            if made.returncode != 0:
                reason = made.stderr.strip().splitlines()[-1] if made.stderr.strip() else f"exit code {made.returncode}"
                raise RuntimeError(f"TextWorld could not make the {spec.challenge} game {spec.settings} seed "
                                   f"{spec.seed}: {reason}")
            staging.rename(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return game


def _make(spec: GameSpec, path: Path) -> None:
    """Make one game with TextWorld's generator (run in the child interpreter `ensure_game` starts)."""
    import textworld
    import textworld.challenges
    from textworld.generator import compile_game

    _, make, _ = textworld.challenges.CHALLENGES[spec.challenge]
    options = textworld.GameOptions()
    options.seeds = spec.seed
    options.path = str(path)
    options.force_recompile = True
    compile_game(make(settings=dict(spec.settings), options=options), options)
    path.with_suffix(".ni").unlink(missing_ok=True)  # the Inform 7 source; playing needs only .z8 and .json


# --- Reading TextWorld's text ------------------------------------------------------------------------------------

_END = re.compile(r"\*\*\* (?:The End|You lost!) \*\*\*")


def _tidy(text: str) -> str:
    """TextWorld's text without its blank lines, padding and input prompt.

    The prompt is a line starting with ">", followed by the Z-machine's status bar (room name and score/moves).
    """
    return "\n".join(line.strip() for line in text.splitlines() if line.strip() and not line.startswith(">"))


def first_observation(feedback: str, objective: str) -> str:
    """The opening text from the objective on: TextWorld prints an ASCII-art banner before it."""
    start = feedback.find(objective)
    return _tidy(feedback[start:] if start >= 0 else feedback)


def step_observation(feedback: str) -> str:
    """A step's answer, ending at "*** The End ***" / "*** You lost! ***" (the game's restart menu follows)."""
    end = _END.search(feedback)
    return _tidy(feedback[:end.end()] if end else feedback)


# --- The session -------------------------------------------------------------------------------------------------


class TextWorldSession:
    """A GameSession playing generated games of one family; the game's Z-machine runs in this process."""

    def __init__(self, family: TextWorldFamily) -> None:
        self.family = family
        self._env: textworld.Environment | None = None
        self._loaded: Path | None = None
        self._state: dict[str, Any] | None = None
        self._done = False
        self._closed = False

    def _infos(self) -> textworld.EnvInfos:
        from textworld import EnvInfos

        return EnvInfos(admissible_commands=True, objective=True, feedback=True, score=True, max_score=True,
                        won=True, lost=True, extras=["walkthrough"])

    def reset(self, task: Task) -> str:
        import textworld

        if self._closed:
            raise RuntimeError("the session is closed")
        game = self.family.game_file(task)
        with warnings.catch_warnings():
            # jericho warns that it cannot read scores from TextWorld's games; TextWorld's wrappers read them instead.
            warnings.filterwarnings("ignore", message=".*is not fully supported", module="jericho")
            if self._env is None:
                self._env = textworld.start(str(game), self._infos())
            elif game != self._loaded:
                self._env.load(str(game))
        self._loaded = game
        self._state = self._env.reset()
        self._done = False
        return self._with_commands(first_observation(self._state["feedback"], self._state["objective"]))

    def step(self, action: str) -> StepResult:
        if self._env is None or self._state is None or self._done:
            raise RuntimeError("step() needs a running game: call reset(task) first")
        before = self.score
        self._state, _, done = self._env.step(action)
        self._done = bool(done)
        observation = step_observation(self._state["feedback"])
        return StepResult(observation=observation if self._done else self._with_commands(observation),
                          reward=self.score - before, done=self._done, won=bool(self._state["won"]), score=self.score)

    @property
    def score(self) -> float:
        assert self._state is not None
        return min(max(self._state["score"] / self._state["max_score"], 0.0), 1.0)

    def admissible_commands(self) -> list[str]:
        if self._state is None:
            raise RuntimeError("admissible_commands() needs a game: call reset(task) first")
        return list(self._state["admissible_commands"])

    def walkthrough(self) -> list[str]:
        """The generator's winning command sequence for the loaded game."""
        if self._state is None:
            raise RuntimeError("walkthrough() needs a game: call reset(task) first")
        return list(self._state["extra.walkthrough"])

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._closed = True

    def _with_commands(self, text: str) -> str:
        if not self.family.options.show_admissible_commands:
            return text
        return f"{text}\nAdmissible commands: {', '.join(self.admissible_commands())}."


# --- The families ------------------------------------------------------------------------------------------------

_VERB = re.compile(r"(\w+) (.+?)(?: (?:from|with|into|on|in) (.+))?")  # "take latchkey from pan" -> take, latchkey, pan


class TextWorldFamily(EnvFamily):
    """One TextWorld challenge; subclasses give its settings, prompt and the reasons their expert states."""

    challenge: ClassVar[str]
    has_expert = True
    noop_action = "look"
    # Reasons by command ("take coin") or verb ("go"); {x} is the object, {y} the container or tool.
    thinks: ClassVar[dict[str, str]] = {
        "go": "I go {x}.",
        "open": "I open the {x}.",
        "close": "I close the {x}.",
        "unlock": "I unlock the {x} with the {y}.",
        "take": "I take the {x}.",
        "drop": "I drop the {x}.",
        "examine": "I examine the {x}.",
        "inventory": "I check what I am carrying.",
        "look": "I look around.",
    }

    def __init__(self, env: EnvConfig) -> None:
        super().__init__(env)
        self.options: TextWorldOptions = env.textworld

    @classmethod
    def availability(cls, env: EnvConfig) -> Availability:
        if importlib.util.find_spec("textworld") is None:
            return Availability(Status.NOT_INSTALLED, "the textworld package is not installed", _INSTALL)
        version = importlib.metadata.version("textworld")
        if version != TEXTWORLD_VERSION:
            return Availability(Status.NOT_INSTALLED, f"textworld {version} is installed; dypo pins "
                                f"{TEXTWORLD_VERSION} because generated games differ across versions", _INSTALL)
        return Availability(Status.AVAILABLE, f"textworld {version}; games generated offline into "
                            f"{cls.games_root(env.textworld) / f'textworld-{TEXTWORLD_VERSION}'} on first use")

    @staticmethod
    def games_root(options: TextWorldOptions) -> Path:
        return Path(options.games_dir) if options.games_dir is not None else cache_dir()

    def settings(self, split: str) -> dict[str, Any]:
        """The challenge's settings for a split's games (only cooking's depend on the split)."""
        raise NotImplementedError

    def spec(self, split: str, index: int) -> GameSpec:
        return GameSpec(self.challenge, self.settings(split), FIRST_SEED[split] + index)

    def task_count(self, split: str) -> int:
        if split not in self.splits():
            raise ValueError(f"{self.name} has no split {split!r}; its splits are {', '.join(self.splits())}")
        return self.options.train_games if split == TRAIN else self.options.heldout_games

    def make_tasks(self, split: str, count: int, start: int = 0) -> list[Task]:
        self.check_split(split, count, start)
        return [Task(task_id=f"{self.name}/{split}/{index:06d}", family=self.name,
                     task_type=self.spec(split, index).settings_key, split=split,
                     seed=FIRST_SEED[split] + index)
                for index in range(start, start + count)]

    def game_file(self, task: Task) -> Path:
        """The task's game, made first if it is not cached."""
        if task.family != self.name or task.split not in FIRST_SEED:
            raise ValueError(f"task {task.task_id} ({task.family}/{task.split}) is not a {self.name} task")
        index = task.seed - FIRST_SEED[task.split]
        self.check_split(task.split, 1, index)
        return ensure_game(self.games_root(self.options), self.spec(task.split, index), task.split)

    def open_session(self) -> TextWorldSession:
        return TextWorldSession(self)

    def think(self, command: str) -> str:
        verb, x, y = command, "", ""
        if parsed := _VERB.fullmatch(command):
            verb, x, y = parsed.group(1), parsed.group(2), parsed.group(3) or ""
        template = self.thinks.get(command) or self.thinks.get(verb) or f"Next I {command}."
        return template.format(x=x, y=y)

    def expert_turns(self, task: Task, session: GameSession) -> list[ExpertTurn]:
        """The game's walkthrough, played through `session`; raises unless it wins."""
        if not isinstance(session, TextWorldSession) or session.family.env != self.env:
            raise ValueError(f"the {self.name} expert needs a TextWorld session built for the same env config")
        observation = session.reset(task)
        turns: list[ExpertTurn] = []
        for command in session.walkthrough():
            turns.append(ExpertTurn(observation, self.think(command), command))
            result = session.step(command)
            if result.done:
                if not result.won:
                    raise RuntimeError(f"the walkthrough of {task.task_id} lost at turn {len(turns)} ({command!r})")
                return turns
            observation = result.observation
        raise RuntimeError(f"the walkthrough of {task.task_id} ended after {len(turns)} turns without a win")


class CoinFamily(TextWorldFamily):
    name = "textworld-coin"
    challenge = "tw-coin_collector"
    description = "TextWorld coin collector: follow the rooms the task names and take the coin"
    default_system_prompt = format_prompt(
        "Find the coin and take it; the task tells you which way to go. Commands: go north, go south, go east, "
        "go west, take coin, look, inventory.")
    thinks: ClassVar[dict[str, str]] = {
        **TextWorldFamily.thinks,
        "go": "The coin is further on; the task says to go {x}.",
        "take coin": "The coin is here, so I take it.",
    }

    def settings(self, split: str) -> dict[str, Any]:
        return {"level": self.options.coin_level}


class TreasureFamily(TextWorldFamily):
    name = "textworld-treasure"
    challenge = "tw-treasure_hunter"
    description = "TextWorld treasure hunter: find the object the task names in a house of rooms and take it"
    default_system_prompt = format_prompt(
        "Find the object the task names and take it; doors and containers may be closed or locked, and a locked "
        "one opens with its key. Commands: go DIRECTION, open X, close X, unlock X with KEY, take X, "
        "take X from Y, examine X, look, inventory.")
    thinks: ClassVar[dict[str, str]] = {
        **TextWorldFamily.thinks,
        "go": "I follow the task's directions and go {x}.",
        "take": "The task asks for the {x}, so I take it from the {y}.",
        "open": "The {x} is closed; I open it.",
        "unlock": "The {x} is locked; I unlock it with the {y}.",
    }

    def settings(self, split: str) -> dict[str, Any]:
        return {"level": self.options.treasure_level}

    def think(self, command: str) -> str:
        if command.startswith("take ") and " from " not in command:
            return f"The task asks for the {command.removeprefix('take ')}, so I take it."
        return super().think(command)


_COOKING_HELDOUT = {"unseen": "test", "seen": "train"}  # env.textworld.cooking_heldout_foods -> TextWorld's split
_COOK_VERB = {"oven": "roast", "stove": "fry", "BBQ": "grill"}  # TextWorld's cooking tools and what they do


class CookingFamily(TextWorldFamily):
    name = "textworld-cooking"
    challenge = "tw-cooking"
    description = "TextWorld cooking: read the cookbook, gather and prepare the ingredients, cook the meal and eat it"
    default_system_prompt = format_prompt(
        "Find the cookbook in the kitchen and read it, gather the ingredients of its recipe, prepare them as it "
        "says, then prepare the meal and eat it. Commands: go DIRECTION, open X, take X, take X from Y, drop X, "
        "examine X, slice/dice/chop X with knife, cook X with oven/stove/BBQ, prepare meal, eat meal, inventory, "
        "look.")
    thinks: ClassVar[dict[str, str]] = {
        **TextWorldFamily.thinks,
        "examine cookbook": "I read the cookbook to learn the recipe.",
        "take": "The recipe needs the {x}, so I take it.",
        "take knife": "I take the knife to cut ingredients.",
        "drop knife": "I put the knife down to free my hands.",
        "open": "I open the {x} to look inside.",
        "slice": "The recipe says to slice the {x}.",
        "dice": "The recipe says to dice the {x}.",
        "chop": "The recipe says to chop the {x}.",
        "prepare meal": "Every ingredient is ready, so I prepare the meal.",
        "eat meal": "The meal is ready, so I eat it.",
    }

    def settings(self, split: str) -> dict[str, Any]:
        options = self.options
        return {"recipe": options.cooking_recipe, "take": options.cooking_take, "go": options.cooking_rooms,
                "open": options.cooking_open, "cook": options.cooking_cook, "cut": options.cooking_cut,
                "drop": options.cooking_drop, "recipe_seed": 0,
                "split": "train" if split == TRAIN else _COOKING_HELDOUT[options.cooking_heldout_foods]}

    def think(self, command: str) -> str:
        if command == "take knife" or command.startswith("take knife from "):
            return self.thinks["take knife"]
        if (parsed := _VERB.fullmatch(command)) and parsed.group(1) == "cook":
            food, tool = parsed.group(2), parsed.group(3) or ""
            return f"The recipe says to {_COOK_VERB.get(tool, 'cook')} the {food}; I use the {tool}."
        return super().think(command)


if __name__ == "__main__":
    _spec = json.loads(sys.argv[1])
    _make(GameSpec(_spec["challenge"], _spec["settings"], _spec["seed"]), Path(sys.argv[2]))
