"""ALFWorld on its real engine (TextWorld's PDDL engine with ALFWorld's domain, grammar and naming), two families.

- `alfworld` plays the official games: the directory `alfworld-download` fills (json_2.1.1/<split>/<task>/<trial>/
  with game.tw-pddl and traj_data.json), found through `env.alfworld.data_dir` or ALFWORLD_DATA. Our splits are
  ALFWorld's: train, heldout = valid_seen (in-distribution evaluation), unseen = valid_unseen (rooms never trained
  on). Games are kept as `AlfredTWEnv` keeps them: solvable, of the selected task types, no movable-receptacle or
  sliced trials. A task id names the trial: `alfworld/heldout/pick_heat_then_place_in_recep-Egg-None-Fridge-1/
  trial_T20190906_…`.
- `alfworld-generated` plays games made on this machine from what the package ships (`alfworld_games`), so ALFWorld
  runs without the download, in tests and in the demo. Same splits: train and heldout play ALFRED's training rooms,
  unseen its test rooms. A game is made, verified and cached the first time a session needs it, identically on every
  machine; its id names split, type and index: `alfworld-generated/train/pick_two_obj_and_place/00012`.

Both families order a split by dealing the task types round-robin, so any prefix of it (a rollout draw, an
evaluation budget) covers the six types evenly, and `task_type` is ALFWorld's type, so evaluation reports success
per type.

Observations are ALFWorld's own text without its welcome banner. The first one states the task before the room,
so that when the rollout engine cuts a long room description to `env.max_observation_chars` (and flags the cut)
the task survives. ALFWorld agents are usually shown the admissible commands; `env.alfworld.show_admissible_commands`
appends them to every observation. It is off by default because the list (40-80 commands in a kitchen) outweighs
everything else in a small context; `admissible_commands()` always returns it, and the rollout engine checks actions
against it.

The expert plays the walkthrough written from the task's structure (`alfworld_games.write_walkthrough`), with a
short reason per command, for official and generated games alike.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from abc import abstractmethod
from pathlib import Path
from typing import Any

from dypo.stages.config import AlfworldOptions, EnvConfig
from dypo.stages.context import cache_dir
from dypo.stages.environments.alfworld_games import (
    ALFWORLD_VERSION,
    TEXTWORLD_VERSION,
    Engine,
    Step,
    ensure_game,
    game_seed,
    generated_root,
    installed_versions,
    write_walkthrough,
)
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

UNSEEN = "unseen"
SPLITS = (TRAIN, HELDOUT, UNSEEN)
OFFICIAL_SPLITS = {TRAIN: "train", HELDOUT: "valid_seen", UNSEEN: "valid_unseen"}  # ours -> the download's
OFFICIAL_DATA = "json_2.1.1"
_BANNER = "-= Welcome to TextWorld, ALFRED! =-"
_INSTALL = f"pip install alfworld=={ALFWORLD_VERSION} textworld=={TEXTWORLD_VERSION}"
_DOWNLOAD = (f"on a machine with internet access: {_INSTALL} && alfworld-download; copy the directory it fills "
             "(~/.cache/alfworld) here and point ALFWORLD_DATA or env.alfworld.data_dir at it")

PROMPT = format_prompt(
    "You are in a household room and must do the task the game states, such as putting a clean apple in the "
    "fridge. Commands: go to X, open X, close X, take X from Y, move X to Y, heat X with Y, cool X with Y, "
    "clean X with Y, use X, examine X, inventory, look.")


class MissingDataError(FileNotFoundError):
    """The official ALFWorld games are not where the config or ALFWORLD_DATA points."""


def _interleave(by_type: dict[str, list[Any]]) -> list[Any]:
    """The items of every type dealt round-robin in type order: a0 b0 c0 a1 b1 c1 …, shorter types dropping out."""
    dealt = []
    for position in range(max((len(items) for items in by_type.values()), default=0)):
        dealt += [items[position] for items in by_type.values() if position < len(items)]
    return dealt


# --- The session -------------------------------------------------------------------------------------------------


class AlfworldSession:
    """One ALFWorld engine in a worker process; `reset` loads the task's game unless it is the one loaded."""

    def __init__(self, family: AlfworldFamily) -> None:
        self.family = family
        self.engine = Engine()
        self._loaded: Path | None = None
        self._traj_data: dict[str, Any] = {}
        self._state: dict[str, Any] | None = None
        self._done = False
        self._closed = False

    def reset(self, task: Task) -> str:
        if self._closed:
            raise RuntimeError("the session is closed")
        path = self.family.game_file(task, self.engine)
        if path != self._loaded:
            self.engine.load(json.loads(path.read_text()))
            self._traj_data = json.loads((path.parent / "traj_data.json").read_text())
            self._loaded = path
        self._state = self.engine.reset()
        self._done = False
        room, _, task_line = self._state["feedback"].removeprefix(_BANNER).strip().rpartition("\n\n")
        return self._with_commands("\n".join(part for part in (task_line, room.strip()) if part))

    def step(self, action: str) -> StepResult:
        if self._state is None or self._done:
            raise RuntimeError("step() needs a running game: call reset(task) first")
        self._state = self.engine.step(action)
        won = bool(self._state["won"])
        self._done = won
        return StepResult(observation=self._with_commands(self._state["feedback"].strip()), reward=float(won),
                          done=won, won=won, score=float(won))

    def admissible_commands(self) -> list[str]:
        if self._state is None:
            raise RuntimeError("admissible_commands() needs a game: call reset(task) first")
        return list(self._state["admissible_commands"])

    def walkthrough(self) -> list[Step]:
        """The expert's commands (with reasons) for the loaded game, from its PDDL facts and its traj_data."""
        if self.engine.game is None:
            raise RuntimeError("walkthrough() needs a game: call reset(task) first")
        return write_walkthrough(self.engine.game["pddl_problem"], self._traj_data["task_type"],
                                 self._traj_data["pddl_params"], self.engine.names())

    def close(self) -> None:
        """The engine holds no process or connection; its Fast Downward library copy goes with the worker."""
        self._closed = True

    def _with_commands(self, text: str) -> str:
        if not self.family.options.show_admissible_commands:
            return text
        return f"{text}\nAdmissible commands: {', '.join(self.admissible_commands())}."


