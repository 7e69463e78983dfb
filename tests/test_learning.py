"""bench/learning.py's harness (how it reads, summarises and plots curves, how it reports a failed run) and the
CI-sized learning check: two DyPO iterations on the CI budget must not lower held-out success. That check is an
expected failure until the default config learns (docs/learning.md); the run it checks must still complete.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bench.common import PROJECT
from bench.learning import (
    CI_OVERRIDES,
    CurvePoint,
    RunSpec,
    area_under_curve,
    curve,
    plot,
    summary_table,
    train,
    write_csv,
)


def test_curves_are_summarised_and_plotted(tmp_path: Path) -> None:
    points = [CurvePoint(variant, seed, iteration, 60.0 * iteration, success)
              for variant, seed, successes in (("dypo", 0, [0.25, 0.5, 0.75]), ("dypo", 1, [0.25, 0.25, 0.75]),
                                               ("grpo", 0, [0.25, 0.25, 0.5]))
              for iteration, success in enumerate(successes)]
    assert area_under_curve(points[:3]) == pytest.approx(0.625)
    table = summary_table(points).splitlines()
    assert table[2] == "| dypo | 2 | 0.25 ± 0.00 | 0.75 ± 0.00 | 0.56 ± 0.06 | 2.0 ± 0.0 min |"
    assert table[3].startswith("| grpo | 1 | 0.25 ± 0.00 | 0.50 ± 0.00 | 0.38 ± 0.00 |")
    plot(points, tmp_path / "curves.png", "test")
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    write_csv(points, tmp_path / "curves.csv")
    with (tmp_path / "curves.csv").open() as rows:
        read = list(csv.DictReader(rows))
    assert len(read) == len(points)
    assert read[4] == {"variant": "dypo", "seed": "1", "iteration": "1", "wall_s": "60.0", "heldout_success": "0.2500"}


def test_a_run_without_its_evaluations_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="lacks an evaluate stage"):
        curve(RunSpec("dypo", 0, tmp_path / "missing"), iterations=1)


def test_a_failed_run_names_its_log(tmp_path: Path) -> None:
    spec = RunSpec("dypo", seed=0, directory=tmp_path / "bad")
    with pytest.raises(RuntimeError, match=r"dypo seed 0 failed .*dypo-s0\.log"):
        train(spec, PROJECT / "configs" / "tiny-cpu.yaml", iterations=1, extra=["rollout.group_size=1"],
              log_dir=tmp_path)
    assert "group_size" in (tmp_path / "dypo-s0.log").read_text()


@pytest.fixture(scope="module")
def ci_budget_curve(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[CurvePoint], Path]:
    """The default config on `bench/learning.py --quick`'s budget, from scratch: warmstart, then 2 iterations.

    Every evaluation plays the same held-out games greedily and the run is seeded end to end on one thread, so
    the outcome is the same on every run of the same code on the same machine.
    """
    runs = tmp_path_factory.mktemp("learning")
    spec = RunSpec("dypo", seed=0, directory=runs / "run")
    train(spec, PROJECT / "configs" / "tiny-cpu.yaml", iterations=2, extra=CI_OVERRIDES, log_dir=runs)
    return curve(spec, iterations=2), runs


@pytest.mark.slow
def test_the_ci_budget_trains_end_to_end_from_a_warmstart_that_leaves_room(ci_budget_curve) -> None:
    points, _ = ci_budget_curve
    assert [point.iteration for point in points] == [0, 1, 2]
    assert 0 < points[0].success < 1, f"the warmstart must leave room to learn, got {points[0].success}"
    assert points[0].wall_s == 0 < points[1].wall_s < points[2].wall_s


@pytest.mark.slow
@pytest.mark.xfail(raises=AssertionError, strict=False,
                   reason="the default config does not learn yet (docs/learning.md): 0.375 -> 0.438 -> 0.312 here")
def test_two_iterations_on_the_ci_budget_do_not_lower_heldout_success(ci_budget_curve) -> None:
    (before, *_, after), runs = ci_budget_curve
    assert after.success >= before.success, (
        f"held-out success fell from {before.success:.3f} to {after.success:.3f}; see {runs}/dypo-s0.log")
