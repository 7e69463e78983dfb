"""ALFWorld games made offline from what the `alfworld` package ships, played on ALFWorld's own engine.

ALFWorld's per-task game files come from `alfworld-download`, which needs a network this machine does not have; the
package itself ships the PDDL domain, the text grammar, 120 scene layouts (which receptacles a room has and which
object types it holds), the object/receptacle compatibility tables and the goal templates. That is enough to make
games of the same kind: a game is a `game.tw-pddl` JSON (the shipped domain, the shipped grammar with the task
sentence filled in, a PDDL problem, `solvable`, `walkthrough`) beside a `traj_data.json` naming the task type and
its targets, exactly what the download holds per trial, so the stock `AlfredTWEnv` loads these games too.

A game is a pure function of (split, task type, seed): the seed picks a room valid for the task type (ALFRED's
`GOALS_VALID`), the targets, and where every object of the room lies, so two machines make byte-identical games.

Walkthroughs are written from the task's structure (fetch the object, open what is closed, clean/heat/cool it,
bring it to the target, or take it to a lamp), not asked of the PDDL planner, which took from a second to minutes
per game. The writer reads only the PDDL facts and the task parameters, so it is also the expert for official
games. Every generated game is replayed before it is kept: the goal must not hold at the start, every walkthrough
command must be admissible when issued, and only the last one may win.

Details that each broke a game when missed:
- Names. PDDL ids escape ALFRED's `|+-.,` as `_bar_`, `_plus_`, …; the engine lowercases ids; ALFWorld's
  `AlfredDemangler` names an entity by the text before the first `_bar_` and appends "basin" when the id contains
  "basin", so a sink basin must be `Sink|…|SinkBasin` ("sinkbasin 1"): `SinkBasin|…` would read "sinkbasinbasin 1".
- Receptacles missing from the layout tables. The tables list receptacles with a viewpoint, so stove burners, the
  coffee machine, the toaster, garbage cans and towel holders are often absent though the room has them; they are
  added (four burners, one of the others).
- Lamps are objects that cannot be picked up, and `use` needs them inside a receptacle, so each lamp stands on a
  piece of furniture of its room.
- One location per receptacle: the grammar lists every receptacle at a location, so two receptacles sharing one
  would merge into a single "go to drawer 1 and drawer 2" command.
- Goals must not hold at the start: no object of the target type starts in a receptacle of the goal's type or in
  the appliance the task needs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

GENERATOR_VERSION = 1  # bump whenever the games made from the same seed change
ALFWORLD_VERSION, TEXTWORLD_VERSION = "0.4.2", "1.7.0"  # results drift across versions: these are pinned

TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
# Our splits and ALFRED's scene folds: train and heldout (ALFWorld's valid_seen) play the training rooms with
# different placements and targets; unseen (valid_unseen) plays rooms never trained on.
SPLIT_SCENES = {"train": "TRAIN_SCENE_NUMBERS", "heldout": "TRAIN_SCENE_NUMBERS", "unseen": "TEST_SCENE_NUMBERS"}

_APPLIANCE = {"pick_clean_then_place_in_recep": "SinkBasin", "pick_heat_then_place_in_recep": "Microwave",
              "pick_cool_then_place_in_recep": "Fridge"}
_PROPERTY = {"pick_clean_then_place_in_recep": "Cleanable", "pick_heat_then_place_in_recep": "Heatable",
             "pick_cool_then_place_in_recep": "Coolable"}
_VERB = {"pick_clean_then_place_in_recep": ("clean", "cleaned"), "pick_heat_then_place_in_recep": ("heat", "heated"),
         "pick_cool_then_place_in_recep": ("cool", "cooled")}
_MAX_INSTANCES = 3  # ALFRED's MAX_NUM_OF_OBJ_INSTANCES
_BURNERS = 4
_LAMP_HOSTS = {"DeskLamp": ("Desk", "SideTable", "Dresser", "Shelf"),  # in order of preference
               "FloorLamp": ("SideTable", "Dresser", "Desk", "ArmChair", "Sofa")}
_BASIN_IDS = {"SinkBasin": "Sink|{k}|SinkBasin", "BathtubBasin": "Bathtub|{k}|BathtubBasin"}
_OBJECT_PROPERTIES = {"Cleanable": "cleanable", "Heatable": "heatable", "Coolable": "coolable",
                      "Sliceable": "sliceable", "Toggleable": "toggleable"}
_ESCAPES = {"|": "_bar_", "+": "_plus_", "-": "_minus_", ".": "_dot_", ",": "_comma_"}


class GameError(RuntimeError):
    """A game that cannot be played as built: no plan from its facts, or a walkthrough that does not win."""


# --- What the package ships -------------------------------------------------------------------------------------


def installed_versions() -> dict[str, str | None]:
    """The installed alfworld and textworld versions (None when missing), read without importing them."""
    versions: dict[str, str | None] = {}
    for package in ("alfworld", "textworld"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _import_alfworld() -> ModuleType:
    """`import alfworld` sets ALFWORLD_DATA to ~/.cache/alfworld when it is unset; undo that, so a user who never
    pointed ALFWORLD_DATA at the official games is told so instead of being sent to an empty default."""
    saved = os.environ.get("ALFWORLD_DATA")
    import alfworld
    import alfworld.gen.constants
    import alfworld.gen.goal_library

    if saved is None:
        os.environ.pop("ALFWORLD_DATA", None)
    else:
        os.environ["ALFWORLD_DATA"] = saved
    return alfworld


@dataclass(frozen=True)
class _Shipped:
    domain: str  # alfred.pddl
    grammar: str  # alfred.twl2, with "UNKNOWN GOAL" where the task sentence goes
    layouts: Path
    goals: dict[str, dict[str, Any]]  # goal_library.gdict: PDDL goal and sentence templates per task type
    holds: dict[str, frozenset[str]]  # static receptacle type -> object types it can hold
    pickupable: frozenset[str]
    declared_otypes: tuple[str, ...]  # every object type the problem declares (the domain names some in its actions)
    properties: dict[str, frozenset[str]]  # Cleanable/Heatable/Coolable/Sliceable/Toggleable -> object types
    movable: frozenset[str]  # receptacle objects (bowls, mugs, …): objects here, as in ALFWorld's text games
    openable: frozenset[str]
    scene_numbers: dict[str, tuple[int, ...]]  # TRAIN_SCENE_NUMBERS / TEST_SCENE_NUMBERS
    scene_kinds: dict[str, range]  # Kitchen -> range(1, 31), …
    valid_kinds: dict[str, frozenset[str]]  # task type -> room kinds it is generated in


@functools.cache
def _shipped() -> _Shipped:
    alfworld = _import_alfworld()
    constants, goals = alfworld.gen.constants, alfworld.gen.goal_library
    package = Path(alfworld.__file__).parent
    movable = frozenset(constants.MOVABLE_RECEPTACLES)
    holds = {rtype: frozenset(objects) for rtype, objects in constants.VAL_RECEPTACLE_OBJECTS.items()
             if rtype not in movable}
    known = set(constants.OBJECTS) | movable
    return _Shipped(
        domain=(package / "data" / "alfred.pddl").read_text(),
        grammar=(package / "data" / "alfred.twl2").read_text(),
        layouts=package / "gen" / "layouts",
        goals=goals.gdict,
        holds=holds,
        pickupable=frozenset(set().union(*constants.VAL_RECEPTACLE_OBJECTS.values()) & known) - set(holds),
        declared_otypes=tuple(sorted(known - set(holds))),
        properties={name: frozenset(types) for name, types in constants.VAL_ACTION_OBJECTS.items()},
        movable=movable,
        openable=frozenset(constants.OPENABLE_CLASS_LIST),
        scene_numbers={name: tuple(getattr(constants, name)) for name in set(SPLIT_SCENES.values())},
        scene_kinds=dict(constants.SCENE_TYPE),
        valid_kinds={task: frozenset(kinds) for task, kinds in constants.GOALS_VALID.items()},
    )


# --- Rooms ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    number: int
    kind: str  # Kitchen, LivingRoom, Bedroom, Bathroom
    receptacles: tuple[tuple[str, str], ...]  # (ALFRED id, receptacle type), sorted by id
    object_types: tuple[str, ...]  # the pickupable object types of the room
    lamp_types: tuple[str, ...]

    def receptacle_types(self) -> set[str]:
        return {rtype for _, rtype in self.receptacles}


def _receptacle_type(alfred_id: str) -> str:
    """"Drawer|+00.95|+00.22|-02.20" -> Drawer; a basin is named by its last part: "Sink|…|SinkBasin" -> SinkBasin."""
    parts = alfred_id.split("|")
    return parts[-1] if len(parts) == 5 else parts[0]


@functools.cache
def load_scene(number: int) -> Scene:
    """A room from the shipped layout tables, completed with the receptacles those tables leave out."""
    shipped = _shipped()
    directory = shipped.layouts
    types_in_room = set(json.loads((directory / f"FloorPlan{number}-objects.json").read_text()))
    viewpoints = json.loads((directory / f"FloorPlan{number}-openable.json").read_text())
    receptacles = [(alfred_id, _receptacle_type(alfred_id)) for alfred_id in viewpoints]
    receptacles = [(alfred_id, rtype) for alfred_id, rtype in receptacles if rtype in shipped.holds]
    listed = {rtype for _, rtype in receptacles}
    for rtype in sorted((types_in_room & set(shipped.holds)) - listed):
        for k in range(1, (_BURNERS if rtype == "StoveBurner" else 1) + 1):
            receptacles.append((_BASIN_IDS.get(rtype, "{rtype}|{k}").format(rtype=rtype, k=k), rtype))
    kind = next(name for name, numbers in shipped.scene_kinds.items() if number in numbers)
    return Scene(
        number=number,
        kind=kind,
        receptacles=tuple(sorted(receptacles)),
        object_types=tuple(sorted(types_in_room & shipped.pickupable)),
        lamp_types=tuple(sorted(types_in_room & shipped.properties["Toggleable"])),
    )


# --- What a game asks -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GameSpec:
    """A task as ALFRED's `pddl_params` state it: its type and targets (types, not instances)."""

    task_type: str
    object_target: str  # e.g. "Apple"
    parent_target: str = ""  # the receptacle type the object must end in; "" for look_at_obj_in_light
    toggle_target: str = ""  # the lamp type for look_at_obj_in_light

    def pddl_params(self) -> dict[str, Any]:
        return {"object_target": self.object_target, "parent_target": self.parent_target,
                "toggle_target": self.toggle_target, "mrecep_target": "", "object_sliced": False}


