"""Learning curves: held-out success over DyPO iterations, for the default config and its ablations, over seeds.

Every (variant, seed) is a fresh `dypo train` run (warmstart, then DyPO iterations, each followed by the greedy
held-out evaluation of the evaluate stage) in a process and run directory of its own, so a variant is exactly
what a user gets from the same command with the same flags. The curves are read back from the runs' committed
evaluate manifests: held-out success after each iteration, against wall time since the warmstart's evaluation
(the RL phase, evaluations included). Two runs go at once, one torch thread each, on the 2 cores here.

Variants (each one flag away from the default, see configs/presets/):
- dypo: the config as given;
- kl-on: KL penalty to the frozen warmstart policy (optimize.kl_coef 0.04);
- no-obs-mask: observation tokens carry loss too;
- no-resampling: no auxiliary draws (filter.max_extra_draws 0);
- no-std-norm: advantages centred but not divided by the group's std;
- per-turn: one sample per turn instead of one sequence per episode;
- token-mean: DAPO's token-level loss (every generated token weighs the same) instead of the per-episode mean;
- grpo: the GRPO preset (KL on, no rejection, no resampling).

Writes `<out>.csv` (one row per run and iteration) and `<out>.png` (mean ± std over seeds), and prints the
summary table (final success, area under the curve, wall time) as Markdown.

    .venv/bin/python -m bench.learning [--quick] [--config configs/tiny-cpu.yaml] [--seeds 0 1 2]
        [--variants dypo kl-on ...] [--iterations N] [--out docs/img/learning-tiny-cpu]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.common import PROJECT, load_note
from dypo.stages.commit import read_committed
from dypo.stages.storage import RunStore

VARIANTS: dict[str, list[str]] = {
    "dypo": [],
    "kl-on": ["--set", "optimize.kl_coef=0.04"],
    "no-obs-mask": ["--set", "optimize.mask_observations=false"],
    "no-resampling": ["--set", "filter.max_extra_draws=0"],
    "no-std-norm": ["--set", "filter.std_normalize=false"],
    "per-turn": ["--set", "optimize.sample_form=per_turn"],
    "token-mean": ["--set", "optimize.loss_aggregation=token_mean"],
    "grpo": ["--preset", "grpo"],
}
# The CI-sized budget of --quick and of tests/test_learning.py's learning check (docs/learning.md): a shorter
# warmstart that still wins some held-out games (6 of 16 here), and small draws.
CI_OVERRIDES = ["warmstart.expert_tasks=96", "warmstart.steps=100", "model.tokenizer_corpus_tasks=96",
                "rollout.groups=4", "rollout.group_size=4", "filter.target_groups=2", "filter.max_extra_draws=1",
                "evaluate.tasks=16"]


@dataclass(frozen=True)
class RunSpec:
    variant: str
    seed: int
    directory: Path


@dataclass(frozen=True)
class CurvePoint:
    variant: str
    seed: int
    iteration: int
    wall_s: float  # since the warmstart's evaluation was committed
    success: float  # held-out success rate (greedy), the evaluate stage's gating split


def train(spec: RunSpec, config: Path, iterations: int, extra: list[str], log_dir: Path) -> None:
    """One `dypo train` run in a process of its own (resumes when the run directory exists)."""
    overrides = [f"run.seed={spec.seed}", f"run.iterations={iterations}", f"run.name={spec.variant}-s{spec.seed}",
                 *extra]
    command = [sys.executable, "-m", "dypo.cli", "train", "--config", str(config), "--run", str(spec.directory),
               *VARIANTS[spec.variant], *[arg for value in overrides for arg in ("--set", value)]]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "DYPO_STATE_DIR": str(spec.directory / ".state")}
    log = log_dir / f"{spec.variant}-s{spec.seed}.log"
    with log.open("w") as output:
        finished = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=environment, cwd=PROJECT)
    if finished.returncode != 0:
        raise RuntimeError(f"{spec.variant} seed {spec.seed} failed (exit {finished.returncode}); see {log}")


def curve(spec: RunSpec, iterations: int) -> list[CurvePoint]:
    """Held-out success after the warmstart and after each iteration, from the run's evaluate manifests."""
    store = RunStore(str(spec.directory))
    evaluations = [read_committed(store, "evaluate", iteration) for iteration in range(iterations + 1)]
    if any(evaluation is None for evaluation in evaluations):
        raise RuntimeError(f"{spec.directory} lacks an evaluate stage of iterations 0..{iterations}; rerun it")
    start = evaluations[0].manifest.created_at
    return [CurvePoint(spec.variant, spec.seed, evaluation.manifest.iteration,
                       (evaluation.manifest.created_at - start).total_seconds(),
                       evaluation.manifest.metrics["success_rate"]) for evaluation in evaluations]


