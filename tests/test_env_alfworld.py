"""ALFWorld on its real engine: games generated offline, the official-data layout, the stock AlfredTWEnv, the pool.

Making a game replays its walkthrough on the engine (0.5-10 s, kitchens the slowest) and a kitchen step costs
0.1-0.4 s (TextWorld renders every admissible command), so the games are made once per module, one per task type,
and shared by the tests; the module still takes 1-2 minutes, most of it in the fixture that makes the six games and
in the random-play test, which plays all six.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dypo.stages.config import AlfworldOptions, EnvConfig, parse_config
from dypo.stages.environments import EnvPool, get_family
from dypo.stages.environments.alfworld import (
    AlfworldSession,
    GeneratedFamily,
    MissingDataError,
    OfficialFamily,
)
from dypo.stages.environments.alfworld_games import (
    TASK_TYPES,
    Engine,
    GameError,
    build_game,
    ensure_game,
    game_seed,
    verify,
    write_walkthrough,
)
from dypo.stages.environments.protocol import Status
from dypo.stages.trajectory import Task
from dypo.stages.turn_format import parse_turn, render_turn

SPLIT = "train"


@pytest.fixture(scope="module")
def games_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("alfworld-games")


@pytest.fixture(scope="module")
def env(games_dir: Path) -> EnvConfig:
    return EnvConfig(family="alfworld-generated", max_turns=15,
                     alfworld=AlfworldOptions(games_dir=str(games_dir), train_games_per_type=3))


@pytest.fixture(scope="module")
def family(env: EnvConfig) -> GeneratedFamily:
    family = get_family(env)
    assert isinstance(family, GeneratedFamily)
    return family


@pytest.fixture(scope="module")
def session(family: GeneratedFamily) -> Iterator[AlfworldSession]:
    session = family.open_session()
    yield session
    session.close()


@pytest.fixture(scope="module")
def tasks(family: GeneratedFamily) -> list[Task]:
    """Game 0 of every task type (the first six tasks of the split are one per type)."""
    return family.make_tasks(SPLIT, len(TASK_TYPES))


@pytest.fixture(scope="module")
def expert_games(family: GeneratedFamily, session: AlfworldSession, tasks: list[Task]) -> dict[str, list]:
    """The expert's episode of every task, which makes and caches the six games on the way (~15 s)."""
    return {task.task_type: family.expert_turns(task, session) for task in tasks}


def _game_files(games_dir: Path, task: Task) -> tuple[dict, dict]:
    directory = next(games_dir.glob(f"alfworld-generated/*/{task.task_id.removeprefix('alfworld-generated/')}"))
    return (json.loads((directory / "game.tw-pddl").read_text()),
            json.loads((directory / "traj_data.json").read_text()))


def test_tasks_are_interleaved_deterministic_and_split_disjoint(family: GeneratedFamily) -> None:
    train = family.make_tasks(SPLIT, family.task_count(SPLIT))
    assert family.task_count(SPLIT) == 3 * len(TASK_TYPES)
    assert [t.task_type for t in train[:6]] == list(TASK_TYPES)
    assert train[7].task_id == "alfworld-generated/train/look_at_obj_in_light/00001"
    assert family.make_tasks(SPLIT, 4, start=5) == train[5:9]
    assert len({t.task_id for t in train}) == len({t.seed for t in train}) == len(train)
    heldout, unseen = family.make_tasks("heldout", 24), family.make_tasks("unseen", 24)
    assert not {t.seed for t in train} & ({t.seed for t in heldout} | {t.seed for t in unseen})
    assert family.splits() == ("train", "heldout", "unseen")
    with pytest.raises(ValueError, match="has 18"):
        family.make_tasks(SPLIT, 2, start=17)
    with pytest.raises(ValueError, match="no split 'valid_seen'"):
        family.make_tasks("valid_seen", 1)
    only = GeneratedFamily(family.env.model_copy(update={"alfworld": family.options.model_copy(
        update={"task_types": ["look_at_obj_in_light", "pick_and_place_simple"]})}))
    assert [t.task_type for t in only.make_tasks(SPLIT, 4)] == ["look_at_obj_in_light", "pick_and_place_simple"] * 2
    assert only.make_tasks(SPLIT, 1)[0] == train[1]  # a game is the same whichever types are selected


