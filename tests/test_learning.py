"""bench/learning.py's harness (how it reads, summarises and plots curves, how it reports a failed run) and the
CI-sized learning check: two DyPO iterations on the CI budget must not lower held-out success.
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


@pytest.mark.slow
def test_two_iterations_on_the_ci_budget_do_not_lower_heldout_success(tmp_path: Path) -> None:
    """The default config on `bench/learning.py --quick`'s budget, from scratch: warmstart, then 2 iterations.

    Every evaluation plays the same held-out games greedily, and the run is seeded end to end on one thread, so
    the outcome is the same on every run of the same code: not a flaky check, a fixed one that moves only when
    the algorithm does.
    """
    spec = RunSpec("dypo", seed=0, directory=tmp_path / "run")
    train(spec, PROJECT / "configs" / "tiny-cpu.yaml", iterations=2, extra=CI_OVERRIDES, log_dir=tmp_path)
    before, *_, after = curve(spec, iterations=2)
    assert 0 < before.success < 1, f"the warmstart must leave room to learn, got {before.success}"
    assert after.success >= before.success, (
        f"held-out success fell from {before.success:.3f} to {after.success:.3f}; see {tmp_path}/dypo-s0.log")