# --- The families ------------------------------------------------------------------------------------------------


class AlfworldFamily(EnvFamily):
    """What both ALFWorld families share: the engine, the splits, the prompt, the expert and the version pin."""

    default_system_prompt = PROMPT
    has_expert = True
    noop_action = "look"

    def __init__(self, env: EnvConfig) -> None:
        super().__init__(env)
        self.options: AlfworldOptions = env.alfworld

    @classmethod
    def availability(cls, env: EnvConfig) -> Availability:
        versions = installed_versions()
        pinned = {"alfworld": ALFWORLD_VERSION, "textworld": TEXTWORLD_VERSION}
        for package, version in pinned.items():
            if versions[package] is None:
                return Availability(Status.NOT_INSTALLED, f"the {package} package is not installed", _INSTALL)
            if versions[package] != version:
                return Availability(Status.NOT_INSTALLED, f"{package} {versions[package]} is installed; dypo pins "
                                    f"{version} because ALFWorld results drift across versions", _INSTALL)
        if importlib.util.find_spec("fast_downward") is None:
            return Availability(Status.NOT_INSTALLED, "fast-downward-textworld (ALFWorld's PDDL engine) is missing",
                                _INSTALL)
        return cls.data_availability(env)

    @classmethod
    @abstractmethod
    def data_availability(cls, env: EnvConfig) -> Availability:
        """The family's own check once the packages are right."""

    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def task_count(self, split: str) -> int:
        return len(self._sequence(split))

    def make_tasks(self, split: str, count: int, start: int = 0) -> list[Task]:
        self.check_split(split, count, start)
        return self._sequence(split)[start:start + count]

    def open_session(self) -> AlfworldSession:
        return AlfworldSession(self)

    def expert_turns(self, task: Task, session: GameSession) -> list[ExpertTurn]:
        """The walkthrough written from the task's structure, played through the real game; raises unless it wins."""
        if not isinstance(session, AlfworldSession) or session.family.env != self.env:
            raise ValueError(f"the {self.name} expert needs an ALFWorld session built for the same env config")
        observation = session.reset(task)
        turns: list[ExpertTurn] = []
        result = None
        for step in session.walkthrough():
            turns.append(ExpertTurn(observation, step.think, step.command))
            result = session.step(step.command)
            observation = result.observation
        if result is None or not result.won:
            raise RuntimeError(f"the expert walkthrough of {task.task_id} did not win ({len(turns)} steps)")
        return turns

    @abstractmethod
    def _sequence(self, split: str) -> list[Task]:
        """Every task of a split, in its fixed order."""

    @abstractmethod
    def game_file(self, task: Task, engine: Engine) -> Path:
        """The game.tw-pddl of a task of this family (made first if the family makes its games)."""

    def _check_task(self, task: Task) -> str:
        """The task's id after "<family>/<split>/", once it is known to be a task of this family."""
        prefix = f"{self.name}/{task.split}/"
        if task.family != self.name or task.split not in SPLITS or not task.task_id.startswith(prefix):
            raise ValueError(f"task {task.task_id} ({task.family}/{task.split}) is not a {self.name} task")
        return task.task_id.removeprefix(prefix)