def test_every_task_type_loads_in_the_stock_engine_and_its_walkthrough_wins(
        games_dir: Path, tasks: list[Task], expert_games: dict[str, list]) -> None:
    """The expert episodes were played by sessions that loaded each game from its file and won (or they raise)."""
    for task in tasks:
        game, traj_data = _game_files(games_dir, task)
        assert traj_data["task_type"] == task.task_type and traj_data["scene"]["random_seed"] == task.seed
        assert game["solvable"] is True and game["walkthrough"]
        assert game["pddl_domain"].startswith(";; Specification in PDDL of the Alfred domain")
        assert "UNKNOWN GOAL" not in game["grammar"] and traj_data["task_desc"] in game["grammar"]
        turns = expert_games[task.task_type]
        assert [turn.action for turn in turns] == game["walkthrough"]
        assert turns[0].observation.startswith(f"Your task is to: {traj_data['task_desc']}.\nYou are in the middle")
        assert all(turn.think and parse_turn(render_turn(turn.think, turn.action)).action == turn.action
                   for turn in turns)


def test_walkthroughs_use_the_task_structure(tasks: list[Task], expert_games: dict[str, list]) -> None:
    verbs = {task_type: [turn.action.split()[0] for turn in turns] for task_type, turns in expert_games.items()}
    assert verbs["look_at_obj_in_light"][-1] == "use"
    assert "clean" in verbs["pick_clean_then_place_in_recep"]
    assert "heat" in verbs["pick_heat_then_place_in_recep"]
    assert "cool" in verbs["pick_cool_then_place_in_recep"]
    assert verbs["pick_two_obj_and_place"].count("take") == verbs["pick_two_obj_and_place"].count("move") == 2
    for task_type in ("pick_and_place_simple", "pick_clean_then_place_in_recep"):
        assert verbs[task_type][-1] == "move"


def test_names_are_demangled_as_alfworld_shows_them(tasks: list[Task], expert_games: dict[str, list]) -> None:
    clean = expert_games["pick_clean_then_place_in_recep"]
    assert any(turn.action.startswith("go to sinkbasin ") for turn in clean)
    for turns in expert_games.values():
        text = " ".join(turn.observation for turn in turns)
        assert "_bar_" not in text and "basinbasin" not in text and "loc " not in text


def test_random_admissible_play_ends_within_max_steps_without_winning(
        env: EnvConfig, session: AlfworldSession, tasks: list[Task], expert_games: dict[str, list]) -> None:
    rng = random.Random(0)
    wins = 0
    for task in tasks:
        session.reset(task)
        for _ in range(env.max_turns):
            result = session.step(rng.choice(session.admissible_commands()))
            assert result.reward == result.score == float(result.won)
            if result.done:
                wins += result.won
                break
    assert wins <= 1  # a random walk rarely solves a household task in 15 steps


def test_same_task_same_initial_observation_in_two_sessions(family: GeneratedFamily, session: AlfworldSession,
                                                            tasks: list[Task], expert_games: dict) -> None:
    other = family.open_session()
    for task in (tasks[1], tasks[0], tasks[1]):  # also back to a game the session loaded before
        assert other.reset(task) == session.reset(task)
        assert other.admissible_commands() == session.admissible_commands()
    other.close()


def test_session_misuse_is_refused(family: GeneratedFamily, tasks: list[Task], expert_games: dict) -> None:
    fresh = family.open_session()
    with pytest.raises(RuntimeError, match="call reset"):
        fresh.step("look")
    with pytest.raises(RuntimeError, match="call reset"):
        fresh.admissible_commands()
    with pytest.raises(RuntimeError, match="call reset"):
        fresh.walkthrough()
    task = tasks[0]
    with pytest.raises(ValueError, match="is not a alfworld-generated task"):
        fresh.reset(Task("twx-coin/train/000001", "twx-coin", "coin", "train", 1))
    with pytest.raises(ValueError, match="not the seed of that game"):
        fresh.reset(Task(task.task_id, task.family, task.task_type, task.split, task.seed + 1))
    with pytest.raises(ValueError, match="does not name a task type and index"):
        fresh.reset(Task(task.task_id + "x", task.family, task.task_type, task.split, task.seed))
    fresh.close()
    with pytest.raises(RuntimeError, match="closed"):
        fresh.reset(task)


