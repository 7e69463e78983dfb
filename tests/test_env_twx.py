"""The TextWorldExpress families, played through real JVMs: in worker processes, and directly where a test needs
TWX's internals. Each family gets one pool of two workers for its tests (a JVM costs ~0.5-1.5 s to start)."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dypo.stages.config import EnvConfig, TwxOptions
from dypo.stages.environments import EnvError, EnvPool, get_family
from dypo.stages.environments.families import FAMILIES, family_class
from dypo.stages.environments.twx import CoinFamily, TwxSession, compact_observation
from dypo.stages.turn_format import parse_turn, render_turn

TWX = [name for name in FAMILIES if name.startswith("twx-")]
# twc's walkthrough is redrawn at every reset, so its expert episodes differ between calls (all winning).
RANDOM_WALKTHROUGH = {"twx-twc"}
COIN_ENV = EnvConfig()  # 4 locations with doors, no distractors: the embedded default
COIN_TASK = "Your task is to search the environment and find the coin."


def children(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone(*pids: int, within: float = 5.0) -> bool:
    """Whether all the processes end within a few seconds (a killed process dies when next scheduled)."""
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module", params=TWX)
def pool(request: pytest.FixtureRequest) -> Iterator[EnvPool]:
    """Two workers of one TWX family with its default options."""
    with EnvPool(EnvConfig(family=request.param), size=2) as pool:
        yield pool


@pytest.fixture(scope="module")
def coin() -> Iterator[TwxSession]:
    """A coin session in this process, for what only the engine object shows (fold seeds, the full room text)."""
    session = CoinFamily(COIN_ENV).open_session()
    yield session
    session.close()


def test_tasks_are_deterministic_and_splits_disjoint() -> None:
    family = get_family(COIN_ENV)
    train, heldout = family.make_tasks("train", 1000), family.make_tasks("heldout", 1000)
    assert family.make_tasks("train", 1000) == train
    assert not {t.seed for t in train} & {t.seed for t in heldout}
    assert len({t.task_id for t in train + heldout}) == 2000
    assert train[123].task_id == "twx-coin/train/000123"
    assert (train[0].family, train[0].task_type, train[0].split) == ("twx-coin", "coin", "train")
    assert family.make_tasks("train", 5, start=3) == train[3:8]
    with pytest.raises(ValueError, match="has 1000"):
        family.make_tasks("heldout", 2, start=999)
    with pytest.raises(ValueError, match="no split 'dev'"):
        family.task_count("dev")
    sorting = get_family(EnvConfig(family="twx-sorting")).make_tasks("heldout", 1)[0]
    assert (sorting.task_id, sorting.task_type) == ("twx-sorting/heldout/020000", "sorting")


def test_split_seeds_are_the_twx_folds_of_every_game(coin: TwxSession) -> None:
    twx = coin._twx  # the seed lists are only available from a running game engine
    try:
        for name in TWX:
            family = family_class(name)(EnvConfig(family=name))
            twx.load(family.game, "")
            assert [t.seed for t in family.make_tasks("train", 1000)] == sorted(twx.getValidSeedsTrain()), name
            assert [t.seed for t in family.make_tasks("heldout", 1000)] == sorted(twx.getValidSeedsTest()), name
    finally:
        twx.load("coin", CoinFamily(COIN_ENV).game_params())


def test_game_options_map_to_twx_parameters_and_foreign_ones_are_refused() -> None:
    assert CoinFamily(COIN_ENV).game_params() == "numLocations=4,includeDoors=1,numDistractorItems=0"
    coin = CoinFamily(EnvConfig(twx=TwxOptions(num_locations=6, include_doors=False)))
    assert coin.game_params() == "numLocations=6,includeDoors=0,numDistractorItems=0"
    assert get_family(EnvConfig(family="twx-cookingworld")).game_params() == ""  # TWX's own defaults
    assert get_family(EnvConfig(family="twx-twc", twx=TwxOptions(num_locations=2))).game_params() == "numLocations=2"
    with pytest.raises(ValueError, match=r"env.twx.num_locations does not apply to twx-sorting \(its options: none\)"):
        get_family(EnvConfig(family="twx-sorting", twx=TwxOptions(num_locations=3)))
    with pytest.raises(ValueError, match=r"env\.twx\.num_distractor_items does not apply to twx-twc"):
        EnvPool(EnvConfig(family="twx-twc", twx=TwxOptions(num_distractor_items=1)), size=1)


@pytest.mark.parametrize(("family", "options", "message"), [
    ("twx-coin", TwxOptions(num_locations=12), "less than or equal to 11"),
    ("twx-mapreader", TwxOptions(num_locations=4), "No locations could be found that distance apart"),  # at reset
])
def test_options_the_game_refuses_fail_at_start_with_twx_reason(family: str, options: TwxOptions,
                                                                message: str) -> None:
    with EnvPool(EnvConfig(family=family, twx=options), size=1) as pool, pytest.raises(ValueError) as refused:
        pool.sessions(1)
    assert "could not start" in str(refused.value) and message in str(refused.value)


def test_every_family_prompts_its_task_and_the_turn_format() -> None:
    prompts = {name: family_class(name).default_system_prompt for name in TWX}
    assert len(set(prompts.values())) == len(TWX)
    for prompt in prompts.values():
        assert render_turn("your reasoning", "your command") in prompt


# --- every family, through its worker pool ----------------------------------------------------------------------


def test_group_members_start_from_identical_observations(pool: EnvPool) -> None:
    first, second = pool.sessions(2)
    tasks = get_family(pool.env).make_tasks("heldout", 5, start=10)
    observations = [(first.reset(task), first.admissible_commands()) for task in tasks]
    assert [(second.reset(task), second.admissible_commands()) for task in tasks] == observations
    assert len({observation for observation, _ in observations}) == len(tasks)  # different games look different
    for observation, admissible in observations:
        assert "look around" in admissible and admissible == sorted(admissible)
        assert "look around" not in observation  # the command list is not in the text


def test_the_expert_wins_and_its_replay_wins_in_another_worker(pool: EnvPool) -> None:
    family = get_family(pool.env)
    tasks = family.make_tasks("train", 6, start=40)
    episodes = pool.expert_episodes(tasks)
    if family.name not in RANDOM_WALKTHROUGH:
        assert pool.expert_episodes(tasks) == episodes
    replay = pool.sessions(2)[1]
    for task, turns in zip(tasks, episodes, strict=True):
        observation = replay.reset(task)
        for turn in turns:
            assert turn.observation == observation
            assert turn.action in replay.admissible_commands()
            assert len(turn.think.split()) <= 15
            assert parse_turn(render_turn(turn.think, turn.action)).action == turn.action
            result = replay.step(turn.action)
            observation = result.observation
        assert (result.won, result.done, result.score) == (True, True, 1.0)


def test_random_admissible_play_is_well_formed_and_stops_at_max_turns(pool: EnvPool) -> None:
    """Random play: each step is well formed, rewards add up to the score, and the episode stops in time."""
    session = pool.sessions(1)[0]
    rng = random.Random(0)
    limit = pool.env.max_turns
    for task in get_family(pool.env).make_tasks("train", 5, start=200):
        assert session.reset(task)
        total, steps = 0.0, 0
        while steps < limit:
            result = session.step(rng.choice(session.admissible_commands()))
            steps += 1
            assert result.observation and 0.0 <= result.score <= 1.0 and (not result.won or result.done)
            total += result.reward
            if result.done:
                break
        assert steps <= limit
        assert total == pytest.approx(result.score) or (result.done and not result.won)  # a loss may go below 0


def test_a_killed_jvm_is_an_env_error_and_leaves_no_process_behind(pool: EnvPool) -> None:
    broken, other = pool.sessions(2)
    task = get_family(pool.env).make_tasks("train", 1)[0]
    broken.reset(task)
    (jvm,) = children(broken.pid)
    os.kill(jvm, signal.SIGKILL)
    with pytest.raises(EnvError, match=f"TextWorldExpress failed during step 'look around' \\({task.task_id}\\)"):
        broken.step("look around")
    assert other.reset(task)
    replacement = pool.sessions(2)[0]
    assert replacement is not broken and gone(broken.pid)
    assert replacement.reset(task) == other.reset(task)


def test_close_leaves_no_worker_or_jvm() -> None:
    pool = EnvPool(COIN_ENV, size=2)
    processes = [pid for session in pool.sessions(2) for pid in (session.pid, *children(session.pid))]
    assert len(processes) == 4 and all(alive(pid) for pid in processes)
    pool.close()
    assert gone(*processes)


# --- coin specifics ----------------------------------------------------------------------------------------------


def test_coin_experts_fit_the_default_turn_limit(coin: TwxSession) -> None:
    family = CoinFamily(COIN_ENV)
    lengths = [len(family.expert_turns(task, coin)) for task in family.make_tasks("train", 50)]
    assert max(lengths) <= COIN_ENV.max_turns and min(lengths) == 1


def test_coin_expert_reasons_from_what_it_sees(coin: TwxSession) -> None:
    family = CoinFamily(COIN_ENV)
    for task in family.make_tasks("train", 10, start=40):
        turns = family.expert_turns(task, coin)
        assert turns[-1].action == "take coin" and "a coin" in turns[-1].observation
        assert turns[-1].think == "The coin is here, so I take it."
        assert all(turn.think.startswith("No coin here.") for turn in turns[:-1])


def test_a_wrong_action_does_not_win(coin: TwxSession) -> None:
    family = CoinFamily(COIN_ENV)
    task = next(t for t in family.make_tasks("train", 20) if len(family.expert_turns(t, coin)) > 1)
    assert coin.reset(task).startswith(COIN_TASK)
    for action in ("take coin", "xyzzy"):  # the coin is not in the first room
        result = coin.step(action)
        assert (result.done, result.won, result.reward, result.score) == (False, False, 0.0, 0.0)
        assert result.observation.startswith("Unknown action")
    assert "You are in the kitchen." in result.observation


def test_long_observations_keep_room_coin_and_exits(coin: TwxSession) -> None:
    family = CoinFamily(COIN_ENV)
    task = next(t for t in family.make_tasks("train", 20) if len(family.expert_turns(t, coin)) == 1)
    coin.reset(task)  # the coin lies in the kitchen, the room with the most furniture
    full = compact_observation("You open the door.", coin.look, 10_000)
    short = compact_observation("You open the door.", coin.look, len(full) - 40)
    assert len(short) < len(full)
    assert "more not shown" in short and "a coin" in short and "kitchen" in short
    assert short.splitlines()[-1] == full.splitlines()[-1]  # the exits
    assert compact_observation("You open the door.", coin.look, 16) == "You open the do…"


def test_other_games_keep_every_thing_and_their_feedback_lines() -> None:
    family = get_family(EnvConfig(family="twx-mapreader"))
    look = ("You are in the pantry. In one part of the room you see a white tie. There is also a fridge that is "
            "closed. You also see a coin. \nTo the South you see the chamber. ")
    assert family.next_observation(look, look) == ("You are in the pantry. You see: a white tie; a closed fridge; "
                                                   "a coin.\nTo the South you see the chamber.")
    assert family.next_observation("The map reads:\n  The canteen connects to the parlor.\n", look) == (
        "The map reads:\nThe canteen connects to the parlor.")
