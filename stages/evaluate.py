"""Stage `evaluate`: greedy play on held-out tasks; metrics to Parquet and MLflow; the `champion` gate.

Held-out tasks come from a game fold the training draws never touch, and decoding is greedy, so the success rate
of two iterations is compared on identical games with no sampling noise. `evaluate.splits` may name more than one
fold (ALFWorld: `heldout` = valid_seen rooms, `unseen` = valid_unseen rooms); each gets its metrics, and the
first one gates the champion.
"""

from __future__ import annotations

from collections import defaultdict

from dypo.schemas.tables import EPISODES, EVAL_METRICS
from dypo.stages import tracking
from dypo.stages.commit import StageOutcome, StageWriter, commit_stage, input_digest, require_committed
from dypo.stages.config import SamplingConfig, check_sharding
from dypo.stages.context import RunContext
from dypo.stages.environments import get_family
from dypo.stages.episodes import episode_metrics, play, summarize, write_episodes
from dypo.stages.shards import Shard, ShardParts, commit_shard
from dypo.stages.trajectory import EpisodeSpec


def metric_rows(ctx: RunContext, iteration: int, episodes: list[dict]) -> list[dict]:
    """Per split, one row per task type plus an `all` row, from `episodes.parquet` rows."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for episode in episodes:
        groups[episode["split"], episode["task_type"]].append(episode)
        groups[episode["split"], "all"].append(episode)
    return [{"run": ctx.run_name, "iteration": iteration, "split": split, "task_type": task_type, **summarize(group)}
            for (split, task_type), group in sorted(groups.items())]


def split_metrics(episodes: list[dict], splits: list[str], play_seconds: float) -> dict[str, float]:
    """The manifest metrics: those of the gating split (the first), plus every split's success rate by name."""
    metrics = episode_metrics([e for e in episodes if e["split"] == splits[0]], play_seconds)
    for split in splits:
        metrics[f"success_rate_{split}"] = summarize([e for e in episodes if e["split"] == split])["success_rate"]
    return metrics


def evaluate(ctx: RunContext, iteration: int, force: bool = False, shard: Shard | None = None) -> StageOutcome:
    """Held-out play as one job, or as shard i/N of it; the metrics and the champion gate run once all have played."""
    if shard is not None:
        check_sharding(ctx.config, "evaluate", shard.count)
    policy, _ = ctx.checkpoint(iteration)
    published = require_committed(ctx.store, "publish", iteration)
    cfg = ctx.config.evaluate
    digest = input_digest("evaluate", ctx.config.section("env", "evaluate", "rollout"), [policy, published],
                          {"iteration": iteration})

    def play_tasks(writer: StageWriter) -> list[dict]:
        family = get_family(ctx.config.env)
        tasks = [task for split in cfg.splits for task in family.make_tasks(split, cfg.tasks)]
        specs = [EpisodeSpec(task, task.task_id, task.task_id) for task in tasks]
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=cfg.max_new_tokens)
        result = play(ctx, iteration, specs, greedy, cfg.batch_episodes, seed=0, label=f"iter {iteration} evaluate",
                      shard=shard)
        episodes = write_episodes(writer, ctx, iteration, draw=0, result=result)
        writer.metrics.update(split_metrics(episodes, cfg.splits, result.seconds))
        return episodes

    def conclude(writer: StageWriter, episodes: list[dict]) -> None:
        rows = metric_rows(ctx, iteration, episodes)
        writer.write_rows("metrics.parquet", rows, EVAL_METRICS)
        success = next(r["success_rate"] for r in rows if r["split"] == cfg.splits[0] and r["task_type"] == "all")
        promoted = tracking.gate_champion(ctx, published.manifest.details["version"], success)
        writer.metrics["promoted"] = float(promoted)
        writer.details["champion_moved"] = str(promoted)

    def conclude_shards(writer: StageWriter, parts: ShardParts) -> None:
        episodes = parts.table("episodes.parquet", EPISODES).to_pylist()
        writer.metrics.update(split_metrics(episodes, cfg.splits, parts.total("play_seconds")))
        conclude(writer, episodes)

    inputs = [policy, published]
    if shard is None:
        return commit_stage(ctx.store, "evaluate", iteration, digest, inputs, force,
                            lambda writer: conclude(writer, play_tasks(writer)))
    return commit_shard(ctx.store, "evaluate", iteration, digest, inputs, force, shard, play_tasks, conclude_shards)
