"""TextWorldExpress (TWX) games as environment families: coin, cookingworld, twc, mapreader, sorting, arithmetic.

TWX generates its games from integer seeds and splits the seeds into folds: train 0-999, dev 10000-10999, test
20000-20999, for every game. Our `train` tasks draw train-fold seeds and `heldout` tasks test-fold seeds, so the
two sets are disjoint by construction. A task id names family, split and seed: `twx-coin/train/000123`.

Each `TextWorldExpressEnv` is its own JVM (~0.5 s to start, ~85 MB) holding one game; resetting it to another
seed takes about a millisecond. So a session loads its game once and is reset for every episode, and sessions
live in the worker processes of an `EnvPool`, reused across episodes.

Observations. TWX describes a room in prose with filler ("In one part of the room you see a …"); we keep what
the prose says without the filler, and never put the admissible-commands list in the text (it would dominate the
context; callers get it from `admissible_commands()`). Coin, the embedded default for a tiny policy with a short
context, shows the room after every action and drops furniture from the end of the list to fit
`env.max_observation_chars`, never the room, the coin or the exits. The other games show what TWX answers (the
room after a move or a look, otherwise the action's feedback, e.g. a recipe or a map) and leave any cut to the
rollout engine, which flags it, because which thing matters there (an ingredient, the box) depends on the task.

Experts. TWX ships a gold walkthrough per game. For cookingworld, mapreader, sorting and arithmetic it is
deterministic per seed (identical across resets and JVMs; 60 of 60 seeds checked, each replayed to a win), and the
expert replays it, minus opening look/task commands (the first observation already holds room and task), steps
straight back and forth, and commands the game does not admit at that point (cookingworld's walkthrough opens
containers that are open already). For twc the walkthrough is redrawn at every reset (it picks the order of rooms
at random), so twc expert episodes differ between runs although every one wins. For coin the walkthrough is a
random walk (8-26 steps for one game on six resets) that would teach dithering, so the coin expert is a
deterministic explorer that sees only what the agent sees.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from dypo.stages.config import EnvConfig
from dypo.stages.environments.protocol import (
    HELDOUT,
    TRAIN,
    Availability,
    EnvError,
    EnvFamily,
    ExpertTurn,
    GameSession,
    Status,
    StepResult,
    format_prompt,
)
from dypo.stages.trajectory import Task

if TYPE_CHECKING:
    from textworld_express import TextWorldExpressEnv

_FOLDS = {TRAIN: ("train", range(0, 1000)), HELDOUT: ("test", range(20000, 21000))}  # ours -> TWX's fold and seeds
# TWX ends a game after this many steps. Our episodes are cut by env.max_turns in the rollout engine, so the
# game's own limit is set out of reach: `done` then means the game really ended.
_TWX_STEP_LIMIT = 100_000
_JVM_EXIT_TIMEOUT_S = 5.0
_SUPPORTED_VERSION = "1.1."  # 1.1's camelCase API; 1.0 spelled the methods differently
_PARAMETERS = {"num_locations": "numLocations", "include_doors": "includeDoors",
               "num_distractor_items": "numDistractorItems"}  # env.twx option -> TWX generation parameter

T = TypeVar("T")


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


def _tidy(text: str) -> str:
    """Feedback without TWX's indentation, trailing spaces and blank lines; line breaks (a map, a recipe) stay."""
    return "\n".join(line.strip() for line in text.strip().splitlines() if line.strip())


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

    The head, the room's name, the coin and the exits are what the coin task turns on, so they are kept; other
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


def describe(text: str) -> str:
    """A TWX answer as the agent reads it: a room description compacted with nothing left out, other text tidied."""
    room = _parse_room(text)
    return _tidy(text) if room is None else _render(None, room, list(room.things), 0)


# --- The session: one JVM in a worker process --------------------------------------------------------------------


