"""The environment layer: TextWorldExpress "coin" games behind one small session protocol (DESIGN.md §5).

In a coin game the agent starts in the kitchen of a small house and must find a coin somewhere in its rooms and
take it; taking it wins (score 1) and ends the game. Games are generated from integer seeds, and
TextWorldExpress (TWX) splits the seeds into folds: train 0-999, dev 10000-10999, test 20000-20999. Our "train"
tasks draw train-fold seeds and "heldout" tasks test-fold seeds, so the two sets are disjoint by construction.

Each TWX instance is its own JVM (~0.5 s to start, 65-95 MB) holding one game; resetting it to another seed
takes about a millisecond. So sessions live in an `EnvPool` and are reused across episodes, not started per episode.
A JVM that fails raises `EnvError`, which costs the episode, and the pool replaces that session.

Observations are made compact for a tiny policy with a short context. TWX describes a room in prose with filler
("In one part of the room you see a …"); we keep what the prose says but not the filler, and when the text is
longer than `env.max_observation_chars` we drop furniture from the end of the list, never the room, the coin
or the exits, and say how many things were left out. The admissible-commands list is never put in the text (it
would dominate the context); callers get it from `admissible_commands()`.

Expert demonstrations for the warm start come from a deterministic explorer played through the real game (see
the last section for why not from TWX's own walkthroughs).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple, Protocol, TypeVar

from py4j.protocol import Py4JError
from textworld_express import TextWorldExpressEnv

from dypo.stages.config import EnvConfig
from dypo.stages.trajectory import Task

GAME = "coin"
_FOLD_SEEDS = {"train": range(0, 1000), "heldout": range(20000, 21000)}  # TWX's train and test folds
_TWX_FOLD = {"train": "train", "heldout": "test"}
# TWX ends a game after this many steps. Our episodes are cut by env.max_turns in the rollout engine, so the
# game's own limit is set out of reach: `done` then means the game really ended.
_TWX_STEP_LIMIT = 100_000
_JVM_EXIT_TIMEOUT_S = 5.0

T = TypeVar("T")


class EnvError(RuntimeError):
    """The game engine failed (its JVM crashed, hung up or threw); the episode is lost, not the run."""


class StepResult(NamedTuple):
    observation: str  # the action's feedback and the room the agent is now in, compacted
    reward: float  # change of the normalized score caused by this step
    done: bool  # the game ended (for coin: the coin was taken)
    won: bool  # the game's task was completed
    score: float  # the game's score so far, normalized to [0, 1]


class GameSession(Protocol):
    """One live game. A session is reused: `reset` starts any task afresh."""

    def reset(self, task: Task) -> str:
        """Start `task` and return the initial observation: the task description and what the agent sees."""
        ...

    def step(self, action: str) -> StepResult:
        """Send one command to the game, verbatim."""
        ...

    def admissible_commands(self) -> list[str] | None:
        """The commands the game would accept now, or None for games that do not say."""
        ...


def game_params(env: EnvConfig) -> str:
    """The TWX generation parameters of the configured game, e.g. "numLocations=4,includeDoors=1,…"."""
    return (f"numLocations={env.num_locations},includeDoors={int(env.include_doors)},"
            f"numDistractorItems={env.num_distractor_items}")


def task_count(env: EnvConfig, split: Literal["train", "heldout"]) -> int:
    """How many distinct tasks a split holds."""
    return len(_FOLD_SEEDS[split])


def make_tasks(env: EnvConfig, split: Literal["train", "heldout"], count: int, start: int = 0) -> list[Task]:
    """Tasks `start` … `start + count - 1` of a split's fixed seed sequence.

    Deterministic, and task i differs from every task j != i of the same split, so callers give auxiliary draws
    fresh tasks by advancing `start`. The fold is finite (1000 games each); asking past its end is an error
    rather than a silent repeat, because repeated held-out tasks would bias evaluation.
    """
    seeds = _FOLD_SEEDS[split]
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be >= 0, got count={count}, start={start}")
    if start + count > len(seeds):
        raise ValueError(f"the {split} split has {len(seeds)} {env.family} games; tasks {start}..{start + count - 1} "
                         "were asked for")
    return [Task(task_id=f"{env.family}/{split}/{seed:06d}", family=env.family, task_type=GAME, split=split,
                 seed=seed)
            for seed in seeds[start:start + count]]


# --- Reading TWX's room descriptions ---------------------------------------------------------------------------
#
# A TWX "look" text is one paragraph about the room and one line of exits, e.g.
#   "You are in the kitchen. In one part of the room you see a stove. There is also a coin. \n"
#   "To the North you see a closed plain door. Through an open screen door, to the West you see the backyard. "

_SENTENCE_END = re.compile(r"(?<=\.)\s+")
_LOCATION = re.compile(r"You are in the (.+)\.")
_THING = re.compile(r"(?:In one part of the room you see|In another part of the room you see|There is also|"
                    r"You also see) (.+)\.")
_EXIT_TO_ROOM = re.compile(r"(?:Through an open .+, to|To) the (North|South|East|West) you see the (.+)\.")
_EXIT_CLOSED = re.compile(r"To the (North|South|East|West) you see a closed .+\.")
_EMPTY = re.compile(r"an? (.+), that has nothing on it")
_CLOSED = re.compile(r"an? (.+) that is closed")
_COIN = "a coin"


@dataclass(frozen=True)
class _Room:
    location: str  # "kitchen"
    things: tuple[str, ...]  # "a stove", "a closed fridge", "an empty counter", "a coin", in TWX's order
    exits: tuple[str, ...]  # TWX's exit sentences, verbatim
    neighbours: dict[str, str | None]  # "north" -> "pantry", or None behind a closed door


def _short(thing: str) -> str:
    """The same description in fewer words: "a fridge that is closed" -> "a closed fridge"."""
    if empty := _EMPTY.fullmatch(thing):
        return f"an empty {empty.group(1)}"
    if closed := _CLOSED.fullmatch(thing):
        return f"a closed {closed.group(1)}"
    return thing


def _parse_room(look: str) -> _Room | None:
    """The structure of a TWX look text, or None if it is not shaped as expected (then it is used verbatim)."""
    body, _, exit_line = look.partition("\n")
    sentences = _SENTENCE_END.split(body.strip())
    location = _LOCATION.fullmatch(sentences[0])
    things = [_THING.fullmatch(sentence) for sentence in sentences[1:]]
    exits = [sentence for sentence in _SENTENCE_END.split(exit_line.strip()) if sentence]
    neighbours: dict[str, str | None] = {}
    for sentence in exits:
        if to_room := _EXIT_TO_ROOM.fullmatch(sentence):
            neighbours[to_room.group(1).lower()] = to_room.group(2)
        elif closed := _EXIT_CLOSED.fullmatch(sentence):
            neighbours[closed.group(1).lower()] = None
        else:
            return None
    if location is None or None in things:
        return None
    return _Room(location.group(1), tuple(_short(thing.group(1)) for thing in things), tuple(exits), neighbours)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _render(head: str | None, room: _Room, shown: list[str], hidden: int) -> str:
    room_line = f"You are in the {room.location}."
    listed = list(shown)
    if hidden:
        listed.append(f"{hidden} more not shown" if shown else f"{hidden} things not shown")
    if listed:
        room_line += " You see: " + "; ".join(listed) + "."
    lines = [head, room_line, " ".join(room.exits)]
    return "\n".join(line for line in lines if line)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def compact_observation(head: str | None, look: str, limit: int) -> str:
    """`head` (task description or action feedback) over the room description, in at most `limit` characters.

    The head, the room's name, the coin and the exits are what the task turns on, so they are kept; other
    things are dropped from the end of the list as needed, with a count of how many. Only when even the kept
    parts exceed the limit is the text cut, marked by a trailing "…".
    """
    head = _one_line(head) if head else None
    room = _parse_room(look)
    if room is None:
        return _cut("\n".join(part for part in (head, _one_line(look)) if part), limit)
    optional = [index for index, thing in enumerate(room.things) if thing != _COIN]
    for keep in range(len(optional), -1, -1):
        dropped = set(optional[keep:])
        shown = [thing for index, thing in enumerate(room.things) if index not in dropped]
        text = _render(head, room, shown, len(dropped))
        if len(text) <= limit:
            return text
    return _cut(text, limit)


# --- Sessions and the pool -------------------------------------------------------------------------------------


class TwxSession:
    """A GameSession backed by one TWX JVM, loaded once with the configured game parameters."""

    def __init__(self, env: EnvConfig) -> None:
        self.env = env
        self.broken = False  # set when the JVM failed; the pool then replaces this session
        self._twx = TextWorldExpressEnv(envStepLimit=_TWX_STEP_LIMIT)
        try:
            self._twx.load(GAME, game_params(env))
        except ValueError as error:  # TWX's own limits, e.g. at most 11 locations and 10 distractor items
            self.close()
            raise ValueError(f"env config not playable by TextWorldExpress {GAME}: {error}") from None
        self._task: Task | None = None
        self._info: dict[str, Any] = {}
        self._done = False

    @property
    def jvm_pid(self) -> int:
        """The process id of this session's JVM (for memory accounting and crash diagnosis)."""
        return self._twx._gateway.java_process.pid

    @property
    def look(self) -> str:
        """TWX's full description of the room the agent is in now, uncompacted."""
        return self._info["look"]

    def _guarded(self, what: str, call: Callable[[], T]) -> T:
        """Run a call into the JVM, turning its failures into EnvError and marking the session broken."""
        try:
            return call()
        except Py4JError as error:
            self.broken = True
            task = self._task.task_id if self._task else "no task"
            raise EnvError(f"TextWorldExpress failed during {what} ({task}): {error}") from error

    def reset(self, task: Task) -> str:
        if task.family != self.env.family or task.task_type != GAME or task.split not in _TWX_FOLD:
            raise ValueError(f"task {task.task_id} ({task.family}/{task.task_type}/{task.split}) is not a "
                             f"{self.env.family} task")
        self._task = task
        _, self._info = self._guarded("reset", lambda: self._twx.reset(seed=task.seed, gameFold=_TWX_FOLD[task.split]))
        self._done = False
        return compact_observation(self._info["taskDescription"], self.look, self.env.max_observation_chars)

    def step(self, action: str) -> StepResult:
        if self._task is None or self._done:
            raise RuntimeError("step() needs a running game: call reset(task) first")
        feedback, reward, done, self._info = self._guarded(f"step {action!r}", lambda: self._twx.step(action))
        self._done = done
        # After a move or "look around" the feedback is the room description itself; do not say it twice.
        head = None if feedback == self.look else feedback
        return StepResult(
            observation=compact_observation(head, self.look, self.env.max_observation_chars),
            reward=float(reward),
            done=bool(done),
            won=bool(self._info["tasksuccess"]),
            score=min(max(float(self._info["score"]), 0.0), 1.0),
        )

    def admissible_commands(self) -> list[str]:
        if self._task is None:
            raise RuntimeError("admissible_commands() needs a game: call reset(task) first")
        return sorted(self._info["validActions"])  # TWX lists them in no stable order

    def close(self) -> None:
        """Shut the JVM down and wait for it to exit (it takes ~20 ms), killing it if it does not.

        Waiting also keeps TWX's own finalizer quiet: it writes to the JVM's stdin unless the process is gone.
        A crashed JVM is already gone, which is fine.
        """
        process = self._twx._gateway.java_process
        with contextlib.suppress(Py4JError, OSError):
            self._twx.close()
        try:
            process.wait(timeout=_JVM_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class EnvPool:
    """Up to `size` TWX sessions, started on first use and reused across calls; close() stops their JVMs."""

    def __init__(self, env: EnvConfig, size: int) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.env = env
        self.size = size
        self._sessions: list[TwxSession] = []
        self._closed = False

    def sessions(self, n: int) -> list[GameSession]:
        """`n` live sessions; sessions whose JVM failed are replaced by fresh ones."""
        if self._closed:
            raise RuntimeError("the pool is closed")
        if not 0 <= n <= self.size:
            raise ValueError(f"asked for {n} sessions from a pool of size {self.size}")
        for index, session in enumerate(self._sessions[:n]):
            if session.broken:
                session.close()
                self._sessions[index] = TwxSession(self.env)
        while len(self._sessions) < n:
            self._sessions.append(TwxSession(self.env))
        return list(self._sessions[:n])

    def close(self) -> None:
        for session in self._sessions:
            session.close()
        self._sessions.clear()
        self._closed = True

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


# --- Expert demonstrations --------------------------------------------------------------------------------------
#
# TWX ships a gold walkthrough per game, but it is a random walk drawn afresh at every reset: the same game's
# walkthrough took 8, 12, 10, 8, 14 and 26 steps on six resets, pacing between rooms already seen. Expert data
# built from it would change from run to run (and with it the tokenizer trained on that text) and would teach
# dithering for which no truthful reasoning exists. So the expert is a deterministic explorer that sees only what
# the agent sees: take the coin when it is in view, otherwise open or walk through the first exit (north, south,
# east, west) to a room not yet visited, otherwise walk back toward the nearest room that has such an exit.


@dataclass(frozen=True)
class ExpertTurn:
    observation: str  # what the agent saw before acting
    think: str
    action: str


_DIRECTIONS = ("north", "south", "east", "west")
_OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
# The explorer wins the largest coin games (11 rooms) in at most ~35 steps; far more means it is broken.
_EXPERT_STEP_CAP = 200


def _learn(known: dict[str, dict[str, str | None]], room: _Room) -> None:
    """Record the exits of the room the agent is in; an open way into a known room is known from both sides."""
    known[room.location] = dict(room.neighbours)
    for direction, neighbour in room.neighbours.items():
        if neighbour in known:
            known[neighbour][_OPPOSITE[direction]] = room.location


def _unexplored(known: dict[str, dict[str, str | None]], location: str) -> list[str]:
    """Directions from a visited room that lead behind a closed door or into a room not yet visited."""
    exits = known[location]
    return [d for d in _DIRECTIONS if d in exits and (exits[d] is None or exits[d] not in known)]


def _way_back(known: dict[str, dict[str, str | None]], start: str) -> str | None:
    """The first direction of a shortest walk through visited rooms to one with an unexplored exit."""
    first_step: dict[str, str] = {}  # visited room -> the direction to leave `start` by to reach it
    queue = [start]
    for location in queue:
        if location != start and _unexplored(known, location):
            return first_step[location]
        for direction in _DIRECTIONS:
            neighbour = known[location].get(direction)
            if neighbour in known and neighbour != start and neighbour not in first_step:
                first_step[neighbour] = first_step.get(location, direction)
                queue.append(neighbour)
    return None


def _expert_step(known: dict[str, dict[str, str | None]], room: _Room) -> tuple[str, str]:
    """The explorer's (think, action) in `room`; the think states the fact the choice rests on."""
    if _COIN in room.things:
        return "The coin is here, so I take it.", "take coin"
    if options := _unexplored(known, room.location):
        direction = options[0]
        if room.neighbours[direction] is None:
            return f"No coin here. I open the closed door to the {direction}.", f"open door to {direction}"
        return f"No coin here. The {room.neighbours[direction]} to the {direction} is unexplored.", f"move {direction}"
    direction = _way_back(known, room.location)
    if direction is None:
        raise RuntimeError(f"every room reachable from the {room.location} was explored and no coin was found")
    return f"No coin here. I go back {direction} to the {room.neighbours[direction]}.", f"move {direction}"


def expert_turns(env: EnvConfig, task: Task, session: GameSession) -> list[ExpertTurn]:
    """A winning expert episode of `task`, played by the deterministic explorer through the real game.

    Raises if the game is not won, so expert data is never a failed game. The episode is not cut at
    `env.max_turns`: in larger houses the explorer can need more turns (4 rooms: at most 8; 5 rooms: 10% of games
    take 11-12), and whether such demonstrations are useful is the caller's decision.
    """
    if not isinstance(session, TwxSession) or session.env != env:
        raise ValueError("expert_turns needs a TextWorldExpress session built for the same env config")
    observation = session.reset(task)
    known: dict[str, dict[str, str | None]] = {}
    turns: list[ExpertTurn] = []
    for _ in range(_EXPERT_STEP_CAP):
        room = _parse_room(session.look)
        if room is None:
            raise RuntimeError(f"cannot read the room description of {task.task_id}: {session.look!r}")
        _learn(known, room)
        think, action = _expert_step(known, room)
        turns.append(ExpertTurn(observation, think, action))
        result = session.step(action)
        if result.done:
            if not result.won:
                raise RuntimeError(f"the expert lost {task.task_id} at turn {len(turns)} ({action!r})")
            return turns
        observation = result.observation
    raise RuntimeError(f"the expert did not win {task.task_id} within {_EXPERT_STEP_CAP} steps")