def _specs(scene: Scene, task_type: str) -> list[GameSpec]:
    """Every task of this type the room supports, with a source for the object that is not its destination."""
    shipped = _shipped()
    if scene.kind not in shipped.valid_kinds[task_type]:
        return []
    rtypes = scene.receptacle_types()
    sources = {otype: {rtype for rtype in rtypes if otype in shipped.holds[rtype]} for otype in scene.object_types}
    if task_type == "look_at_obj_in_light":
        lamps = [lamp for lamp in scene.lamp_types if rtypes & set(_LAMP_HOSTS[lamp])]
        return [GameSpec(task_type, otype, toggle_target=lamp)
                for otype in scene.object_types if sources[otype] for lamp in lamps]
    appliance = _APPLIANCE.get(task_type)
    if appliance and appliance not in rtypes:
        return []
    wanted = shipped.properties[_PROPERTY[task_type]] if task_type in _PROPERTY else shipped.pickupable
    return [GameSpec(task_type, otype, parent_target=parent)
            for otype in scene.object_types if otype in wanted
            for parent in sorted(sources[otype] - {appliance})
            if sources[otype] - {parent, appliance}]


@functools.cache
def _scene_specs(split: str, task_type: str) -> tuple[tuple[Scene, tuple[GameSpec, ...]], ...]:
    scenes = (load_scene(number) for number in _shipped().scene_numbers[SPLIT_SCENES[split]])
    return tuple((scene, tuple(specs)) for scene in scenes if (specs := _specs(scene, task_type)))


