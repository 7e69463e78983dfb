"""Rejection sampling decisions (DESIGN.md §1.4) on hand-made episode rows."""

import pytest

from dypo.stages.config import FilterConfig
from dypo.stages.filter import select


def episode(group, index, ret, draw=0, turns=4, malformed=0, tokens=500, termination="won", format_errors=None):
    """An episodes.parquet row; its malformed turns all break the format unless format_errors says fewer do."""
    return {"run": "r", "iteration": 1, "task_id": f"t-{group}", "group_id": group, "episode_id": f"{group}-{index}",
            "draw": draw, "return": ret, "turns": turns, "malformed_turns": malformed,
            "format_error_turns": malformed if format_errors is None else format_errors, "total_tokens": tokens,
            "termination": termination}


def reasons(rows):
    return {r["episode_id"]: r["reason"] for r in rows}


def test_zero_variance_groups_are_rejected_and_others_get_group_advantages():
    rows = select([episode("a", 0, 1.0), episode("a", 1, 1.0), episode("b", 0, 1.0), episode("b", 1, 0.0)],
                  FilterConfig(target_groups=1, max_extra_draws=0), last_draw=True)
    assert reasons(rows) == {"a-0": "zero_variance", "a-1": "zero_variance", "b-0": "accepted", "b-1": "accepted"}
    advantages = {r["episode_id"]: r["advantage"] for r in rows}
    assert advantages["a-0"] is None
    assert advantages["b-0"] == pytest.approx(1.0, abs=1e-4)
    assert advantages["b-1"] == pytest.approx(-1.0, abs=1e-4)


def test_over_generation_and_engine_failures_are_rejected_per_episode():
    rows = select([
        episode("g", 0, 1.0), episode("g", 1, 0.0), episode("g", 2, 0.0, malformed=3, turns=4),
        episode("g", 3, 0.0, tokens=10_000), episode("g", 4, 0.0, termination="env_error"),
        episode("g", 5, 0.0, termination="env_timeout"),
    ], FilterConfig(target_groups=1, max_extra_draws=0, max_malformed_fraction=0.5, max_episode_tokens=4096),
        last_draw=True)
    assert reasons(rows) == {"g-0": "accepted", "g-1": "accepted", "g-2": "malformed_fraction",
                             "g-3": "too_long", "g-4": "env_error", "g-5": "env_timeout"}
    assert [r["accepted"] for r in rows] == [True, True, False, False, False, False]


def test_inadmissible_commands_do_not_count_as_over_generation():
    """An episode that loses by saying commands the game cannot run is kept, so its negative advantage trains."""
    rows = select([episode("g", 0, 1.0), episode("g", 1, -0.4, malformed=4, turns=4, format_errors=0),
                   episode("g", 2, -0.3, malformed=3, turns=4, format_errors=3)],
                  FilterConfig(target_groups=1, max_extra_draws=0, max_malformed_fraction=0.5), last_draw=True)
    assert reasons(rows) == {"g-0": "accepted", "g-1": "accepted", "g-2": "malformed_fraction"}
    assert [r["advantage"] < 0 for r in rows if r["accepted"]] == [False, True]


def test_a_version_1_0_episode_row_counts_every_malformed_turn():
    old = {k: v for k, v in episode("g", 2, 0.0, malformed=3, turns=4).items() if k != "format_error_turns"}
    rows = select([episode("g", 0, 1.0), episode("g", 1, 0.0), old],
                  FilterConfig(target_groups=1, max_extra_draws=0, max_malformed_fraction=0.5), last_draw=True)
    assert reasons(rows)["g-2"] == "malformed_fraction"


def test_without_zero_variance_rejection_an_all_equal_group_is_kept_with_zero_advantage():
    """Plain GRPO keeps such groups; they add tokens with A = 0 to the batch mean and no gradient of their own."""
    rows = select([episode("a", 0, 1.0), episode("a", 1, 1.0), episode("b", 0, 1.0), episode("b", 1, 0.0)],
                  FilterConfig(target_groups=2, max_extra_draws=0, reject_zero_variance=False), last_draw=True)
    assert all(r["accepted"] for r in rows)
    assert [r["advantage"] for r in rows if r["group_id"] == "a"] == [0.0, 0.0]


def test_a_group_left_with_one_survivor_is_too_small():
    rows = select([episode("g", 0, 1.0), episode("g", 1, 0.0, termination="env_error")],
                  FilterConfig(target_groups=1, max_extra_draws=0), last_draw=True)
    assert reasons(rows)["g-0"] == "group_too_small"


def test_groups_beyond_the_target_are_not_taken_in_draw_order():
    eps = [episode(g, i, float(i), draw=d) for d, g in [(1, "late"), (0, "early1"), (0, "early2")] for i in (0, 1)]
    rows = select(eps, FilterConfig(target_groups=2, max_extra_draws=1), last_draw=True)
    assert {r["group_id"] for r in rows if r["accepted"]} == {"early1", "early2"}
    assert {r["reason"] for r in rows if r["group_id"] == "late"} == {"over_target"}


@pytest.mark.parametrize(("keep", "last", "expected"), [(True, True, "accepted"), (False, True, "batch_short"),
                                                       (False, False, "accepted")])
def test_short_last_draw_keeps_or_drops_the_partial_batch(keep, last, expected):
    rows = select([episode("g", 0, 1.0), episode("g", 1, 0.0)],
                  FilterConfig(target_groups=2, max_extra_draws=1, keep_partial_last_draw=keep), last_draw=last)
    assert {r["reason"] for r in rows} == {expected}
    assert all((r["advantage"] is None) == (expected != "accepted") for r in rows)
