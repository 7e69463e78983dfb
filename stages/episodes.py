"""Playing a checkpoint on a set of tasks and storing what happened; shared by rollout and evaluate."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dypo.schemas.tables import EPISODES, TURNS
from dypo.stages.commit import StageWriter
from dypo.stages.config import RolloutConfig, SamplingConfig
from dypo.stages.context import RunContext
from dypo.stages.environments import EnvPool
from dypo.stages.generation import play_episodes
from dypo.stages.policy import load_policy
from dypo.stages.trajectory import EpisodeRecord, EpisodeSpec


@dataclass(frozen=True)
class PlayResult:
    records: list[EpisodeRecord]
    seconds: float

    @property
    def generated_tokens(self) -> int:
        return sum(len(t.generated_token_ids) for r in self.records for t in r.turns)


def play(ctx: RunContext, policy_iteration: int, specs: list[EpisodeSpec], sampling: SamplingConfig,
         batch_episodes: int, seed: int, label: str) -> PlayResult:
    """Play every episode of `specs` with the policy after `policy_iteration`, showing progress on the terminal."""
    model, tokenizer = load_policy(ctx.checkpoint_dir(policy_iteration))
    max_turns = ctx.config.env.max_turns
    started = time.perf_counter()
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("env steps"),
               TimeElapsedColumn())
    with EnvPool(ctx.config.env, min(batch_episodes, len(specs))) as pool, Progress(*columns, transient=True) as bar:
        progress = bar.add_task(label, total=len(specs) * max_turns)
        records = play_episodes(model, tokenizer, specs, pool, sampling, max_turns, batch_episodes, seed,
                                on_turn=lambda steps: bar.update(progress, completed=steps))
    return PlayResult(records, time.perf_counter() - started)


def episode_return(record: EpisodeRecord, rewards: RolloutConfig) -> float:
    """R = success (or the env's score) minus a penalty per malformed turn (DESIGN.md §1.3)."""
    base = float(record.won) if rewards.reward == "success" else record.score
    return base - rewards.malformed_penalty * record.malformed_turns


def summarize(records: list[EpisodeRecord], rewards: RolloutConfig) -> dict[str, float]:
    """Success, return, length and format quality of a set of episodes (0 for an empty set)."""
    episodes = max(len(records), 1)
    turns = sum(len(r.turns) for r in records)
    return {
        "episodes": len(records),
        "success_rate": sum(r.won for r in records) / episodes,
        "mean_return": sum(episode_return(r, rewards) for r in records) / episodes,
        "mean_turns": turns / episodes,
        "malformed_turn_rate": sum(r.malformed_turns for r in records) / max(turns, 1),
    }


def write_episodes(writer: StageWriter, ctx: RunContext, iteration: int, draw: int, result: PlayResult) -> None:
    """`episodes.parquet` and `turns.parquet` of one set of played episodes, plus their summary metrics."""
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
            })
        generated = sum(len(t.generated_token_ids) for t in record.turns)
        episode_rows.append({
            **keys, "draw": draw, "task_type": spec.task.task_type, "split": spec.task.split,
            "seed": spec.task.seed, "return": episode_return(record, ctx.config.rollout), "success": record.won,
            "score": record.score, "turns": len(record.turns), "malformed_turns": record.malformed_turns,
            "generated_tokens": generated,
            "total_tokens": generated + sum(len(t.context_token_ids) for t in record.turns),
            "termination": record.termination, "error": record.error,
        })
    writer.write_rows("turns.parquet", turn_rows, TURNS)
    writer.write_rows("episodes.parquet", episode_rows, EPISODES)
    writer.metrics.update({
        **summarize(result.records, ctx.config.rollout),
        "env_errors": sum(r["termination"] == "env_error" for r in episode_rows),
        "generated_tokens": result.generated_tokens,
        "generated_tokens_per_s": result.generated_tokens / max(result.seconds, 1e-9),
    })
