"""Stage `evaluate`: greedy play on held-out tasks; metrics to Parquet and MLflow; the `champion` gate.

Held-out tasks come from a game fold the training draws never touch, and decoding is greedy, so the success rate
of two iterations is compared on identical games with no sampling noise.
"""

from __future__ import annotations

from collections import defaultdict

from dypo.schemas.tables import EVAL_METRICS
from dypo.stages import tracking
from dypo.stages.commit import StageOutcome, commit_stage, input_digest, require_committed
from dypo.stages.config import SamplingConfig
from dypo.stages.context import RunContext
from dypo.stages.environments import make_tasks
from dypo.stages.episodes import play, summarize, write_episodes
from dypo.stages.trajectory import EpisodeRecord, EpisodeSpec


def metric_rows(ctx: RunContext, iteration: int, records: list[EpisodeRecord]) -> list[dict]:
    """One row per task type plus an `all` row."""
    by_type: dict[str, list[EpisodeRecord]] = defaultdict(list)
    for record in records:
        by_type[record.spec.task.task_type].append(record)
        by_type["all"].append(record)
    return [{"run": ctx.run_name, "iteration": iteration, "task_type": task_type,
             **summarize(group, ctx.config.rollout)} for task_type, group in sorted(by_type.items())]


def evaluate(ctx: RunContext, iteration: int, force: bool = False) -> StageOutcome:
    policy, _ = ctx.checkpoint(iteration)
    published = require_committed(ctx.store, "publish", iteration)
    cfg = ctx.config.evaluate
    digest = input_digest("evaluate", ctx.config.section("env", "evaluate", "rollout"), [policy, published],
                          {"iteration": iteration})

    def body(writer):
        tasks = make_tasks(ctx.config.env, "heldout", cfg.tasks)
        specs = [EpisodeSpec(task, task.task_id, task.task_id) for task in tasks]
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
        result = play(ctx, iteration, specs, greedy, cfg.batch_episodes, seed=0, label=f"iter {iteration} evaluate")
        write_episodes(writer, ctx, iteration, draw=0, result=result)
        rows = metric_rows(ctx, iteration, result.records)
        writer.write_rows("metrics.parquet", rows, EVAL_METRICS)
        success = next(r["success_rate"] for r in rows if r["task_type"] == "all")
        promoted = tracking.gate_champion(ctx, published.manifest.details["version"], success)
        writer.metrics["promoted"] = float(promoted)
        writer.details["champion_moved"] = str(promoted)

    return commit_stage(ctx.store, "evaluate", iteration, digest, [policy, published], force, body)
