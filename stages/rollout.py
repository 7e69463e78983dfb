"""Stage `rollout`: the current policy plays G episodes on each of a draw of fresh training tasks.

Draw 0 is the iteration's main rollout (`iter-N/rollout/`); draws 1, 2, … are the auxiliary resampling rounds the
flow asks for when the filter finds too few groups with signal (`iter-N/rollout-aux-01/`, …). Every draw plays
tasks no earlier draw or the warmstart's expert data used.
"""

from __future__ import annotations

from dypo.schemas.tables import EPISODES
from dypo.stages.commit import StageOutcome, commit_stage, input_digest, rollout_stage_name
from dypo.stages.config import Config, check_sharding
from dypo.stages.context import RunContext
from dypo.stages.environments import get_family
from dypo.stages.episodes import episode_metrics, play, write_episodes
from dypo.stages.shards import Shard, commit_shard
from dypo.stages.trajectory import EpisodeSpec


def draw_specs(config: Config, iteration: int, draw: int) -> list[EpisodeSpec]:
    """The episodes of one draw: `groups` fresh train tasks, each played `group_size` times from the same seed."""
    draws_per_iteration = 1 + config.filter.max_extra_draws
    start = config.warmstart.expert_tasks + ((iteration - 1) * draws_per_iteration + draw) * config.rollout.groups
    specs = []
    for task in get_family(config.env).make_tasks("train", config.rollout.groups, start=start):
        group_id = f"it{iteration:04d}-{task.task_id}"
        specs += [EpisodeSpec(task, group_id, f"{group_id}-e{k:02d}") for k in range(config.rollout.group_size)]
    return specs


def rollout(ctx: RunContext, iteration: int, draw: int = 0, force: bool = False, shard: Shard | None = None,
            ) -> StageOutcome:
    """The draw as one job, or as shard i/N of it (whole groups each; the stage commits when all N have)."""
    if iteration < 1:
        raise ValueError(f"rollout runs in iterations >= 1 (iteration 0 is the warmstart), got {iteration}")
    if shard is not None:
        check_sharding(ctx.config, "rollout", shard.count)
    stage = rollout_stage_name(draw)
    policy, _ = ctx.checkpoint(iteration - 1)
    digest = input_digest(stage, ctx.config.section("run", "env", "warmstart", "rollout", "filter"), [policy],
                          {"iteration": iteration, "draw": draw})
    rollout_cfg = ctx.config.rollout

    def body(writer):
        specs = draw_specs(ctx.config, iteration, draw)
        result = play(ctx, iteration - 1, specs, rollout_cfg.sampling, rollout_cfg.batch_episodes,
                      seed=ctx.config.run.seed * 1_000_003 + iteration * 101 + draw,
                      label=f"iter {iteration} {stage}", shard=shard)
        write_episodes(writer, ctx, iteration, draw, result)
        writer.metrics["draw"] = draw

    def conclude(writer, parts):
        episodes = parts.table("episodes.parquet", EPISODES).to_pylist()
        writer.metrics.update(episode_metrics(episodes, parts.total("play_seconds")))
        writer.metrics["draw"] = draw

    if shard is None:
        return commit_stage(ctx.store, stage, iteration, digest, [policy], force, body)
    return commit_shard(ctx.store, stage, iteration, digest, [policy], force, shard, body, conclude)