def test_step_after_the_game_is_won_is_refused(session: AlfworldSession, tasks: list[Task],
                                               expert_games: dict[str, list]) -> None:
    turns = expert_games["pick_and_place_simple"]
    session.reset(tasks[0])
    for turn in turns:
        result = session.step(turn.action)
    assert result.done and result.won
    with pytest.raises(RuntimeError, match="call reset"):
        session.step("look")


def test_admissible_commands_can_be_shown(env: EnvConfig, tasks: list[Task], expert_games: dict) -> None:
    shown = GeneratedFamily(env.model_copy(update={"alfworld": env.alfworld.model_copy(
        update={"show_admissible_commands": True})})).open_session()
    observation = shown.reset(tasks[0])
    assert observation.endswith(f"\nAdmissible commands: {', '.join(shown.admissible_commands())}.")
    assert "go to " in observation.rpartition("Admissible commands:")[2]


def test_generation_is_deterministic(tmp_path: Path) -> None:
    """Same seed, same bytes, also from another interpreter with another string-hash seed (as on another machine)."""
    task_type, index = "look_at_obj_in_light", 5  # small rooms: quick to make
    seed = game_seed(0, "heldout", task_type, index)
    here = ensure_game(tmp_path / "here", "heldout", task_type, index, seed, Engine())
    script = ("import sys\nfrom pathlib import Path\n"
              "from dypo.stages.environments.alfworld_games import Engine, ensure_game\n"
              f"ensure_game(Path(sys.argv[1]), 'heldout', {task_type!r}, {index}, {seed}, Engine())")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "there")], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "12345"})
    there = tmp_path / "there" / here.relative_to(tmp_path / "here")
    for name in ("game.tw-pddl", "traj_data.json"):
        assert (here.parent / name).read_bytes() == (there.parent / name).read_bytes()
    other = build_game("heldout", task_type, game_seed(0, "heldout", task_type, index + 1), Engine())
    assert other.game["pddl_problem"] != json.loads(here.read_text())["pddl_problem"]
    assert seed == game_seed(0, "heldout", task_type, index) != game_seed(1, "heldout", task_type, index)


def test_generated_games_follow_the_alfworld_details(games_dir: Path, tasks: list[Task], expert_games: dict) -> None:
    for task in tasks:
        game, _ = _game_files(games_dir, task)
        problem = game["pddl_problem"]
        # Escaped ids, sink basins named after their sink, one location per receptacle, goal from the library.
        assert "|" not in problem and "SinkBasin_bar_" not in problem
        declared = problem.partition("(:objects")[2].partition("(:init")[0].splitlines()
        receptacles = [line.split()[0] for line in declared if line.endswith(" - receptacle")]
        locations = [line.split()[2] for line in problem.splitlines() if line.startswith("(receptacleAtLocation")]
        assert len(set(locations)) == len(locations) == len(receptacles)
        assert problem.rstrip().endswith(")") and "(:goal" in problem
    look, _ = _game_files(games_dir, tasks[TASK_TYPES.index("look_at_obj_in_light")])
    lamp = next(line.split()[1].rstrip(")") for line in look["pddl_problem"].splitlines()
                if line.startswith("(toggleable"))
    assert f"(inReceptacle {lamp} " in look["pddl_problem"] and f"(pickupable {lamp})" not in look["pddl_problem"]