# --- Building a game --------------------------------------------------------------------------------------------


def escape(alfred_id: str) -> str:
    """An ALFRED id as a PDDL name, the way ALFWorld escapes them ("Apple|+01.0" -> "Apple_bar__plus_01_dot_0")."""
    return "".join(_ESCAPES.get(char, char) for char in alfred_id)


@dataclass(frozen=True)
class _Placed:
    alfred_id: str
    otype: str
    receptacle: str  # ALFRED id of the receptacle it lies in


def _place_objects(scene: Scene, spec: GameSpec, rng: random.Random) -> list[_Placed]:
    """1-3 instances of each object type of the room (2-3 of the target for pick_two), each in a receptacle that can
    hold it; the target type never starts where the goal wants it or in the task's appliance. A lamp stands on the
    first kind of furniture in its host list that the room has."""
    holds = _shipped().holds
    forbidden = {spec.parent_target, _APPLIANCE.get(spec.task_type, "")}
    placed = []
    for otype in scene.object_types:
        allowed = [alfred_id for alfred_id, rtype in scene.receptacles
                   if otype in holds[rtype] and not (otype == spec.object_target and rtype in forbidden)]
        if not allowed:
            continue
        fewest = 2 if otype == spec.object_target and spec.task_type == "pick_two_obj_and_place" else 1
        placed += [_Placed(f"{otype}|{k}", otype, rng.choice(allowed))
                   for k in range(1, rng.randint(fewest, _MAX_INSTANCES) + 1)]
    rtypes = scene.receptacle_types()
    for lamp in scene.lamp_types:
        host_type = next((rtype for rtype in _LAMP_HOSTS[lamp] if rtype in rtypes), None)
        if host_type is not None:
            hosts = [alfred_id for alfred_id, rtype in scene.receptacles if rtype == host_type]
            placed.append(_Placed(f"{lamp}|1", lamp, rng.choice(hosts)))
    return placed