class GeneratedFamily(AlfworldFamily):
    """ALFWorld games generated offline from the package's layouts, made and cached on first use."""

    name = "alfworld-generated"
    description = "ALFWorld household tasks, games generated offline from the alfworld package's scene layouts"

    @classmethod
    def data_availability(cls, env: EnvConfig) -> Availability:
        return Availability(Status.AVAILABLE, f"alfworld {ALFWORLD_VERSION}; games generated offline into "
                            f"{cls.games_root(env.alfworld)} on first use")

    @staticmethod
    def games_root(options: AlfworldOptions) -> Path:
        cache = Path(options.games_dir) if options.games_dir is not None else cache_dir()
        return generated_root(cache, options.generation_seed)

    def games_per_type(self, split: str) -> int:
        return {TRAIN: self.options.train_games_per_type, HELDOUT: self.options.heldout_games_per_type,
                UNSEEN: self.options.unseen_games_per_type}[split]

    def _sequence(self, split: str) -> list[Task]:
        if split not in SPLITS:
            raise ValueError(f"{self.name} has no split {split!r}; its splits are {', '.join(SPLITS)}")
        return _generated_sequence(self.name, split, tuple(self.options.task_types), self.games_per_type(split),
                                   self.options.generation_seed)

    def game_file(self, task: Task, engine: Engine) -> Path:
        task_type, _, index = self._check_task(task).partition("/")
        if task_type != task.task_type or not index.isdigit():
            raise ValueError(f"task {task.task_id} does not name a task type and index")
        if task.seed != game_seed(self.options.generation_seed, task.split, task_type, int(index)):
            raise ValueError(f"task {task.task_id} has seed {task.seed}, which is not the seed of that game under "
                             f"env.alfworld.generation_seed={self.options.generation_seed}")
        return ensure_game(self.games_root(self.options), task.split, task_type, int(index), task.seed, engine)


@functools.cache
def _generated_sequence(family: str, split: str, task_types: tuple[str, ...], per_type: int,
                        generation_seed: int) -> list[Task]:
    by_type = {task_type: [Task(task_id=f"{family}/{split}/{task_type}/{index:05d}", family=family,
                                task_type=task_type, split=split,
                                seed=game_seed(generation_seed, split, task_type, index))
                           for index in range(per_type)]
               for task_type in task_types}
    return _interleave(by_type)


class OfficialFamily(AlfworldFamily):
    """ALFWorld's official games, from the directory `alfworld-download` filled."""

    name = "alfworld"
    description = "ALFWorld household tasks, the official games (needs alfworld-download's data, ALFWORLD_DATA)"

    @staticmethod
    def data_root(options: AlfworldOptions) -> Path | None:
        value = options.data_dir if options.data_dir is not None else os.environ.get("ALFWORLD_DATA")
        return Path(value).expanduser() if value else None

    @classmethod
    def data_availability(cls, env: EnvConfig) -> Availability:
        try:
            directories = [cls.split_dir(env.alfworld, split) for split in SPLITS]
        except MissingDataError as error:
            return Availability(Status.NEEDS_DATA, str(error), _DOWNLOAD)
        return Availability(Status.AVAILABLE, f"official games under {directories[0].parent}")

    @classmethod
    def split_dir(cls, options: AlfworldOptions, split: str) -> Path:
        """The download's directory of one of our splits; raises MissingDataError saying what is missing."""
        root = cls.data_root(options)
        if root is None:
            raise MissingDataError("the official ALFWorld games are not configured: ALFWORLD_DATA is unset and "
                                   "env.alfworld.data_dir is empty")
        directory = root / OFFICIAL_DATA / OFFICIAL_SPLITS[split]
        if not directory.is_dir():
            raise MissingDataError(f"{directory} does not exist: {root} is not a directory alfworld-download "
                                   f"filled (it needs {OFFICIAL_DATA}/train, valid_seen and valid_unseen)")
        return directory

    def _sequence(self, split: str) -> list[Task]:
        if split not in SPLITS:
            raise ValueError(f"{self.name} has no split {split!r}; its splits are {', '.join(SPLITS)}")
        directory = self.split_dir(self.options, split)
        games = _official_games(directory, tuple(self.options.task_types))
        if not games:
            raise MissingDataError(f"{directory} holds no solvable games of the task types "
                                   f"{', '.join(self.options.task_types)}; is the download complete?")
        by_type: dict[str, list[Task]] = {task_type: [] for task_type in self.options.task_types}
        for trial, task_type in games:
            by_type[task_type].append(Task(task_id=f"{self.name}/{split}/{trial}", family=self.name,
                                           task_type=task_type, split=split, seed=len(by_type[task_type])))
        return _interleave(by_type)

    def game_file(self, task: Task, engine: Engine) -> Path:
        path = self.split_dir(self.options, task.split) / self._check_task(task) / "game.tw-pddl"
        if not path.is_file():
            raise MissingDataError(f"{path} does not exist; task {task.task_id} is not in this ALFWorld download")
        return path


@functools.cache
def _official_games(directory: Path, task_types: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(trial path relative to the split directory, task type) of every playable game, sorted by path.

    The same selection `AlfredTWEnv.collect_game_files` makes: a traj_data.json of a selected type beside a
    game.tw-pddl marked solvable, not in a movable-receptacle or sliced trial.
    """
    games = []
    for traj_path in sorted(directory.glob("*/*/traj_data.json")):
        trial = traj_path.parent
        relative = trial.relative_to(directory).as_posix()
        if "movable" in relative or "Sliced" in relative or not (trial / "game.tw-pddl").is_file():
            continue
        task_type = json.loads(traj_path.read_text())["task_type"]
        if task_type in task_types and json.loads((trial / "game.tw-pddl").read_text()).get("solvable"):
            games.append((relative, task_type))
    return tuple(games)