def test_verification_rejects_games_that_do_not_play_as_written(games_dir: Path, tasks: list[Task],
                                                                expert_games: dict) -> None:
    engine = Engine()
    game, _ = _game_files(games_dir, tasks[0])  # pick_and_place_simple
    walkthrough = game["walkthrough"]
    engine.load(game)
    with pytest.raises(GameError, match=r"step 1 'take .*' is not admissible"):
        verify(engine, walkthrough[1:])
    with pytest.raises(GameError, match="left won=False"):
        verify(engine, walkthrough[:-1])
    with pytest.raises(GameError, match="left won=True"):
        verify(engine, [*walkthrough, "look"])
    # A game whose goal already holds: the object starts in the receptacle the walkthrough brings it to.
    taken, _, source = walkthrough[1].removeprefix("take ").partition(" from ")
    destination = walkthrough[-1].partition(" to ")[2]
    ids = {name: _original(game, entity) for entity, name in engine.names().items()}
    solved = game["pddl_problem"].replace(f"(inReceptacle {ids[taken]} {ids[source]})",
                                          f"(inReceptacle {ids[taken]} {ids[destination]})")
    assert solved != game["pddl_problem"]
    engine.load({**game, "pddl_problem": solved})
    with pytest.raises(GameError, match="already holds at the start"):
        verify(engine, walkthrough)


def _original(game: dict, entity: str) -> str:
    """The id as the problem writes it, for an id the engine holds lowercased."""
    return next(token for token in game["pddl_problem"].replace("(", " ").replace(")", " ").split()
                if token.lower() == entity)


def test_walkthrough_writer_says_what_a_game_lacks(games_dir: Path, tasks: list[Task], expert_games: dict) -> None:
    engine = Engine()
    game, traj_data = _game_files(games_dir, tasks[0])  # pick_and_place_simple in a living room
    engine.load(game)
    problem, params, names = game["pddl_problem"], traj_data["pddl_params"], engine.names()
    assert "(objectType Egg" not in problem and "ToasterType)" not in problem.split("(:init")[1]
    cases = [("pick_and_place_simple", {"object_target": "Egg"}, "no egg outside a"),
             ("pick_two_obj_and_place", {"object_target": "Egg"}, "fewer than two egg"),
             ("pick_and_place_simple", {"parent_target": "Toaster"}, "has no toaster"),
             ("pick_heat_then_place_in_recep", {}, "has no microwave"),
             ("look_at_obj_in_light", {"toggle_target": "DeskLamp"}, "or no desklamp inside a receptacle")]
    for task_type, change, message in cases:
        with pytest.raises(GameError, match=message):
            write_walkthrough(problem, task_type, {**params, **change}, names)


def test_config_validates_alfworld_options() -> None:
    config = parse_config({"env": {"family": "alfworld-generated",
                                   "alfworld": {"task_types": ["pick_and_place_simple"]}}})
    assert config.env.alfworld.task_types == ["pick_and_place_simple"]
    assert set(AlfworldOptions().task_types) == set(TASK_TYPES)
    with pytest.raises(ValueError, match="lists a type twice"):
        parse_config({"env": {"alfworld": {"task_types": ["pick_and_place_simple", "pick_and_place_simple"]}}})
    with pytest.raises(ValueError, match="task_types"):
        parse_config({"env": {"alfworld": {"task_types": ["pick_and_place_with_movable_recep"]}}})