def _problem(name: str, scene: Scene, spec: GameSpec, placed: list[_Placed]) -> str:
    """The PDDL problem: the room's receptacles each at its own location, the placed objects, the goal."""
    shipped = _shipped()
    receptacles = dict(scene.receptacles)
    location = {alfred_id: f"loc|{index}" for index, alfred_id in enumerate(receptacles, start=1)}
    otypes_here = sorted({item.otype for item in placed})
    declarations = ["agent1 - agent", "loc|0 - location"]
    declarations += [f"{loc} - location" for loc in location.values()]
    declarations += [f"{alfred_id} - receptacle" for alfred_id in receptacles]
    declarations += [f"{item.alfred_id} - object" for item in placed]
    declarations += [f"{otype}Type - otype" for otype in shipped.declared_otypes]
    declarations += [f"{rtype}Type - rtype" for rtype in sorted(shipped.holds)]
    facts = [("atLocation", "agent1", "loc|0")]
    for alfred_id, rtype in receptacles.items():
        facts += [("receptacleType", alfred_id, f"{rtype}Type"),
                  ("receptacleAtLocation", alfred_id, location[alfred_id])]
        if rtype in shipped.openable:
            facts.append(("openable", alfred_id))
    facts += [("canContain", f"{rtype}Type", f"{otype}Type")
              for rtype in sorted(set(receptacles.values())) for otype in otypes_here if otype in shipped.holds[rtype]]
    for item in placed:
        where = item.receptacle
        facts += [("objectType", item.alfred_id, f"{item.otype}Type"), ("inReceptacle", item.alfred_id, where),
                  ("objectAtLocation", item.alfred_id, location[where])]
        if item.otype in shipped.pickupable:
            facts.append(("pickupable", item.alfred_id))
        if item.otype in shipped.movable:
            facts.append(("isReceptacleObject", item.alfred_id))
        facts += [(predicate, item.alfred_id) for prop, predicate in _OBJECT_PROPERTIES.items()
                  if item.otype in shipped.properties[prop]]
    goal = shipped.goals[spec.task_type]["pddl"].format(
        obj=spec.object_target, recep=spec.parent_target, toggle=spec.toggle_target, mrecep="").replace("#", "-")
    lines = [f"(define (problem {name})", "(:domain alfred)", "(:objects"]
    lines += [" - ".join(map(escape, declaration.split(" - "))) for declaration in declarations]
    lines += [")", "(:init"]
    lines += [f"({predicate} {' '.join(map(escape, arguments))})" for predicate, *arguments in facts]
    lines += [")", goal.strip()]  # the library's goal text also closes the `(define`
    return "\n".join(lines) + "\n"


def task_sentence(spec: GameSpec, rng: random.Random) -> str:
    """The task as ALFWorld words it: one of the goal library's templates, e.g. "put a clean apple in fridge"."""
    template = rng.choice(_shipped().goals[spec.task_type]["templates"])
    return template.format(obj=spec.object_target.lower(), recep=spec.parent_target.lower(),
                           toggle=spec.toggle_target.lower(), mrecep="")


