"""The TextWorldExpress coin environment, played through real JVMs (one shared pool; each JVM costs ~0.5 s)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from dypo.stages.config import EnvConfig
from dypo.stages.environments import (
    EnvError,
    EnvPool,
    TwxSession,
    compact_observation,
    expert_turns,
    make_tasks,
)
from dypo.stages.turn_format import parse_turn, render_turn

ENV = EnvConfig()  # 4 locations with doors, no distractors: the embedded default
TASK_DESCRIPTION = "Your task is to search the environment and find the coin."


@pytest.fixture(scope="module")
def pool() -> Iterator[EnvPool]:
    with EnvPool(ENV, size=2) as pool:
        yield pool


@pytest.fixture
def session(pool: EnvPool) -> TwxSession:
    (session,) = pool.sessions(1)
    assert isinstance(session, TwxSession)
    return session


def test_tasks_are_deterministic_and_splits_disjoint() -> None:
    train, heldout = make_tasks(ENV, "train", 1000), make_tasks(ENV, "heldout", 1000)
    assert make_tasks(ENV, "train", 1000) == train
    assert not {t.seed for t in train} & {t.seed for t in heldout}
    assert len({t.task_id for t in train + heldout}) == 2000
    assert train[123].task_id == "twx-coin/train/000123"
    assert (train[0].family, train[0].task_type, train[0].split) == ("twx-coin", "coin", "train")
    assert make_tasks(ENV, "train", 5, start=3) == train[3:8]
    with pytest.raises(ValueError, match="has 1000"):
        make_tasks(ENV, "heldout", 2, start=999)


def test_split_seeds_are_the_twx_folds(session: TwxSession) -> None:
    twx = session._twx  # the seed lists are only available from a running game engine
    assert [t.seed for t in make_tasks(ENV, "train", 1000)] == sorted(twx.getValidSeedsTrain())
    assert [t.seed for t in make_tasks(ENV, "heldout", 1000)] == sorted(twx.getValidSeedsTest())


def test_same_task_gives_same_initial_observation_across_sessions(pool: EnvPool) -> None:
    first, second = pool.sessions(2)
    tasks = make_tasks(ENV, "heldout", 20)
    observations = [first.reset(task) for task in tasks]
    assert [second.reset(task) for task in tasks] == observations
    assert all(obs.startswith(TASK_DESCRIPTION) and len(obs) <= ENV.max_observation_chars for obs in observations)
    assert len(set(observations)) > 1


def test_expert_episodes_win_reproducibly_with_short_truthful_turns(pool: EnvPool) -> None:
    first, second = pool.sessions(2)
    for task in make_tasks(ENV, "train", 10, start=40):
        turns = expert_turns(ENV, task, first)
        assert expert_turns(ENV, task, second) == turns
        observation = second.reset(task)  # replaying the actions in another JVM shows the same game
        for turn in turns:
            assert turn.observation == observation
            assert turn.action in second.admissible_commands()
            assert len(turn.think.split()) <= 15
            assert parse_turn(render_turn(turn.think, turn.action)).action == turn.action
            result = second.step(turn.action)
            observation = result.observation
        assert (result.won, result.done, result.score, result.reward) == (True, True, 1.0, 1.0)
        assert turns[-1].action == "take coin" and "a coin" in turns[-1].observation
        assert turns[-1].think == "The coin is here, so I take it."


def test_expert_episodes_fit_the_default_turn_limit(session: TwxSession) -> None:
    lengths = [len(expert_turns(ENV, task, session)) for task in make_tasks(ENV, "train", 50)]
    assert max(lengths) <= ENV.max_turns and min(lengths) == 1


def test_a_wrong_action_does_not_win(session: TwxSession) -> None:
    task = next(t for t in make_tasks(ENV, "train", 20) if len(expert_turns(ENV, t, session)) > 1)
    session.reset(task)
    for action in ("take coin", "xyzzy"):  # the coin is not in the first room
        result = session.step(action)
        assert (result.done, result.won, result.reward, result.score) == (False, False, 0.0, 0.0)
        assert result.observation.startswith("Unknown action")
    assert "You are in the kitchen." in result.observation


def test_admissible_commands_are_listed_but_not_shown(session: TwxSession) -> None:
    observation = session.reset(make_tasks(ENV, "train", 1)[0])
    commands = session.admissible_commands()
    assert "look around" in commands and commands == sorted(commands)
    assert "look around" not in observation and "move " not in observation


def test_long_observations_keep_room_coin_and_exits(session: TwxSession) -> None:
    task = next(t for t in make_tasks(ENV, "train", 20) if len(expert_turns(ENV, t, session)) == 1)
    session.reset(task)  # the coin lies in the kitchen, the room with the most furniture
    full = compact_observation("You open the door.", session.look, 10_000)
    short = compact_observation("You open the door.", session.look, len(full) - 40)
    assert len(short) < len(full)
    assert "more not shown" in short and "a coin" in short and "kitchen" in short
    assert short.splitlines()[-1] == full.splitlines()[-1]  # the exits
    assert compact_observation("You open the door.", session.look, 16) == "You open the do…"


def test_pool_reuses_its_jvms(pool: EnvPool) -> None:
    first = pool.sessions(2)
    again = pool.sessions(1) + pool.sessions(2)[1:]
    assert all(a is b for a, b in zip(first, again, strict=True))
    assert len({session.jvm_pid for session in again}) == 2
    with pytest.raises(ValueError, match="pool of size 2"):
        pool.sessions(3)


def test_a_crashed_jvm_raises_env_error_and_is_replaced() -> None:
    with EnvPool(ENV, size=1) as pool:
        (session,) = pool.sessions(1)
        task = make_tasks(ENV, "train", 1)[0]
        session.reset(task)
        os.kill(session.jvm_pid, signal.SIGKILL)
        with pytest.raises(EnvError, match="twx-coin/train/000000"):
            session.step("look around")
        (replacement,) = pool.sessions(1)
        assert replacement is not session
        assert replacement.reset(task).startswith(TASK_DESCRIPTION)


def test_unsupported_game_sizes_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="less than or equal to 11"):
        TwxSession(EnvConfig(num_locations=12))