def test_availability_pins_the_alfworld_version(env: EnvConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    assert GeneratedFamily.availability(env).status == Status.AVAILABLE
    from dypo.stages.environments import alfworld

    monkeypatch.setattr(alfworld, "installed_versions", lambda: {"alfworld": "0.3.5", "textworld": "1.7.0"})
    result = GeneratedFamily.availability(env)
    assert result.status == Status.NOT_INSTALLED and "pins 0.4.2" in result.detail
    assert result.enable == "pip install alfworld==0.4.2 textworld==1.7.0"
    monkeypatch.setattr(alfworld, "installed_versions", lambda: {"alfworld": None, "textworld": "1.7.0"})
    assert "not installed" in GeneratedFamily.availability(env).detail


# --- Official data -------------------------------------------------------------------------------------------------


def _official_layout(root: Path, games_dir: Path, tasks: list[Task]) -> dict[str, list[Task]]:
    """A directory laid out like alfworld-download's, holding copies of generated games under official names."""
    placed: dict[str, list[Task]] = {"train": [], "valid_seen": [], "valid_unseen": []}
    picks = {"train": tasks[:2], "valid_seen": tasks[:1], "valid_unseen": []}
    for split, chosen in picks.items():
        (root / "json_2.1.1" / split).mkdir(parents=True)
        for number, task in enumerate(chosen):
            game, traj_data = _game_files(games_dir, task)
            params = traj_data["pddl_params"]
            task_dir = (f"{task.task_type}-{params['object_target']}-None-"
                        f"{params['parent_target'] or params['toggle_target']}-{traj_data['scene']['scene_num']}")
            trial = root / "json_2.1.1" / split / task_dir / f"trial_T2019090{number}_000000_00000{number}"
            trial.mkdir(parents=True)
            (trial / "game.tw-pddl").write_text(json.dumps(game))
            (trial / "traj_data.json").write_text(json.dumps(traj_data))
            placed[split].append(task)
    # Trials AlfredTWEnv skips: an unsolvable game and a movable-receptacle task.
    for name, solvable in (("pick_and_place_simple-Apple-None-Fridge-1", False),
                           ("pick_and_place_with_movable_recep-Apple-Bowl-Fridge-1", True)):
        trial = root / "json_2.1.1" / "train" / name / "trial_T20190901_000000_000000"
        shutil.copytree(next((root / "json_2.1.1" / "train").glob("pick_and_place_simple-*/trial_*")), trial)
        game = json.loads((trial / "game.tw-pddl").read_text())
        (trial / "game.tw-pddl").write_text(json.dumps({**game, "solvable": solvable}))
    return placed


@pytest.fixture(scope="module")
def official_root(tmp_path_factory: pytest.TempPathFactory, games_dir: Path, tasks: list[Task],
                  expert_games: dict) -> tuple[Path, dict[str, list[Task]]]:
    root = tmp_path_factory.mktemp("alfworld-data")
    return root, _official_layout(root, games_dir, tasks)


def test_official_data_is_played_from_the_download_layout(official_root: tuple[Path, dict], games_dir: Path,
                                                          session: AlfworldSession) -> None:
    root, placed = official_root
    env = EnvConfig(family="alfworld", alfworld=AlfworldOptions(data_dir=str(root)))
    family = get_family(env)
    assert isinstance(family, OfficialFamily)
    assert family.availability(env).status == Status.AVAILABLE
    assert family.task_count("train") == 2 and family.task_count("heldout") == 1
    train = family.make_tasks("train", 2)
    assert [t.task_type for t in train] == ["pick_and_place_simple", "look_at_obj_in_light"]
    assert train[0].task_id.startswith("alfworld/train/pick_and_place_simple-")
    assert "/trial_T2019090" in train[0].task_id
    official = family.open_session()
    for task, generated in zip(train, placed["train"], strict=True):
        assert official.reset(task) == session.reset(generated)
        turns = family.expert_turns(task, official)
        assert [turn.action for turn in turns] == _game_files(games_dir, generated)[0]["walkthrough"]
    with pytest.raises(MissingDataError, match="holds no solvable games"):
        family.task_count("unseen")
    missing = Task("alfworld/train/pick_and_place_simple-X-None-Y-1/trial_T1", "alfworld", "pick_and_place_simple",
                   "train", 0)
    with pytest.raises(MissingDataError, match="is not in this ALFWorld download"):
        official.reset(missing)
    only_look = EnvConfig(family="alfworld", alfworld=AlfworldOptions(data_dir=str(root),
                                                                      task_types=["look_at_obj_in_light"]))
    assert [t.task_type for t in get_family(only_look).make_tasks("train", 1)] == ["look_at_obj_in_light"]


def test_official_expert_raises_when_its_walkthrough_does_not_win(official_root: tuple[Path, dict],
                                                                  tmp_path: Path) -> None:
    root, _ = official_root
    broken = tmp_path / "data"
    shutil.copytree(root, broken)
    # traj_data asks to look at the object under the room's lamp, the game's goal is to put it somewhere: the
    # walkthrough written from traj_data plays to its end without winning.
    (traj_path,) = (broken / "json_2.1.1" / "valid_seen").glob("*/*/traj_data.json")
    assert "(toggleable FloorLamp" in (traj_path.parent / "game.tw-pddl").read_text()
    traj_data = json.loads(traj_path.read_text())
    traj_data["task_type"] = "look_at_obj_in_light"
    traj_data["pddl_params"]["toggle_target"] = "FloorLamp"
    traj_path.write_text(json.dumps(traj_data))
    family = get_family(EnvConfig(family="alfworld", alfworld=AlfworldOptions(data_dir=str(broken))))
    (task,) = family.make_tasks("heldout", 1)
    with pytest.raises(RuntimeError, match="did not win"):
        family.expert_turns(task, family.open_session())


def test_official_data_missing_or_empty_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    unset = EnvConfig(family="alfworld")
    availability = OfficialFamily.availability(unset)
    assert availability.status == Status.NEEDS_DATA and "ALFWORLD_DATA is unset" in availability.detail
    assert "alfworld-download" in availability.enable
    with pytest.raises(MissingDataError, match="ALFWORLD_DATA is unset"):
        get_family(unset).make_tasks("train", 1)
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path))  # an existing but empty directory
    empty = EnvConfig(family="alfworld")
    assert OfficialFamily.availability(empty).status == Status.NEEDS_DATA
    with pytest.raises(MissingDataError, match=r"json_2\.1\.1/train does not exist"):
        get_family(empty).task_count("train")
    (tmp_path / "json_2.1.1" / "train").mkdir(parents=True)
    with pytest.raises(MissingDataError, match="holds no solvable games"):
        get_family(empty).task_count("train")


