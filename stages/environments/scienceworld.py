"""ScienceWorld as an environment family: its 30 science tasks (boil water, test conductivity, grow a plant, …).

Tasks and splits. Each ScienceWorld task has numbered variations (other substances, rooms, animals, …), split by
ScienceWorld itself into train, dev and test variations. Our `train` split plays its train variations, `heldout`
its dev variations (what the training loop evaluates and selects checkpoints on) and `test` its test variations,
kept for a final report. A split deals the tasks of `env.scienceworld.task_names` round-robin (boil 0, melt 0, …,
boil 1, melt 1, …, tasks with fewer variations dropping out), so any prefix of it covers the tasks evenly. A task
id names split, task and variation: `scienceworld/train/boil/0003`; `task_type` is the task's name, so evaluation
reports success per task. Listing a split's variations needs the engine, so the counts of the pinned version are
written down here (`VARIATIONS`) and a test checks them against the engine.

Scores. ScienceWorld scores a game from 0 to 100 as the agent completes the task's stages, and ends it at 100
(won) or when the agent does something that makes the task impossible, e.g. focusing on the wrong thing (the score
becomes -100: lost, score 0 here). We report the score over 100, clipped to [0, 1].

Speed. ScienceWorld's Python `step` also renders the room, the inventory, the task and the list of valid
commands after every action (200-400 ms); the session needs none of them and calls the engine's own step (20-40
ms). Starting the engine's JVM takes ~2-4 s and loading a task 0.3-0.5 s (the first load ~7 s), so a session
keeps its JVM and reloads only when the task or variation changes.

Admissible commands. ScienceWorld's list of valid commands holds 400-900 canonical forms, yet the game accepts
many it does not list (half of the gold actions of a boil game, e.g. "open door to kitchen"), so treating it as
the admissible set would reject correct actions: `admissible_commands()` returns None, and the prompt lists the
command templates instead. "reset task" (which would restart the game inside an episode) is refused.

Expert. ScienceWorld generates a gold action sequence per variation; the expert plays it until the game is won
(the sequence often has a few trailing actions, which are dropped), with a short reason per command, and raises
unless the game is won.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
from typing import TYPE_CHECKING

from dypo.stages.config import EnvConfig, ScienceWorldOptions
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
    from scienceworld import ScienceWorldEnv

SCIENCEWORLD_VERSION = "1.2.3"
_INSTALL = f"pip install scienceworld=={SCIENCEWORLD_VERSION}"
TEST = "test"
SPLITS = (TRAIN, HELDOUT, TEST)
# ScienceWorld 1.2.3's variations per task: (train, dev, test). Each split is a contiguous run of variation
# numbers, train first: boil's train variations are 0-13, its dev variations 14-20, its test variations 21-29.
VARIATIONS: dict[str, tuple[int, int, int]] = {
    "boil": (14, 7, 9),
    "change-the-state-of-matter-of": (14, 7, 9),
    "chemistry-mix": (16, 8, 8),
    "chemistry-mix-paint-secondary-color": (18, 9, 9),
    "chemistry-mix-paint-tertiary-color": (18, 9, 9),
    "find-animal": (150, 75, 75),
    "find-living-thing": (150, 75, 75),
    "find-non-living-thing": (150, 75, 75),
    "find-plant": (150, 75, 75),
    "freeze": (14, 7, 9),
    "grow-fruit": (62, 31, 33),
    "grow-plant": (62, 31, 33),
    "identify-life-stages-1": (6, 3, 5),
    "identify-life-stages-2": (4, 2, 4),
    "inclined-plane-determine-angle": (84, 42, 42),
    "inclined-plane-friction-named-surfaces": (692, 346, 348),
    "inclined-plane-friction-unnamed-surfaces": (80, 40, 42),
    "lifespan-longest-lived": (62, 31, 32),
    "lifespan-longest-lived-then-shortest-lived": (62, 31, 32),
    "lifespan-shortest-lived": (62, 31, 32),
    "measure-melting-point-known-substance": (218, 109, 109),
    "measure-melting-point-unknown-substance": (150, 75, 75),
    "melt": (14, 7, 9),
    "mendelian-genetics-known-plant": (60, 30, 30),
    "mendelian-genetics-unknown-plant": (240, 120, 120),
    "power-component": (10, 5, 5),
    "power-component-renewable-vs-nonrenewable-energy": (10, 5, 5),
    "test-conductivity": (450, 225, 225),
    "test-conductivity-of-unknown-substances": (300, 150, 150),
    "use-thermometer": (270, 135, 135),
}
# ScienceWorld ends a game after this many steps; our episodes are cut by env.max_turns, so it is out of reach.
_STEP_LIMIT = 1_000_000
_JVM_EXIT_TIMEOUT_S = 5.0
_REFUSED = {"reset task": "That command is not available here: an episode cannot restart its game."}


def variation_range(task_name: str, split: str) -> range:
    """The variation numbers of a task in one of our splits."""
    train, dev, test = VARIATIONS[task_name]
    return {TRAIN: range(0, train), HELDOUT: range(train, train + dev), TEST: range(train + dev, train + dev + test)}[
        split]


def _tidy(text: str) -> str:
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())


class ScienceWorldSession:
    """A GameSession backed by one ScienceWorld JVM; it reloads only when the task or variation changes."""

    def __init__(self, family: ScienceWorldFamily) -> None:
        from scienceworld import ScienceWorldEnv

        self.family = family
        self._env: ScienceWorldEnv = ScienceWorldEnv("", envStepLimit=_STEP_LIMIT)
        self._loaded: tuple[str, int, bool] | None = None  # task name, variation, gold path generated
        self._task: Task | None = None
        self._score = 0  # ScienceWorld's own score, -100 or 0-100
        self._done = False

    @property
    def engine(self) -> ScienceWorldEnv:
        """ScienceWorld's own Python environment, for what the protocol does not cover (listing variations)."""
        return self._env

    def _start(self, task: Task, gold_path: bool) -> str:
        name, variation = self.family.task_game(task)
        wanted = (name, variation, gold_path)
        if self._loaded is None or self._loaded[:2] != wanted[:2] or (gold_path and not self._loaded[2]):
            self._env.load(name, variation, self.family.simplifications, generateGoldPath=gold_path)
            self._loaded = wanted
        look, _ = self._env.reset()
        self._task, self._score, self._done = task, 0, False
        description = self._env.taskdescription().strip().removeprefix("Task Description:")
        return _tidy(f"{description}\n{look}")

    def reset(self, task: Task) -> str:
        return self._start(task, gold_path=False)

    def reset_with_gold_path(self, task: Task) -> tuple[str, list[str]]:
        """`reset`, plus ScienceWorld's gold action sequence for the variation (generated on demand)."""
        observation = self._start(task, gold_path=True)
        return observation, list(self._env.get_gold_action_sequence())

    def step(self, action: str) -> StepResult:
        if self._task is None or self._done:
            raise RuntimeError("step() needs a running game: call reset(task) first")
        before = self.score
        if action.strip().lower() in _REFUSED:
            return StepResult(_REFUSED[action.strip().lower()], 0.0, False, False, before)
        server = self._env.server
        observation = server.step(action)
        self._score = round(100 * server.getScore())
        self._done = bool(server.getCompleted()) or self._score < 0
        return StepResult(observation=_tidy(observation), reward=self.score - before, done=self._done,
                          won=self._score >= 100, score=self.score)

    @property
    def score(self) -> float:
        return min(max(self._score / 100, 0.0), 1.0)

    def admissible_commands(self) -> None:
        """None: ScienceWorld accepts many commands its list of valid ones leaves out (see the module docstring)."""
        return None

    def close(self) -> None:
        """Shut the JVM down and wait for it to exit, killing it if it does not; a crashed JVM is already gone."""
        from py4j.protocol import Py4JError

        process = self._env._gateway.java_process
        with contextlib.suppress(Py4JError, OSError):
            self._env.close()
        try:
            process.wait(timeout=_JVM_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# Reasons for the expert's commands, first matching pattern wins; {0}, {1} are the pattern's groups.
_THINKS: list[tuple[re.Pattern[str], str]] = [(re.compile(pattern), think) for pattern, think in (
    (r"look around", "I look around to see what is here."),
    (r"inventory", "I check what I am carrying."),
    (r"task", "I reread the task."),
    (r"wait1?", "I wait for the process to go on."),
    (r"\d+", "The game asks which one I mean; I choose option {0}."),
    (r"(open|close) door to (.+)", "I {0} the door to the {1}."),
    (r"go to (.+)", "I go to the {0}."),
    (r"teleport to (.+)", "I teleport to the {0}."),
    (r"focus on (.+)", "I focus on the {0}, the thing this task is about."),
    (r"pick up (.+)", "I pick up the {0}; I will need it."),
    (r"put down (.+)", "I put down the {0}."),
    (r"look at (.+)", "I look at the {0} more closely."),
    (r"look in (.+)", "I look in the {0}."),
    (r"move (.+) to (.+)", "I move the {0} to the {1}."),
    (r"pour (.+) in (.+)", "I pour the {0} into the {1}."),
    (r"dunk (.+) in (.+)", "I dunk the {0} in the {1}."),
    (r"connect (.+) to (.+)", "I connect the {0} to the {1}."),
    (r"disconnect (.+)", "I disconnect the {0}."),
    (r"use (.+) on (.+)", "I use the {0} on the {1}."),
    (r"activate (.+)", "I switch on the {0}."),
    (r"deactivate (.+)", "I switch off the {0}."),
    (r"(open|close|read|eat|flush|mix|examine) (.+)", "I {0} the {1}."),
)]


def expert_think(command: str) -> str:
    """A short truthful reason for a gold command ("pick up thermometer" -> "I pick up the thermometer; …")."""
    for pattern, think in _THINKS:
        if match := pattern.fullmatch(command):
            return think.format(*match.groups(), command)
    return f"Next I {command}."


class ScienceWorldFamily(EnvFamily):
    name = "scienceworld"
    description = "ScienceWorld: 30 elementary science tasks (boil, melt, circuits, genetics, …) in a simulated house"
    default_system_prompt = format_prompt(
        "You are in a simulated house with a kitchen, workshop, greenhouse and more, and must complete the science "
        "task the game states. When the task says to focus on something, focus only on that exact thing: focusing "
        "on anything else fails the task. Commands: look around, look at X, look in X, go to PLACE, open X, close X, "
        "pick up X, put down X, move X to Y, pour X in Y, dunk X in Y, mix X, activate X, deactivate X, connect X to "
        "Y, disconnect X, use X on Y, read X, eat X, flush X, focus on X, inventory, task, wait, wait1. When the game "
        "asks which of several things you mean, answer with its number.")
    has_expert = True
    noop_action = "look around"

    def __init__(self, env: EnvConfig) -> None:
        super().__init__(env)
        self.options: ScienceWorldOptions = env.scienceworld

    @classmethod
    def availability(cls, env: EnvConfig) -> Availability:
        if importlib.util.find_spec("scienceworld") is None:
            return Availability(Status.NOT_INSTALLED, "the scienceworld package is not installed", _INSTALL)
        version = importlib.metadata.version("scienceworld")
        if version != SCIENCEWORLD_VERSION:
            return Availability(Status.NOT_INSTALLED, f"scienceworld {version} is installed; dypo pins "
                                f"{SCIENCEWORLD_VERSION}, whose task variations it splits", _INSTALL)
        java = shutil.which("java")
        if java is None:
            return Availability(Status.NOT_INSTALLED, "ScienceWorld runs on Java and no `java` is on PATH",
                                "install a Java runtime >= 11, e.g. apt-get install default-jre-headless")
        return Availability(Status.AVAILABLE, f"scienceworld {version}, java at {java}; "
                            f"{len(env.scienceworld.task_names)} tasks")

    @property
    def simplifications(self) -> str:
        return ",".join(self.options.simplifications)

    def splits(self) -> tuple[str, ...]:
        return SPLITS

    def task_count(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"{self.name} has no split {split!r}; its splits are {', '.join(SPLITS)}")
        return sum(len(variation_range(name, split)) for name in self.options.task_names)

    def make_tasks(self, split: str, count: int, start: int = 0) -> list[Task]:
        self.check_split(split, count, start)
        tasks: list[Task] = []
        ranges = {name: variation_range(name, split) for name in self.options.task_names}
        position = 0  # index in the split of the next task dealt
        for depth in range(max(len(variations) for variations in ranges.values())):
            for name, variations in ranges.items():
                if depth >= len(variations):
                    continue
                if position >= start:
                    variation = variations[depth]
                    tasks.append(Task(task_id=f"{self.name}/{split}/{name}/{variation:04d}", family=self.name,
                                      task_type=name, split=split, seed=variation))
                    if len(tasks) == count:
                        return tasks
                position += 1
        return tasks

    def task_game(self, task: Task) -> tuple[str, int]:
        """The ScienceWorld task name and variation a task plays."""
        prefix = f"{self.name}/{task.split}/{task.task_type}/"
        if (task.family != self.name or task.split not in SPLITS or task.task_type not in VARIATIONS
                or not task.task_id.startswith(prefix) or task.seed not in variation_range(task.task_type, task.split)):
            raise ValueError(f"task {task.task_id} ({task.family}/{task.split}) is not a {self.name} task")
        return task.task_type, task.seed

    def open_session(self) -> ScienceWorldSession:
        return ScienceWorldSession(self)

    def expert_turns(self, task: Task, session: GameSession) -> list[ExpertTurn]:
        """ScienceWorld's gold action sequence, played until the game is won; raises unless it is."""
        if not isinstance(session, ScienceWorldSession) or session.family.env != self.env:
            raise ValueError(f"the {self.name} expert needs a ScienceWorld session built for the same env config")
        observation, gold = session.reset_with_gold_path(task)
        turns: list[ExpertTurn] = []
        for command in gold:
            turns.append(ExpertTurn(observation, expert_think(command), command))
            result = session.step(command)
            if result.done:
                if not result.won:
                    raise RuntimeError(f"ScienceWorld's gold path lost {task.task_id} at turn {len(turns)} "
                                       f"({command!r})")
                return turns
            observation = result.observation
        raise RuntimeError(f"ScienceWorld's gold path of {task.task_id} ended after {len(turns)} turns without a win")