def area_under_curve(points: list[CurvePoint]) -> float:
    """Mean held-out success over the iterations after the warmstart: 1.0 means solved from the first update."""
    after = [point.success for point in points if point.iteration > 0]
    return sum(after) / len(after)


def write_csv(points: list[CurvePoint], path: Path) -> None:
    with path.open("w", newline="") as output:
        writer = csv.writer(output)
        writer.writerow(["variant", "seed", "iteration", "wall_s", "heldout_success"])
        for point in points:
            writer.writerow([point.variant, point.seed, point.iteration, f"{point.wall_s:.1f}", f"{point.success:.4f}"])


def plot(points: list[CurvePoint], path: Path, title: str) -> None:
    """Mean ± std over seeds of held-out success per iteration, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for variant in dict.fromkeys(point.variant for point in points):
        iterations = sorted({point.iteration for point in points if point.variant == variant})
        runs = [[p.success for p in points if p.variant == variant and p.iteration == i] for i in iterations]
        mean = [statistics.fmean(values) for values in runs]
        spread = [statistics.pstdev(values) for values in runs]
        axes.plot(iterations, mean, marker="o", label=variant)
        axes.fill_between(iterations, [m - s for m, s in zip(mean, spread, strict=True)],
                          [m + s for m, s in zip(mean, spread, strict=True)], alpha=0.15)
    axes.set(xlabel="DyPO iteration (0 = warmstart)", ylabel="held-out success (greedy)", ylim=(0, 1), title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def summary_table(points: list[CurvePoint]) -> str:
    """Markdown: per variant, warmstart and final held-out success, area under the curve and RL wall time."""
    lines = ["| variant | seeds | warmstart success | final success | area under curve | RL wall time |",
             "|---|---|---|---|---|---|"]
    for variant in dict.fromkeys(point.variant for point in points):
        runs = [[p for p in points if p.variant == variant and p.seed == seed]
                for seed in dict.fromkeys(p.seed for p in points if p.variant == variant)]

        def spread(values: list[float], digits: int = 2) -> str:
            return f"{statistics.fmean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"

        start, final = spread([run[0].success for run in runs]), spread([run[-1].success for run in runs])
        area = spread([area_under_curve(run) for run in runs])
        minutes = spread([run[-1].wall_s / 60 for run in runs], 1)
        lines.append(f"| {variant} | {len(runs)} | {start} | {final} | {area} | {minutes} min |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, two iterations, the CI budget")
    parser.add_argument("--config", type=Path, default=PROJECT / "configs" / "tiny-cpu.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--iterations", type=int, default=None, help="DyPO iterations (default: the config's)")
    parser.add_argument("--runs", type=Path, default=PROJECT / "runs" / "learning", help="run directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV and PNG path prefix (default: docs/img/learning-<config>)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once (one torch thread each)")
    args = parser.parse_args()
    from dypo.stages.config import load_config

    iterations = args.iterations or load_config(args.config).run.iterations
    seeds, variants, extra = args.seeds, args.variants, []
    if args.quick:
        seeds, variants, iterations, extra = seeds[:1], ["dypo"], 2, CI_OVERRIDES
    runs = args.runs / ("quick" if args.quick else args.config.stem)
    out = args.out or (runs if args.quick else PROJECT / "docs" / "img") / f"learning-{args.config.stem}"
    runs.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    specs = [RunSpec(variant, seed, runs / f"{variant}-s{seed}") for variant in variants for seed in seeds]
    print(f"{len(specs)} runs of {args.config.name} ({', '.join(variants)} x seeds {seeds}), {iterations} "
          f"iterations each, {args.parallel} at a time; logs and runs under {runs}", flush=True)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(lambda spec: train(spec, args.config, iterations, extra, runs), specs))
    points = [point for spec in specs for point in curve(spec, iterations)]
    write_csv(points, out.with_suffix(".csv"))
    plot(points, out.with_suffix(".png"), f"{args.config.stem}: held-out success, mean ± std over {len(seeds)} seeds")
    print(summary_table(points))
    print(f"curves: {out.with_suffix('.csv')}, plot: {out.with_suffix('.png')}; {load_note()}")
    default = [p for p in points if p.variant == variants[0] and p.iteration == iterations]
    print(f"final_heldout_success: {statistics.fmean(p.success for p in default):.3f}")


if __name__ == "__main__":
    main()