def test_importing_alfworld_leaves_alfworld_data_unset() -> None:
    """`import alfworld` sets ALFWORLD_DATA to its default; a fresh interpreter shows that the engine undoes it."""
    environment = {key: value for key, value in os.environ.items() if key != "ALFWORLD_DATA"}
    script = ("import os\nfrom dypo.stages.environments.alfworld_games import Engine\nEngine()\n"
              "print('ALFWORLD_DATA' in os.environ)")
    result = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "False"


def test_stock_alfred_tw_env_plays_the_games(official_root: tuple[Path, dict], games_dir: Path) -> None:
    """ALFWorld's own environment class finds the same games and its gym env plays their walkthroughs to a win."""
    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

    root, _ = official_root
    data = root / "json_2.1.1"
    config = {"env": {"goal_desc_human_anns_prob": 0, "task_types": [1, 2, 3, 4, 5, 6],
                      "domain_randomization": False, "expert_type": "handcoded"},
              "dataset": {"data_path": str(data / "train"), "eval_id_data_path": str(data / "valid_seen"),
                          "eval_ood_data_path": str(data / "valid_unseen"), "num_train_games": -1,
                          "num_eval_games": -1},
              "general": {"training_method": "dagger"}, "dagger": {"training": {"max_nb_steps_per_episode": 50}}}
    stock = AlfredTWEnv(config, train_eval="train")
    ours = get_family(EnvConfig(family="alfworld", alfworld=AlfworldOptions(data_dir=str(root))))
    assert sorted(Path(path).parent.relative_to(data / "train").as_posix() for path in stock.game_files) == sorted(
        task.task_id.removeprefix("alfworld/train/") for task in ours.make_tasks("train", 2))
    stock = AlfredTWEnv(config, train_eval="eval_in_distribution")
    gym_env = stock.init_env(batch_size=1)
    try:
        _, infos = gym_env.reset()
        walkthrough = json.loads(Path(infos["extra.gamefile"][0]).read_text())["walkthrough"]
        for command in walkthrough:
            _, _, dones, infos = gym_env.step([command])
        assert dones == (True,) and infos["won"] == [True]
    finally:
        gym_env.close()


def test_generated_family_runs_in_worker_processes(env: EnvConfig, tasks: list[Task], expert_games: dict) -> None:
    with EnvPool(env, size=1) as pool:
        (worker,) = pool.sessions(1)
        turns = worker.expert_turns(tasks[0])
        assert [turn.action for turn in turns] == [turn.action for turn in expert_games[tasks[0].task_type]]
        assert worker.reset(tasks[0]) == turns[0].observation
        assert "look" in worker.admissible_commands()
