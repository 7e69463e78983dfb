"""The ScienceWorld family, played on ScienceWorld's real engine (its bundled JVM).

A JVM starts in ~3 s and the first task load takes several more, so the tests share one in-process session and
start workers only where the worker path itself is tested.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from dypo.stages.config import EnvConfig, ScienceWorldOptions
from dypo.stages.environments import EnvPool, Status, get_family
from dypo.stages.environments import scienceworld as sw
from dypo.stages.environments.scienceworld import (
    VARIATIONS,
    ScienceWorldFamily,
    ScienceWorldSession,
    expert_think,
    variation_range,
)
from dypo.stages.trajectory import Task

ENV = EnvConfig(family="scienceworld", max_turns=12)
SHORT = ["find-non-living-thing", "power-component", "identify-life-stages-1"]  # tasks with short gold paths
SHORT_ENV = ENV.model_copy(update={"scienceworld": ScienceWorldOptions(task_names=SHORT)})


@pytest.fixture(scope="module")
def pool() -> Iterator[EnvPool]:
    """Two workers playing the short tasks."""
    with EnvPool(SHORT_ENV, size=2) as pool:
        yield pool


@pytest.fixture(scope="module")
def session() -> Iterator[ScienceWorldSession]:
    session = ScienceWorldFamily(ENV).open_session()
    yield session
    session.close()


def short_tasks(split: str) -> list[Task]:
    return get_family(SHORT_ENV).make_tasks(split, len(SHORT))


def test_splits_deal_tasks_round_robin_from_scienceworlds_variation_splits() -> None:
    family = get_family(ENV)
    assert [family.task_count(split) for split in ("train", "heldout", "test")] == [3592, 1796, 1819]
    train = family.make_tasks("train", 3592)
    assert family.make_tasks("train", 4, start=29) == train[29:33]
    assert [t.task_id for t in train[:2]] == ["scienceworld/train/boil/0000",
                                              "scienceworld/train/change-the-state-of-matter-of/0000"]
    assert train[30].task_id == "scienceworld/train/boil/0001" and train[30].task_type == "boil"
    assert {t.task_type for t in train[:30]} == set(VARIATIONS)
    assert len({t.task_id for t in train}) == 3592
    heldout, test = family.make_tasks("heldout", 1796), family.make_tasks("test", 1819)
    for name in VARIATIONS:
        seen = [{t.seed for t in split if t.task_type == name} for split in (train, heldout, test)]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert heldout[0].task_id == "scienceworld/heldout/boil/0014"
    with pytest.raises(ValueError, match="the test split has 1819 scienceworld games"):
        family.make_tasks("test", 2, start=1818)
    with pytest.raises(ValueError, match="no split 'dev'"):
        family.task_count("dev")
    two = get_family(ENV.model_copy(update={"scienceworld": ScienceWorldOptions(task_names=["melt", "boil"])}))
    assert [t.task_id for t in two.make_tasks("train", 3)] == [
        "scienceworld/train/melt/0000", "scienceworld/train/boil/0000", "scienceworld/train/melt/0001"]
    with pytest.raises(ValueError, match="task_names lists an entry twice"):
        ScienceWorldOptions(task_names=["melt", "melt"])


def test_the_variation_table_matches_the_engine(session: ScienceWorldSession) -> None:
    engine = session.engine
    assert sorted(engine.get_task_names()) == sorted(VARIATIONS)
    for name in VARIATIONS:
        engine.load(name, 0, "")
        assert engine.get_variations_train() == list(variation_range(name, "train")), name
        assert engine.get_variations_dev() == list(variation_range(name, "heldout")), name
        assert engine.get_variations_test() == list(variation_range(name, "test")), name


def test_the_gold_path_expert_wins_in_workers(pool: EnvPool) -> None:
    tasks = short_tasks("train") + short_tasks("heldout")[:1]
    episodes = pool.expert_episodes(tasks)
    worker = pool.sessions(1)[0]
    turns = episodes[0]
    assert worker.reset(tasks[0]) == turns[0].observation
    for index, turn in enumerate(turns):
        result = worker.step(turn.action)
        assert index == len(turns) - 1 or result.observation == turns[index + 1].observation
    assert (result.done, result.won, result.score) == (True, True, 1.0)
    assert worker.admissible_commands() is None
    for task, turns in zip(tasks, episodes, strict=True):
        assert turns, task.task_id
        assert turns[0].observation.startswith("Your task is to") and "This room is called" in turns[0].observation
        assert all(not turn.think.startswith("Next I") for turn in turns), [t.action for t in turns]


def test_random_play_ends_within_max_turns_with_consistent_scores(session: ScienceWorldSession) -> None:
    rng = random.Random(0)
    for task in short_tasks("train"):
        session.reset(task)
        total, steps = 0.0, 0
        for steps in range(1, ENV.max_turns + 1):  # noqa: B007 - the count is checked below
            result = session.step(rng.choice(session.engine.get_valid_action_object_combinations()))
            total += result.reward
            assert 0.0 <= result.score <= 1.0 and result.observation
            if result.done:
                break
        assert steps <= ENV.max_turns
        assert total == pytest.approx(result.score) or (result.done and not result.won)


def test_group_members_start_identically(pool: EnvPool) -> None:
    task = short_tasks("test")[1]
    first, second = pool.sessions(2)
    assert first.reset(task) == second.reset(task)
    assert first.step("look around") == second.step("look around")


def test_a_wrong_focus_loses_and_reset_task_is_refused(session: ScienceWorldSession) -> None:
    task = short_tasks("train")[1]  # power-component: turn on the red light bulb
    observation = session.reset(task)
    refused = session.step("reset task")
    assert (refused.done, refused.won) == (False, False) and "cannot restart" in refused.observation
    assert session.step("look around").observation == observation.split("\n", 1)[1]  # the room, unchanged
    lost = session.step("focus on agent")
    assert (lost.done, lost.won, lost.score, lost.reward) == (True, False, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="call reset"):
        session.step("look around")


def test_tasks_of_other_families_or_splits_are_refused(session: ScienceWorldSession) -> None:
    wrong_split = Task("scienceworld/train/boil/0020", "scienceworld", "boil", "train", 20)  # a test variation
    with pytest.raises(ValueError, match="is not a scienceworld task"):
        session.reset(wrong_split)
    with pytest.raises(ValueError, match="is not a scienceworld task"):
        session.reset(Task("twx-coin/train/000001", "twx-coin", "coin", "train", 1))


def test_expert_thinks_name_what_each_command_does() -> None:
    assert expert_think("open door to kitchen") == "I open the door to the kitchen."
    assert expert_think("move metal pot to sink") == "I move the metal pot to the sink."
    assert expert_think("focus on red light bulb") == "I focus on the red light bulb, the thing this task is about."
    assert expert_think("1") == "The game asks which one I mean; I choose option 1."
    assert expert_think("wait1") == "I wait for the process to go on."


def test_availability_names_version_and_java(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ScienceWorldFamily.availability(ENV).status == Status.AVAILABLE
    monkeypatch.setattr(sw.shutil, "which", lambda name: None)
    assert "no `java` is on PATH" in ScienceWorldFamily.availability(ENV).detail
    monkeypatch.setattr(sw.importlib.metadata, "version", lambda package: "1.2.2")
    found = ScienceWorldFamily.availability(ENV)
    assert found.status == Status.NOT_INSTALLED and found.enable == "pip install scienceworld==1.2.3"