class TwxSession:
    """A GameSession backed by one TWX JVM, loaded once with its family's game and generation parameters."""

    def __init__(self, family: TwxFamily) -> None:
        from py4j.protocol import Py4JJavaError
        from textworld_express import TextWorldExpressEnv

        self.family = family
        self._twx: TextWorldExpressEnv = TextWorldExpressEnv(envStepLimit=_TWX_STEP_LIMIT)
        params = family.game_params()
        try:
            self._twx.load(family.game, params)
            # Some limits (e.g. mapreader's distances) are checked only when a game is generated: try one now, so
            # an unplayable config fails here rather than as an env_error in every episode.
            self._twx.reset(seed=_FOLDS[TRAIN][1][0], gameFold=_FOLDS[TRAIN][0])
        except (ValueError, Py4JJavaError) as error:
            reason = error.java_exception.getMessage() if isinstance(error, Py4JJavaError) else str(error)
            self.close()
            raise ValueError(f"env.twx options not playable by TextWorldExpress {family.game} "
                             f"({params or 'its defaults'}): {reason.strip()}") from None
        self._task: Task | None = None
        self._info: dict[str, Any] = {}
        self._done = False

    @property
    def look(self) -> str:
        """TWX's full description of the room the agent is in now, uncompacted."""
        return self._info["look"]

    def _guarded(self, what: str, call: Callable[[], T]) -> T:
        """Run a call into the JVM, turning its failures into EnvError."""
        from py4j.protocol import Py4JError

        try:
            return call()
        except Py4JError as error:
            task = self._task.task_id if self._task else "no task"
            raise EnvError(f"TextWorldExpress failed during {what} ({task}): {error}") from error

    def _start(self, task: Task, walkthrough: bool) -> str:
        if task.family != self.family.name or task.split not in _FOLDS:
            raise ValueError(f"task {task.task_id} ({task.family}/{task.split}) is not a {self.family.name} task")
        self._task = task
        _, self._info = self._guarded("reset", lambda: self._twx.reset(
            seed=task.seed, gameFold=_FOLDS[task.split][0], generateGoldPath=walkthrough))
        self._done = False
        return self.family.first_observation(self._info["taskDescription"], self.look)

    def reset(self, task: Task) -> str:
        return self._start(task, walkthrough=False)

    def reset_with_walkthrough(self, task: Task) -> tuple[str, list[str]]:
        """`reset`, plus TWX's gold action sequence for the game (generating it costs a little, so only on demand)."""
        observation = self._start(task, walkthrough=True)
        return observation, self._guarded("walkthrough", self._twx.getGoldActionSequence)

    def step(self, action: str) -> StepResult:
        if self._task is None or self._done:
            raise RuntimeError("step() needs a running game: call reset(task) first")
        feedback, reward, done, self._info = self._guarded(f"step {action!r}", lambda: self._twx.step(action))
        self._done = done
        return StepResult(
            observation=self.family.next_observation(feedback, self.look),
            reward=float(reward),
            done=bool(done),
            won=bool(self._info["tasksuccess"]),
            score=min(max(float(self._info["score"]), 0.0), 1.0),  # a failed sorting game scores -1
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
        from py4j.protocol import Py4JError

        process = self._twx._gateway.java_process
        with contextlib.suppress(Py4JError, OSError):
            self._twx.close()
        try:
            process.wait(timeout=_JVM_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- The families ------------------------------------------------------------------------------------------------


class TwxFamily(EnvFamily):
    """One TWX game. Subclasses name the game, the `env.twx` options it takes, its prompt and its expert."""

    game: ClassVar[str]  # TWX's name of the game
    options: ClassVar[tuple[str, ...]] = ()  # the env.twx options this game has
    defaults: ClassVar[dict[str, int]] = {}  # our values for options left unset; others are TWX's defaults
    noop_action = "look around"
    has_expert = True

    def __init__(self, env: EnvConfig) -> None:
        super().__init__(env)
        unknown = [name for name, value in env.twx if value is not None and name not in self.options]
        if unknown:
            has = ", ".join(f"env.twx.{name}" for name in self.options) or "none"
            raise ValueError(f"env.twx.{unknown[0]} does not apply to {self.name} (its options: {has}); remove it")

    @classmethod
    def availability(cls, env: EnvConfig) -> Availability:
        if importlib.util.find_spec("textworld_express") is None:
            return Availability(Status.NOT_INSTALLED, "the textworld-express package is not installed",
                                "pip install 'textworld-express>=1.1,<1.2'")
        version = importlib.metadata.version("textworld-express")
        if not version.startswith(_SUPPORTED_VERSION):
            return Availability(Status.NOT_INSTALLED, f"textworld-express {version} is installed; dypo drives the "
                                "1.1 API", "pip install 'textworld-express>=1.1,<1.2'")
        java = shutil.which("java")
        if java is None:
            return Availability(Status.NOT_INSTALLED, "TextWorldExpress runs on Java and no `java` is on PATH",
                                "install a Java runtime >= 11, e.g. apt-get install default-jre-headless")
        return Availability(Status.AVAILABLE, f"textworld-express {version}, java at {java}; games from seeds")

    def game_params(self) -> str:
        """TWX's generation parameters for the configured game, e.g. "numLocations=4,includeDoors=1,…"."""
        values = {**self.defaults, **{name: value for name, value in self.env.twx if value is not None}}
        return ",".join(f"{_PARAMETERS[name]}={int(value)}" for name, value in values.items())

    def _fold(self, split: str) -> range:
        if split not in _FOLDS:
            raise ValueError(f"{self.name} has no split {split!r}; its splits are {', '.join(self.splits())}")
        return _FOLDS[split][1]

    def task_count(self, split: str) -> int:
        return len(self._fold(split))

    def make_tasks(self, split: str, count: int, start: int = 0) -> list[Task]:
        self.check_split(split, count, start)
        return [Task(task_id=f"{self.name}/{split}/{seed:06d}", family=self.name, task_type=self.game, split=split,
                     seed=seed)
                for seed in self._fold(split)[start:start + count]]

    def open_session(self) -> TwxSession:
        return TwxSession(self)

    def first_observation(self, task_description: str, look: str) -> str:
        """What the agent reads at the start: the task, then the room."""
        return f"{_one_line(task_description)}\n{describe(look)}"

    def next_observation(self, feedback: str, look: str) -> str:
        """What the agent reads after an action: TWX's answer (the new room after a move)."""
        return describe(feedback)

    def _session(self, session: GameSession) -> TwxSession:
        if not isinstance(session, TwxSession) or session.family.env != self.env:
            raise ValueError(f"the {self.name} expert needs a TextWorldExpress session built for the same env config")
        return session


# --- Coin: the deterministic explorer ----------------------------------------------------------------------------
#
# The explorer takes the coin when it is in view, otherwise opens or walks through the first exit (north, south,
# east, west) to a room not yet visited, otherwise walks back toward the nearest room that has such an exit.

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


def _explorer_step(known: dict[str, dict[str, str | None]], room: _Room) -> tuple[str, str]:
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


class CoinFamily(TwxFamily):
    name = "twx-coin"
    game = "coin"
    description = "TextWorldExpress coin: find the coin in a small house and take it"
    default_system_prompt = format_prompt("Find the coin somewhere in the house and take it.")
    options = ("num_locations", "include_doors", "num_distractor_items")
    defaults: ClassVar[dict[str, int]] = {"num_locations": 4, "include_doors": True, "num_distractor_items": 0}

    def first_observation(self, task_description: str, look: str) -> str:
        return compact_observation(task_description, look, self.env.max_observation_chars)

    def next_observation(self, feedback: str, look: str) -> str:
        # After a move or "look around" the feedback is the room description itself; do not say it twice.
        return compact_observation(None if feedback == look else feedback, look, self.env.max_observation_chars)

    def expert_turns(self, task: Task, session: GameSession) -> list[ExpertTurn]:
        """A winning episode of the deterministic explorer, played through the real game.

        The episode is not cut at `env.max_turns`: in larger houses the explorer can need more turns (4 rooms: at
        most 8; 5 rooms: 10% of games take 11-12), and whether such demonstrations are useful is the caller's call.
        """
        twx = self._session(session)
        observation = twx.reset(task)
        known: dict[str, dict[str, str | None]] = {}
        turns: list[ExpertTurn] = []
        for _ in range(_EXPERT_STEP_CAP):
            room = _parse_room(twx.look)
            if room is None:
                raise RuntimeError(f"cannot read the room description of {task.task_id}: {twx.look!r}")
            _learn(known, room)
            think, action = _explorer_step(known, room)
            turns.append(ExpertTurn(observation, think, action))
            result = twx.step(action)
            if result.done:
                if not result.won:
                    raise RuntimeError(f"the expert lost {task.task_id} at turn {len(turns)} ({action!r})")
                return turns
            observation = result.observation
        raise RuntimeError(f"the expert did not win {task.task_id} within {_EXPERT_STEP_CAP} steps")


# --- The other games: replayed walkthroughs ----------------------------------------------------------------------

_PUT = re.compile(r"(put|cook) (.+) in (.+)")  # "put 2 bananas in box", "cook red hot pepper in oven"
_VERB = re.compile(r"(open door to|\w+) (.+)")  # "take knife", "move north", "open door to west"
_FIRST_LOOK = ("look around", "task")  # commands that only repeat what the first observation says


def _without_detours(walkthrough: list[str]) -> list[str]:
    """The walkthrough without its opening look/task commands and without steps straight back and forth.

    A move followed at once by the opposite move changes nothing (TWX's rooms connect both ways), so the pair
    goes; removing one can expose another. Whether the shorter sequence still wins is checked by playing it.
    """
    start = 0
    while start < len(walkthrough) and walkthrough[start] in _FIRST_LOOK:
        start += 1
    kept: list[str] = []
    for action in walkthrough[start:]:
        if kept and kept[-1].startswith("move ") and action == f"move {_OPPOSITE.get(kept[-1][5:], '')}":
            kept.pop()
        else:
            kept.append(action)
    return kept


class WalkthroughFamily(TwxFamily):
    """A TWX game whose expert replays the game's own gold walkthrough, with a short truthful think per action."""

    # Thinks by action ("take cookbook") or verb ("take"); {x} is the object, {y} the container or tool.
    thinks: ClassVar[dict[str, str]] = {
        "move": "I go {x}.",
        "open door to": "I open the door to the {x}.",
        "open": "I open the {x} to see inside.",
        "close": "I close the {x} again.",
        "read": "I read the {x}.",
        "take": "I take the {x}.",
        "put": "I put the {x} in the {y}.",
    }

    def think(self, action: str) -> str:
        if put := _PUT.fullmatch(action):
            verb, x, y = put.groups()
        elif verb_and_object := _VERB.fullmatch(action):
            (verb, x), y = verb_and_object.groups(), ""
        else:
            verb, x, y = action, "", ""
        template = self.thinks.get(action) or self.thinks.get(verb) or f"Next I {action}."
        return template.format(x=x, y=y)

    def expert_turns(self, task: Task, session: GameSession) -> list[ExpertTurn]:
        twx = self._session(session)
        observation, walkthrough = twx.reset_with_walkthrough(task)
        turns: list[ExpertTurn] = []
        for action in _without_detours(walkthrough):
            if action not in twx.admissible_commands():  # e.g. opening what is open already: a no-op in TWX
                continue
            turns.append(ExpertTurn(observation, self.think(action), action))
            result = twx.step(action)
            if result.done:
                if not result.won:
                    raise RuntimeError(f"TWX's walkthrough lost {task.task_id} at turn {len(turns)} ({action!r})")
                return turns
            observation = result.observation
        raise RuntimeError(f"TWX's walkthrough of {task.task_id} ended after {len(turns)} turns without a win")


class CookingWorldFamily(WalkthroughFamily):
    name = "twx-cookingworld"
    game = "cookingworld"
    description = "TextWorldExpress cookingworld: gather ingredients, follow the cookbook's recipe, eat the meal"
    default_system_prompt = format_prompt(
        "Find the cookbook in the kitchen, gather the ingredients of its recipe, prepare them as it says, then "
        "prepare the meal and eat it.")
    options = ("num_locations", "include_doors", "num_distractor_items")
    thinks: ClassVar[dict[str, str]] = {
        **WalkthroughFamily.thinks,
        "take cookbook": "I take the cookbook to read the recipe.",
        "take knife": "I take the knife to cut ingredients.",
        "take": "The recipe needs the {x}, so I take it.",
        "slice": "The recipe says to slice the {x}.",
        "dice": "The recipe says to dice the {x}.",
        "chop": "The recipe says to chop the {x}.",
        "cook": "The recipe says to cook the {x}; I use the {y}.",
        "prepare meal": "Every ingredient is ready, so I prepare the meal.",
        "eat meal": "The meal is ready, so I eat it.",
    }


class TwcFamily(WalkthroughFamily):
    name = "twx-twc"
    game = "twc"
    description = "TextWorldExpress TextWorld Commonsense: put misplaced objects where they usually belong"
    default_system_prompt = format_prompt(
        "Pick up the objects that are out of place and put each where it usually belongs.")
    options = ("num_locations", "include_doors")
    thinks: ClassVar[dict[str, str]] = {
        **WalkthroughFamily.thinks,
        "take": "The {x} is out of place, so I pick it up.",
        "put": "The {x} belongs in the {y}.",
    }


class MapReaderFamily(WalkthroughFamily):
    name = "twx-mapreader"
    game = "mapreader"
    description = "TextWorldExpress mapreader: use the map to fetch the coin and put it in the box"
    default_system_prompt = format_prompt(
        "Take the coin from the room the task names and put it in the box in the other room it names; "
        "read the map to find the way.")
    options = ("num_locations", "include_doors")
    thinks: ClassVar[dict[str, str]] = {
        **WalkthroughFamily.thinks,
        "read map": "I read the map to find the way.",
        "move": "The way to my goal goes {x}.",
        "take coin": "The coin is here, so I take it.",
        "put": "I put the {x} in the {y}, as the task asks.",
    }


class SortingFamily(WalkthroughFamily):
    name = "twx-sorting"
    game = "sorting"
    description = "TextWorldExpress sorting: put objects in the box in order of increasing quantity"
    default_system_prompt = format_prompt(
        "Put the objects in the box one by one, from the smallest quantity to the largest.")
    thinks: ClassVar[dict[str, str]] = {
        **WalkthroughFamily.thinks,
        "take": "The {x} is the smallest quantity left, so I take it.",
        "put": "I put the {x} in the {y}, next in order.",
    }


class ArithmeticFamily(WalkthroughFamily):
    name = "twx-arithmetic"
    game = "arithmetic"
    description = "TextWorldExpress arithmetic: solve the math problem, box the item with the answer's quantity"
    default_system_prompt = format_prompt(
        "Read the math problem, solve it, then put the item whose quantity is the answer in the box.")
    thinks: ClassVar[dict[str, str]] = {
        **WalkthroughFamily.thinks,
        "take math problem": "I pick up the math problem to read it.",
        "read math problem": "I read the math problem to solve it.",
        "take": "The answer is the quantity of the {x}, so I take them.",
    }
