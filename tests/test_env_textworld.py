"""The TextWorld generated-game families, played on TextWorld's real generator and engine.

Making a game costs a few seconds, so the tests share one game cache for the session and play few games: the first
train game of each family (small difficulty settings), and one more for the group test.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dypo.stages.config import EnvConfig, TextWorldOptions
from dypo.stages.environments import EnvPool, Status, get_family
from dypo.stages.environments import textworld_games as tw
from dypo.stages.environments.textworld_games import (
    CoinFamily,
    CookingFamily,
    GameSpec,
    TextWorldSession,
    ensure_game,
    first_observation,
    step_observation,
)
from dypo.stages.turn_format import parse_turn, render_turn

FAMILIES = ["textworld-coin", "textworld-treasure", "textworld-cooking"]
OPTIONS = {"coin_level": 3, "treasure_level": 3, "train_games": 4, "heldout_games": 2}


@pytest.fixture(scope="session")
def games_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("textworld-games")


def env_config(family: str, games_dir: Path, **options: object) -> EnvConfig:
    return EnvConfig(family=family, max_turns=8,
                     textworld=TextWorldOptions(**{**OPTIONS, "games_dir": str(games_dir), **options}))


@pytest.fixture(scope="module")
def coin(games_dir: Path) -> Iterator[TextWorldSession]:
    session = CoinFamily(env_config("textworld-coin", games_dir)).open_session()
    yield session
    session.close()


def test_tasks_are_deterministic_and_splits_disjoint(games_dir: Path) -> None:
    family = get_family(env_config("textworld-coin", games_dir, train_games=1000, heldout_games=100))
    train, heldout = family.make_tasks("train", 1000), family.make_tasks("heldout", 100)
    assert family.make_tasks("train", 1000) == train and family.make_tasks("train", 3, start=5) == train[5:8]
    assert not {t.seed for t in train} & {t.seed for t in heldout}
    assert (train[42].task_id, train[42].seed, train[42].task_type) == (
        "textworld-coin/train/000042", 42, "coin_collector-level3")
    assert (heldout[0].task_id, heldout[0].seed) == ("textworld-coin/heldout/000000", 1_000_000)
    with pytest.raises(ValueError, match="the heldout split has 100 textworld-coin games"):
        family.make_tasks("heldout", 2, start=99)
    with pytest.raises(ValueError, match="no split 'test'"):
        family.task_count("test")
    cooking = get_family(env_config("textworld-cooking", games_dir))
    assert cooking.spec("train", 0).settings["split"] == "train"
    assert cooking.spec("heldout", 0).settings["split"] == "test"  # foods never trained on, by default
    seen = get_family(env_config("textworld-cooking", games_dir, cooking_heldout_foods="seen"))
    assert seen.spec("heldout", 0).settings["split"] == "train"
    assert cooking.make_tasks("train", 1)[0].task_type == "cooking-recipe1-take1-go1-open-splittrain"


def test_bad_options_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"cooking_take \(3\) cannot exceed cooking_recipe \(2\)"):
        TextWorldOptions(cooking_recipe=2, cooking_take=3)
    with pytest.raises(ValueError, match=r"coin_level 250 needs 150 rooms; TextWorld 1\.7 games hold at most 100"):
        TextWorldOptions(coin_level=250)
    with pytest.raises(ValueError, match="less than or equal to 30"):
        TextWorldOptions(treasure_level=31)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_walkthrough_expert_wins_in_a_worker_and_every_command_was_admissible(name: str, games_dir: Path) -> None:
    env = env_config(name, games_dir)
    task = get_family(env).make_tasks("train", 1)[0]
    with EnvPool(env, size=1) as pool:
        (turns,) = pool.expert_episodes([task])
        session = pool.sessions(1)[0]
        assert session.reset(task) == turns[0].observation
        for index, turn in enumerate(turns):
            assert turn.action in session.admissible_commands(), (index, turn.action)
            rendered = render_turn(turn.think, turn.action)
            assert not parse_turn(rendered, admissible=session.admissible_commands()).malformed
            result = session.step(turn.action)
            assert result.done == (index == len(turns) - 1)
            assert index == len(turns) - 1 or result.observation == turns[index + 1].observation
    assert (result.won, result.score, result.observation.endswith("*** The End ***")) == (True, 1.0, True)
    first = turns[0].observation
    assert "$$$$" not in first and not any(line.startswith(">") for line in first.splitlines())
    assert all(turn.think and turn.think != f"Next I {turn.action}." for turn in turns)


def test_random_play_ends_within_max_turns_with_consistent_scores(coin: TextWorldSession, games_dir: Path) -> None:
    family = get_family(env_config("textworld-coin", games_dir))
    task = family.make_tasks("train", 1)[0]
    rng = random.Random(0)
    for _ in range(3):
        coin.reset(task)
        total, steps = 0.0, 0
        for steps in range(1, family.env.max_turns + 1):  # noqa: B007 - the count is checked below
            result = coin.step(rng.choice(coin.admissible_commands()))
            total += result.reward
            assert 0.0 <= result.score <= 1.0 and result.observation and not result.observation.startswith(">")
            if result.done:
                break
        assert steps <= family.env.max_turns
        assert total == pytest.approx(result.score)


def test_group_members_start_identically_and_one_worker_makes_the_game(games_dir: Path, tmp_path: Path) -> None:
    """Two workers reset the same uncached game at once: one makes it while the other waits for it.

    ~25 s on a loaded 2-core machine: two workers start, and the game is made twice (the second time to compare).
    """
    env = env_config("textworld-coin", games_dir)
    task = get_family(env).make_tasks("train", 1, start=1)[0]
    with EnvPool(env, size=2) as pool:
        sessions = pool.sessions(2)
        with ThreadPoolExecutor(2) as threads:
            first = list(threads.map(lambda session: session.reset(task), sessions))
        assert first[0] == first[1]
        assert sessions[0].admissible_commands() == sessions[1].admissible_commands()
        assert sessions[0].step("look") == sessions[1].step("look")
    spec = get_family(env).spec("train", 1)
    made = tw.game_directory(games_dir, spec, "train")
    assert sorted(path.name for path in made.parent.iterdir() if path.name.startswith(made.name)) == [
        made.name, made.name + ".lock"]
    again = ensure_game(tmp_path, spec, "train").parent  # made anew by another interpreter: byte-identical
    assert {f.name: f.read_bytes() for f in made.iterdir()} == {f.name: f.read_bytes() for f in again.iterdir()}


def test_show_admissible_commands_appends_them(coin: TextWorldSession, games_dir: Path) -> None:
    family = get_family(env_config("textworld-coin", games_dir, show_admissible_commands=True))
    session = family.open_session()
    try:
        observation = session.reset(family.make_tasks("train", 1)[0])
        assert observation.endswith(f"Admissible commands: {', '.join(session.admissible_commands())}.")
    finally:
        session.close()


def test_observation_cleanup_on_textworld_text() -> None:
    banner = "\n\n  ________  ____\n |$$$$$$$$|\n\nGet the coin!\n\n-= Attic =-\nAn attic.\n\n"
    assert first_observation(banner, "Get the coin!") == "Get the coin!\n-= Attic =-\nAn attic."
    end = ("You pick up the coin.\n\n\n   *** The End ***\n\nYou scored 1 out of a possible 1.\n\nWould you like to "
           "RESTART, RESTORE a saved game, QUIT or UNDO the last command?\n>  -= Attic =-1/2")
    assert step_observation(end) == "You pick up the coin.\n*** The End ***"
    assert step_observation("You go east.\n\n>      -= Hall =-0/3") == "You go east."


def test_failures_are_named(coin: TextWorldSession, games_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"TextWorld could not make the tw-coin_collector game \{'level': 0\} "
                                           r"seed 3: ValueError: Expected level to be within \[1-300\]\.$"):
        ensure_game(tmp_path, GameSpec("tw-coin_collector", {"level": 0}, 3), "train")
    assert not any(tmp_path.rglob("*.z8"))  # nothing half-made is left behind
    cooking_task = CookingFamily(env_config("textworld-cooking", games_dir)).make_tasks("train", 1)[0]
    with pytest.raises(ValueError, match="is not a textworld-coin task"):
        coin.reset(cooking_task)
    fresh = CoinFamily(env_config("textworld-coin", games_dir)).open_session()
    with pytest.raises(RuntimeError, match="call reset"):
        fresh.step("look")
    with pytest.raises(ValueError, match="needs a TextWorld session"):
        CookingFamily(env_config("textworld-cooking", games_dir)).expert_turns(cooking_task, coin)


def test_availability_names_the_pinned_version(monkeypatch: pytest.MonkeyPatch) -> None:
    assert CoinFamily.availability(EnvConfig()).status == Status.AVAILABLE
    monkeypatch.setattr(tw.importlib.metadata, "version", lambda package: "1.6.2")
    found = CoinFamily.availability(EnvConfig())
    assert found.status == Status.NOT_INSTALLED and "textworld 1.6.2 is installed" in found.detail
    assert found.enable == "pip install textworld==1.7.0"