def game_seed(generation_seed: int, split: str, task_type: str, index: int) -> int:
    """The seed of game `index` of a split's task type: a 63-bit hash, the same on every machine."""
    digest = hashlib.sha256(f"alfworld-generated/{generation_seed}/{split}/{task_type}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class Game:
    """The two files of one game, as the official download lays them out per trial."""

    game: dict[str, Any]  # game.tw-pddl
    traj_data: dict[str, Any]  # traj_data.json


def build_game(split: str, task_type: str, seed: int, engine: Engine) -> Game:
    """The game of (split, task type, seed), with its walkthrough written and replayed to a win on `engine`."""
    if split not in SPLIT_SCENES or task_type not in TASK_TYPES:
        raise ValueError(f"no generated games for split {split!r} and task type {task_type!r}")
    rng = random.Random(seed)
    scene, specs = rng.choice(_scene_specs(split, task_type))
    spec = rng.choice(specs)
    placed = _place_objects(scene, spec, rng)
    sentence = task_sentence(spec, rng)
    shipped = _shipped()
    game: dict[str, Any] = {
        "pddl_domain": shipped.domain,
        "grammar": shipped.grammar.replace("UNKNOWN GOAL", sentence),
        "pddl_problem": _problem(f"dypo_{split}_{seed}", scene, spec, placed),
        "solvable": False,
        "walkthrough": None,
    }
    engine.load(game)
    steps = write_walkthrough(game["pddl_problem"], task_type, spec.pddl_params(), engine.names())
    walkthrough = [step.command for step in steps]
    verify(engine, walkthrough)
    game.update(solvable=True, walkthrough=walkthrough)
    traj_data = {
        "task_type": task_type,
        "pddl_params": spec.pddl_params(),
        "scene": {"floor_plan": f"FloorPlan{scene.number}", "scene_num": scene.number, "random_seed": seed},
        "task_desc": sentence,
        "generator": {"name": "dypo.alfworld_games", "version": GENERATOR_VERSION, "alfworld": ALFWORLD_VERSION,
                      "split": split},
    }
    return Game(game, traj_data)


def verify(engine: Engine, walkthrough: list[str]) -> None:
    """Replay `walkthrough` on the loaded game: not won at the start, every command admissible, won at the end only."""
    state = engine.reset()
    if state["won"]:
        raise GameError("the goal already holds at the start")
    for number, command in enumerate(walkthrough, start=1):
        if command not in state["admissible_commands"]:
            raise GameError(f"walkthrough step {number} {command!r} is not admissible; the game offers "
                            f"{state['admissible_commands']}")
        state = engine.step(command)
        if state["won"] != (number == len(walkthrough)):
            raise GameError(f"walkthrough step {number} {command!r} left won={state['won']} of "
                            f"{len(walkthrough)} steps")


# --- The cache of generated games -------------------------------------------------------------------------------


def generated_root(cache: Path, generation_seed: int) -> Path:
    """Where the games of one generation seed live, per alfworld and generator version (games differ across them)."""
    return cache / "alfworld-generated" / f"alfworld-{ALFWORLD_VERSION}-gen{GENERATOR_VERSION}-seed{generation_seed}"


def game_dir(root: Path, split: str, task_type: str, index: int) -> Path:
    """root/<split>/<task type>/<index>/ holding game.tw-pddl and traj_data.json, as AlfredTWEnv walks them."""
    return root / split / task_type / f"{index:05d}"


def write_game(directory: Path, game: Game) -> None:
    """Write both files atomically, game.tw-pddl last: a directory with it is complete (workers racing to make the
    same game write identical bytes, so either rename wins)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in (("traj_data.json", game.traj_data), ("game.tw-pddl", game.game)):
        temporary = directory / f".{name}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(content))
        temporary.replace(directory / name)


def ensure_game(root: Path, split: str, task_type: str, index: int, seed: int, engine: Engine) -> Path:
    """The path of game.tw-pddl for game `index`, built, verified and written first if it is not cached yet."""
    directory = game_dir(root, split, task_type, index)
    path = directory / "game.tw-pddl"
    if not path.is_file():
        write_game(directory, build_game(split, task_type, seed, engine))
    return path


# --- The engine -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _argv_kept() -> Iterator[None]:
    """Fast Downward's translator overwrites sys.argv on every PDDL load; give the host process its own back."""
    saved = list(sys.argv)
    try:
        yield
    finally:
        sys.argv[:] = saved


@functools.cache
def _keep_translations() -> None:
    """TextWorld translates a game's PDDL into Fast Downward's SAS form twice when it loads the game and twice more
    at every reset (1-3 s per translation in a large kitchen). A translation depends on the two texts alone and is
    only read afterwards, so the last few are kept: a reset then costs a fraction of a second."""
    import fast_downward

    fast_downward.pddl2sas = functools.lru_cache(maxsize=4)(fast_downward.pddl2sas)  # two per game: plain, optimized


class Engine:
    """ALFWorld's text engine as `AlfredTWEnv` builds it: TextWorld's PddlEnv behind ALFWorld's name demangler.

    Each engine loads its own copy of Fast Downward's library and never unloads it, so make one per process or
    session and load game after game into it.
    """

    def __init__(self) -> None:
        _import_alfworld()
        _keep_translations()
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler
        from textworld.envs import PddlEnv

        with _argv_kept():
            self._env = AlfredDemangler(PddlEnv(textworld.EnvInfos(admissible_commands=True, won=True)),
                                        shuffle=False)
        self.game: dict[str, Any] | None = None

    def load(self, game: dict[str, Any]) -> None:
        with _argv_kept():
            self._env.load(game)
        self.game = game

    def reset(self) -> dict[str, Any]:
        with _argv_kept():
            return self._env.reset()

    def step(self, command: str) -> dict[str, Any]:
        state, _, _ = self._env.step(command)
        return state

    def names(self) -> dict[str, str]:
        """PDDL id (lowercase, as the engine holds it) -> the name the game text uses ("apple 2", "sinkbasin 1")."""
        return {entity: info.name.strip() for entity, info in self._env._entity_infos.items()}


# --- Walkthroughs from the task's structure ---------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    command: str
    think: str  # why, in the words of an expert who knows where things are


@dataclass
class _World:
    """The facts of a problem's :init that a plan needs; ids and types lowercase, types without "type"."""

    object_type: dict[str, str]
    receptacle_type: dict[str, str]
    inside: dict[str, str]  # object -> receptacle
    openable: set[str]
    opened: set[str]
    pickupable: set[str]
    toggleable: set[str]


_ATOM = re.compile(r"\(\s*([A-Za-z][\w-]*)((?:\s+[^\s()]+)+)\s*\)")


def _world(problem: str) -> _World:
    init = problem.partition("(:init")[2].partition("(:goal")[0]
    world = _World({}, {}, {}, set(), set(), set(), set())
    for predicate, arguments in _ATOM.findall(init):
        args = arguments.lower().split()
        match predicate.lower(), args:
            case "objecttype", [entity, otype]:
                world.object_type[entity] = otype.removesuffix("type")
            case "receptacletype", [entity, rtype]:
                world.receptacle_type[entity] = rtype.removesuffix("type")
            case "inreceptacle", [entity, receptacle]:
                world.inside[entity] = receptacle
            case "openable", [entity]:
                world.openable.add(entity)
            case "opened", [entity]:
                world.opened.add(entity)
            case "pickupable", [entity]:
                world.pickupable.add(entity)
            case "toggleable", [entity]:
                world.toggleable.add(entity)
    return world


def _article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


class _Walk:
    """A walkthrough being written: where the agent stands and what it has opened, so it never repeats a step."""

    def __init__(self, world: _World, names: dict[str, str]) -> None:
        self.world = world
        self.names = names
        self.here: str | None = None
        self.opened = set(world.opened)
        self.steps: list[Step] = []

    def go(self, receptacle: str, think: str, open_it: bool = True) -> None:
        """Walk to a receptacle, and open it if it is closed and something goes in or out of it."""
        name = self.names[receptacle]
        if self.here != receptacle:
            self.steps.append(Step(f"go to {name}", think))
            self.here = receptacle
        if open_it and receptacle in self.world.openable and receptacle not in self.opened:
            self.steps.append(Step(f"open {name}", f"The {name} is closed, so I open it."))
            self.opened.add(receptacle)

    def fetch(self, entity: str, why: str) -> None:
        source = self.world.inside[entity]
        self.go(source, why)
        self.steps.append(Step(f"take {self.names[entity]} from {self.names[source]}",
                               f"Here is {self.names[entity]}; I take it."))

    def put(self, entity: str, receptacle: str) -> None:
        self.go(receptacle, f"I carry the {self.names[entity]} to the {self.names[receptacle]}.")
        self.steps.append(Step(f"move {self.names[entity]} to {self.names[receptacle]}",
                               f"I move the {self.names[entity]} to the {self.names[receptacle]}."))


def _natural(name: str) -> tuple[str, int]:
    word, _, number = name.rpartition(" ")
    return (word, int(number)) if number.isdigit() else (name, 0)


def write_walkthrough(problem: str, task_type: str, params: dict[str, Any], names: dict[str, str]) -> list[Step]:
    """A winning command sequence for a game, with a short reason per command, from its PDDL facts and its task.

    The object taken is the first instance (in the game's numbering) lying in a receptacle and not already where
    the goal wants it; the destination is the first receptacle of the goal's type (for pick-two, one that already
    holds an instance if any does); the appliance and the lamp are the first of their type.
    """
    world = _world(problem)
    walk = _Walk(world, names)
    by_name = functools.partial(sorted, key=lambda entity: _natural(names[entity]))
    target = str(params["object_target"]).lower()
    parent_type = str(params.get("parent_target") or "").lower()
    candidates = by_name(entity for entity, otype in world.object_type.items()
                         if otype == target and entity in world.pickupable and entity in world.inside)
    word = _article(target)
    if task_type == "look_at_obj_in_light":
        toggle = str(params["toggle_target"]).lower()
        lamps = by_name(entity for entity in world.toggleable
                        if world.object_type.get(entity) == toggle and entity in world.inside)
        if not candidates or not lamps:
            raise GameError(f"no {target} to take or no {toggle} inside a receptacle")
        chosen, lamp = candidates[0], lamps[0]
        walk.fetch(chosen, f"I need {word}; I go to the {names[world.inside[chosen]]} to get one.")
        host = world.inside[lamp]
        walk.go(host, f"I take the {names[chosen]} to the {names[lamp]} on the {names[host]}.")
        walk.steps.append(Step(f"use {names[lamp]}", f"I turn on the {names[lamp]} to look at the {names[chosen]}."))
        return walk.steps
    destinations = by_name(entity for entity, rtype in world.receptacle_type.items() if rtype == parent_type)
    if not destinations:
        raise GameError(f"the game has no {parent_type} to put the {target} in")
    if task_type == "pick_two_obj_and_place":
        # Use the destination that already holds one, if any, and fetch only what is missing.
        destination = max(destinations, key=lambda r: sum(world.inside.get(c) == r for c in candidates))
        movable = [entity for entity in candidates if world.inside[entity] != destination]
        needed = 2 - (len(candidates) - len(movable))
        if len(movable) < needed:
            raise GameError(f"the game has fewer than two {target} to put in a {parent_type}")
        for count, chosen in enumerate(movable[:needed]):
            which = "a second one" if count or needed == 1 else "one"
            walk.fetch(chosen, f"I need two {target}; I go to the {names[world.inside[chosen]]} to get {which}.")
            walk.put(chosen, destination)
        return walk.steps
    movable = [entity for entity in candidates if world.receptacle_type[world.inside[entity]] != parent_type
               or task_type in _APPLIANCE]
    if not movable:
        raise GameError(f"no {target} outside a {parent_type} to move")
    chosen, destination = movable[0], destinations[0]
    walk.fetch(chosen, f"I need {word}; I go to the {names[world.inside[chosen]]} to get one.")
    if task_type in _APPLIANCE:
        verb, done = _VERB[task_type]
        appliances = by_name(entity for entity, rtype in world.receptacle_type.items()
                             if rtype == _APPLIANCE[task_type].lower())
        if not appliances:
            raise GameError(f"the game has no {_APPLIANCE[task_type].lower()} to {verb} the {target} with")
        appliance = appliances[0]
        # ALFWorld heats, cools and cleans in the appliance without opening it.
        walk.go(appliance, f"The {names[chosen]} must be {done}; I go to the {names[appliance]}.", open_it=False)
        walk.steps.append(Step(f"{verb} {names[chosen]} with {names[appliance]}",
                               f"I {verb} the {names[chosen]} with the {names[appliance]}."))
    walk.put(chosen, destination)
    return walk.steps
