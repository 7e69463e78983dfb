"""Stage `filter`: rejection sampling over every rollout draw of an iteration (DESIGN.md §1.4).

Episodes are rejected first on their own (engine failure or timeout, over-generation: too many turns that break
the turn format, or a runaway length), then whole groups: a group whose surviving returns are all equal has zero
advantage everywhere and teaches nothing (kept, with zero advantage, only when `reject_zero_variance` is off, as
plain GRPO does). Accepted groups are taken in draw order up to the target; `batch.parquet` keeps every episode
with the reason it was kept or dropped, and its advantage when kept. When the batch is short, the flow draws an
auxiliary rollout and runs this stage again over all draws.
"""

from __future__ import annotations

from collections import Counter
from enum import StrEnum
from itertools import groupby

import pyarrow as pa

from dypo.schemas.tables import BATCH, EPISODES
from dypo.stages.commit import (
    CommittedStage,
    StageOutcome,
    commit_stage,
    input_digest,
    read_committed,
    read_stage_table,
    require_committed,
    rollout_stage_name,
)
from dypo.stages.config import FilterConfig
from dypo.stages.context import RunContext
from dypo.stages.dypo_loss import group_advantages


class Reason(StrEnum):
    ACCEPTED = "accepted"
    ENV_ERROR = "env_error"
    ENV_TIMEOUT = "env_timeout"
    MALFORMED = "malformed_fraction"
    TOO_LONG = "too_long"
    GROUP_TOO_SMALL = "group_too_small"
    ZERO_VARIANCE = "zero_variance"
    OVER_TARGET = "over_target"
    BATCH_SHORT = "batch_short"


def committed_draws(ctx: RunContext, iteration: int) -> list[CommittedStage]:
    """The iteration's committed rollout draws, in order (draw 0 must exist)."""
    draws = [require_committed(ctx.store, "rollout", iteration)]
    for draw in range(1, 1 + ctx.config.filter.max_extra_draws):
        committed = read_committed(ctx.store, rollout_stage_name(draw), iteration)
        if committed is None:
            break
        draws.append(committed)
    return draws


def episode_reason(row: dict, max_malformed_fraction: float, max_tokens: int) -> Reason | None:
    """Why an episode is unusable on its own, or None.

    Over-generation counts only turns that broke the format. A well-formed but inadmissible command is the
    policy's own mistake, paid for in wasted turns (and in `rollout.malformed_penalty`, when set): rejecting the
    episodes that make many of them would hide exactly the failures the update must push down, while the
    winners that made them too are kept.
    """
    if row["termination"] in (Reason.ENV_ERROR, Reason.ENV_TIMEOUT):
        return Reason(row["termination"])
    format_errors = row.get("format_error_turns")
    if format_errors is None:  # an episodes.parquet 1.0 row: every malformed turn counted as a format error
        format_errors = row["malformed_turns"]
    if format_errors > max_malformed_fraction * max(row["turns"], 1):
        return Reason.MALFORMED
    if row["total_tokens"] > max_tokens:
        return Reason.TOO_LONG
    return None


def select(episodes: list[dict], cfg: FilterConfig, last_draw: bool) -> list[dict]:
    """Decide every episode's fate; returns `batch.parquet` rows."""
    rows, accepted_groups = [], 0
    ordered = sorted(episodes, key=lambda r: (r["draw"], r["group_id"], r["episode_id"]))
    for _, members in groupby(ordered, key=lambda r: (r["draw"], r["group_id"])):
        group = [{**{k: m[k] for k in ("run", "iteration", "task_id", "group_id", "episode_id", "draw", "return")},
                  "reason": episode_reason(m, cfg.max_malformed_fraction, cfg.max_episode_tokens),
                  "advantage": None} for m in members]
        survivors = [r for r in group if r["reason"] is None]
        if len(survivors) < 2:
            group_reason = Reason.GROUP_TOO_SMALL
        elif cfg.reject_zero_variance and len({r["return"] for r in survivors}) == 1:
            group_reason = Reason.ZERO_VARIANCE
        elif accepted_groups >= cfg.target_groups:
            group_reason = Reason.OVER_TARGET
        else:
            group_reason = Reason.ACCEPTED
            accepted_groups += 1
            advantages = group_advantages([r["return"] for r in survivors], [r["group_id"] for r in survivors],
                                          cfg.std_normalize, cfg.advantage_eps)
            for row, advantage in zip(survivors, advantages, strict=True):
                row["advantage"] = advantage
        for row in survivors:
            row["reason"] = group_reason
        rows += group
    if last_draw and accepted_groups < cfg.target_groups and not cfg.keep_partial_last_draw:
        for row in rows:
            if row["reason"] == Reason.ACCEPTED:
                row["reason"], row["advantage"] = Reason.BATCH_SHORT, None
    for row in rows:
        row["accepted"] = row["reason"] == Reason.ACCEPTED
        row["reason"] = str(row["reason"])
    return rows


def filter_batch(ctx: RunContext, iteration: int, force: bool = False) -> StageOutcome:
    draws = committed_draws(ctx, iteration)
    digest = input_digest("filter", ctx.config.section("filter"), draws, {"iteration": iteration})

    def body(writer):
        tables = [read_stage_table(ctx.store, d.directory, "episodes.parquet", EPISODES) for d in draws]
        episodes = pa.concat_tables(tables, promote_options="permissive").to_pylist()
        last_draw = len(draws) == 1 + ctx.config.filter.max_extra_draws
        rows = select(episodes, ctx.config.filter, last_draw)
        writer.write_rows("batch.parquet", rows, BATCH)
        counts = Counter(r["reason"] for r in rows)
        accepted_groups = len({r["group_id"] for r in rows if r["accepted"]})
        writer.metrics.update({
            "draws": len(draws),
            "drawn_groups": len({(r["draw"], r["group_id"]) for r in rows}),
            "accepted_groups": accepted_groups,
            "accepted_episodes": counts[Reason.ACCEPTED],
            "short": float(accepted_groups < ctx.config.filter.target_groups),
            **{f"rejected_{reason}": counts[reason] for reason in Reason if reason != Reason.ACCEPTED},
        })
        writer.details["draw_stages"] = ",".join(d.directory for d in draws)

    return commit_stage(ctx.store, "filter", iteration, digest, draws, force, body)
