"""The environment protocol (DESIGN.md §5): what the rollout engine, the warmstart and `dypo envs` need of a game.

An environment family (TextWorldExpress coin, ALFWorld, WebShop, …) is one `EnvFamily` subclass in one module,
registered by name in `families.py`, with its options in one section of `EnvConfig`. A family says which tasks
exist (deterministic per split and index, so groups and auxiliary draws are reproducible), opens game sessions,
and, when it can, plays an expert. Sessions are opened inside worker processes (`pool.py`), so a family's code
may block, crash or leak without taking the rollout down with it: the pool turns that into an `EnvError` or
`EnvTimeout` that costs one episode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, NamedTuple, Protocol

from dypo.stages.config import EnvConfig
from dypo.stages.trajectory import Task
from dypo.stages.turn_format import render_turn

TRAIN, HELDOUT = "train", "heldout"  # every family has these two splits, disjoint by construction


class EnvError(RuntimeError):
    """The game engine failed (crashed, hung up or threw); the episode is lost, not the run."""

    termination = "env_error"


class EnvTimeout(EnvError):
    """The game engine did not answer within the configured time; its worker was killed."""

    termination = "env_timeout"


class StepResult(NamedTuple):
    observation: str  # the action's feedback as the model will read it
    reward: float  # change of the normalized score caused by this step
    done: bool  # the game ended (won or lost)
    won: bool  # the game's task was completed
    score: float  # the game's score so far, normalized to [0, 1]


class GameSession(Protocol):
    """One live game. A session is reused: `reset` starts any task of its family afresh."""

    def reset(self, task: Task) -> str:
        """Start `task` and return the initial observation: the task description and what the agent sees."""
        ...

    def step(self, action: str) -> StepResult:
        """Send one command to the game, verbatim."""
        ...

    def admissible_commands(self) -> list[str] | None:
        """The commands the game would accept now, or None for games that do not say."""
        ...

    def close(self) -> None:
        """Release the engine (a JVM, a server connection); the session is unusable afterwards."""
        ...


@dataclass(frozen=True)
class ExpertTurn:
    observation: str  # what the agent saw before acting
    think: str
    action: str


class Status(StrEnum):
    AVAILABLE = "available"
    NOT_INSTALLED = "not installed"
    NEEDS_DATA = "needs data"
    NEEDS_SERVER = "needs server"


@dataclass(frozen=True)
class Availability:
    status: Status
    detail: str  # what was found, or what is missing
    enable: str = ""  # how to make the family available (a command, a setting); empty when it is


def format_prompt(task: str) -> str:
    """A family's default system prompt: what the game asks for, then the turn format the rollout engine parses."""
    return (f"You are playing a text game. {task} Each turn, reason briefly, then give exactly one command, in this "
            f"form:\n{render_turn('your reasoning', 'your command')}\nThen you will see what happened.")


class EnvFamily(ABC):
    """A family of games: its tasks, its sessions, its expert and its default prompt.

    Instances are cheap and hold only the config; anything heavy (an engine, a data index) belongs in sessions
    or is loaded lazily, because families are built in the parent process and again in every worker.
    """

    name: ClassVar[str]  # the `env.family` value that selects this family
    description: ClassVar[str]  # one line for `dypo envs list`
    default_system_prompt: ClassVar[str]  # the task and the turn format, as the model reads it
    has_expert: ClassVar[bool] = False
    noop_action: ClassVar[str] = "look"  # a command that changes nothing, sent after a malformed turn if configured

    def __init__(self, env: EnvConfig) -> None:
        self.env = env

    @classmethod
    @abstractmethod
    def availability(cls, env: EnvConfig) -> Availability:
        """Whether this family can run here, checked without starting an engine; the detail says how to fix it."""

    def splits(self) -> tuple[str, ...]:
        """The task splits; `train` and `heldout` always, others (e.g. ALFWorld's unseen rooms) as the family has."""
        return (TRAIN, HELDOUT)

    @abstractmethod
    def task_count(self, split: str) -> int:
        """How many distinct tasks a split holds."""

    @abstractmethod
    def make_tasks(self, split: str, count: int, start: int = 0) -> list[Task]:
        """Tasks `start` … `start + count - 1` of a split's fixed sequence.

        Deterministic, and task i differs from every task j != i of the split, so callers give auxiliary draws
        fresh tasks by advancing `start`. Asking past the split's end is an error, never a silent repeat.
        """

    @abstractmethod
    def open_session(self) -> GameSession:
        """A new game session; called inside a worker process."""

    def expert_turns(self, task: Task, session: GameSession) -> list[ExpertTurn]:
        """A winning expert episode of `task`, played through `session` (which runs in the same worker).

        Raises if the expert does not win, so expert data is never a failed game.
        """
        raise NotImplementedError(f"{self.name} has no expert; warmstart needs a family with one")

    def check_split(self, split: str, count: int, start: int) -> None:
        """The error every `make_tasks` raises for a request outside the split."""
        if split not in self.splits():
            raise ValueError(f"{self.name} has no split {split!r}; its splits are {', '.join(self.splits())}")
        if count < 0 or start < 0:
            raise ValueError(f"count and start must be >= 0, got count={count}, start={start}")
        available = self.task_count(split)
        if start + count > available:
            raise ValueError(f"the {split} split has {available} {self.name} games; tasks {start}..{start + count - 1} "
                             "were asked for")

