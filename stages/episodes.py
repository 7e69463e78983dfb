"""Playing a checkpoint on a set of tasks and storing what happened; shared by rollout and evaluate."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dypo.schemas.tables import EPISODES, TURNS
from dypo.stages.commit import StageWriter
from dypo.stages.config import Config, EnvConfig, RolloutConfig, SamplingConfig
from dypo.stages.context import RunContext
from dypo.stages.environments import EnvPool
from dypo.stages.environments.families import get_family
from dypo.stages.generation import EpisodeRules, play_episodes
from dypo.stages.policy import load_policy
from dypo.stages.shards import Shard
from dypo.stages.trajectory import EpisodeRecord, EpisodeSpec


@dataclass(frozen=True)
class PlayResult:
    records: list[EpisodeRecord]
    seconds: float


def episode_rules(config: Config) -> EpisodeRules:
    """The limits and malformed-turn handling of the configured env and rollout (shared by rollout and evaluate)."""
    env, rollout = config.env, config.rollout
    return EpisodeRules(
        system_prompt=system_prompt(env),
        max_turns=env.max_turns,
        max_observation_chars=env.max_observation_chars,
        max_context_tokens=rollout.max_context_tokens,
        history_window=rollout.history_window,
        check_admissible=rollout.check_admissible,
        noop_action=get_family(env).noop_action if rollout.on_malformed == "noop" else None,
    )


def system_prompt(env: EnvConfig) -> str:
    """The configured system prompt, or the env family's default."""
    return env.system_prompt if env.system_prompt is not None else get_family(env).default_system_prompt


def play(ctx: RunContext, policy_iteration: int, specs: list[EpisodeSpec], sampling: SamplingConfig,
         batch_episodes: int, seed: int, label: str, shard: Shard | None = None) -> PlayResult:
    """Play every episode of `specs` with the policy after `policy_iteration`, showing progress on the terminal.

    A shard plays its contiguous run of whole batches of `specs`, each batch sampled exactly as in an unsharded
    play (same batch index, same generator), so the shards together record what one job would.
    """
    batches = range(-(-len(specs) // batch_episodes))
    if shard is not None:
        batches = shard.batches(len(batches))
        specs = specs[batches.start * batch_episodes:batches.stop * batch_episodes]
        label = f"{label} shard {shard}"
    model, tokenizer = load_policy(ctx.checkpoint_dir(policy_iteration))
    rules = episode_rules(ctx.config)
    max_turns = rules.max_turns
    started = time.perf_counter()
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("env steps"),
               TimeElapsedColumn())
    with EnvPool(ctx.config.env, min(batch_episodes, len(specs))) as pool, Progress(*columns, transient=True) as bar:
        progress = bar.add_task(label, total=len(specs) * max_turns)
        records = play_episodes(model, tokenizer, specs, pool, sampling, rules, batch_episodes, seed,
                                first_batch=batches.start,
                                on_turn=lambda steps: bar.update(progress, completed=steps))
    return PlayResult(records, time.perf_counter() - started)


def episode_return(record: EpisodeRecord, rewards: RolloutConfig) -> float:
    """R = success, the env's score, or success plus weighted score, minus a penalty per malformed turn (§1.3).

    The shaped return credits partial progress (ScienceWorld's subgoals, WebShop's attribute matches) on top of
    success, so groups in which nobody wins can still carry a signal.
    """
    base = {"success": float(record.won), "score": record.score,
            "shaped": float(record.won) + rewards.shaping_weight * record.score}[rewards.reward]
    return base - rewards.malformed_penalty * record.malformed_turns


def summarize(episodes: list[dict]) -> dict[str, float]:
    """Success, return, length and format quality of a set of `episodes.parquet` rows (0 for an empty set)."""
    count = max(len(episodes), 1)
    turns = sum(e["turns"] for e in episodes)
    return {
        "episodes": len(episodes),
        "success_rate": sum(e["success"] for e in episodes) / count,
        "mean_return": sum(e["return"] for e in episodes) / count,
        "mean_turns": turns / count,
        "malformed_turn_rate": sum(e["malformed_turns"] for e in episodes) / max(turns, 1),
    }


def episode_metrics(episodes: list[dict], play_seconds: float) -> dict[str, float]:
    """The manifest metrics of a rollout or evaluation: from its `episodes.parquet` rows, so a sharded stage
    computes them over all its shards' rows exactly as one job would (tokens/s is per second of playing)."""
    generated = sum(e["generated_tokens"] for e in episodes)
    return {
        **summarize(episodes),
        "env_errors": sum(e["termination"] == "env_error" for e in episodes),
        "generated_tokens": generated,
        "play_seconds": play_seconds,
        "generated_tokens_per_s": generated / max(play_seconds, 1e-9),
    }


def write_episodes(writer: StageWriter, ctx: RunContext, iteration: int, draw: int, result: PlayResult,
                   ) -> list[dict]:
    """`episodes.parquet` and `turns.parquet` of one set of played episodes, plus their metrics; returns the
    episode rows."""
    turn_rows, episode_rows = [], []
    for record in result.records:
        spec = record.spec
        keys = {"run": ctx.run_name, "iteration": iteration, "task_id": spec.task.task_id,
                "group_id": spec.group_id, "episode_id": spec.episode_id}
        for turn in record.turns:
            turn_rows.append({
                **keys, "turn_index": turn.turn_index, "observation": turn.observation,
                "generated_text": turn.generated_text, "think": turn.think, "action": turn.action,
                "malformed": turn.malformed, "malformed_reason": turn.malformed_reason,
                "env_reward": turn.env_reward, "done": turn.done,
                "context_tokens": len(turn.context_token_ids), "generated_tokens": len(turn.generated_token_ids),
                "sampling_logprob": turn.sampling_logprob, "latency_s": turn.latency_s,
                "context_token_ids": turn.context_token_ids, "generated_token_ids": turn.generated_token_ids,
                "observation_truncated": turn.observation_truncated, "context_reset": turn.context_reset,
            })
        generated = sum(len(t.generated_token_ids) for t in record.turns)
        episode_rows.append({
            **keys, "draw": draw, "task_type": spec.task.task_type, "split": spec.task.split,
            "seed": spec.task.seed, "return": episode_return(record, ctx.config.rollout), "success": record.won,
            "score": record.score, "turns": len(record.turns), "malformed_turns": record.malformed_turns,
            "format_error_turns": record.format_error_turns, "generated_tokens": generated,
            "total_tokens": generated + sum(len(t.context_token_ids) for t in record.turns),
            "termination": record.termination, "error": record.error,
        })
    writer.write_rows("turns.parquet", turn_rows, TURNS)
    writer.write_rows("episodes.parquet", episode_rows, EPISODES)
    writer.metrics.update(episode_metrics(episode_rows, result.seconds))
    return episode_rows
