"""Stage `rollout`: the current policy plays G episodes on each of a draw of fresh training tasks.

Draw 0 is the iteration's main rollout (`iter-N/rollout/`); draws 1, 2, … are the auxiliary resampling rounds the
flow asks for when the filter finds too few groups with signal (`iter-N/rollout-aux-01/`, …). Every draw plays
tasks no earlier draw or the warmstart's expert data used.
"""

from __future__ import annotations

from dypo.stages.commit import StageOutcome, commit_stage, input_digest, rollout_stage_name
from dypo.stages.config import Config
from dypo.stages.context import RunContext
from dypo.stages.environments import make_tasks
from dypo.stages.episodes import play, write_episodes
from dypo.stages.trajectory import EpisodeSpec


def draw_specs(config: Config, iteration: int, draw: int) -> list[EpisodeSpec]:
    """The episodes of one draw: `groups` fresh train tasks, each played `group_size` times from the same seed."""
    draws_per_iteration = 1 + config.filter.max_extra_draws
    start = config.warmstart.expert_tasks + ((iteration - 1) * draws_per_iteration + draw) * config.rollout.groups
    specs = []
    for task in make_tasks(config.env, "train", config.rollout.groups, start=start):
        group_id = f"it{iteration:04d}-{task.task_id}"
        specs += [EpisodeSpec(task, group_id, f"{group_id}-e{k:02d}") for k in range(config.rollout.group_size)]
    return specs


def rollout(ctx: RunContext, iteration: int, draw: int = 0, force: bool = False) -> StageOutcome:
    if iteration < 1:
        raise ValueError(f"rollout runs in iterations >= 1 (iteration 0 is the warmstart), got {iteration}")
    stage = rollout_stage_name(draw)
    policy, _ = ctx.checkpoint(iteration - 1)
    digest = input_digest(stage, ctx.config.section("run", "env", "warmstart", "rollout", "filter"), [policy],
                          {"iteration": iteration, "draw": draw})
    rollout_cfg = ctx.config.rollout

    def body(writer):
        specs = draw_specs(ctx.config, iteration, draw)
        result = play(ctx, iteration - 1, specs, rollout_cfg.sampling, rollout_cfg.batch_episodes,
                      seed=ctx.config.run.seed * 1_000_003 + iteration * 101 + draw,
                      label=f"iter {iteration} {stage}")
        write_episodes(writer, ctx, iteration, draw, result)
        writer.metrics["draw"] = draw

    return commit_stage(ctx.store, stage, iteration, digest, [policy], force, body)
