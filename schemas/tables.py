"""Versioned Arrow schemas of every Parquet artifact the stages exchange.

A schema's version is `major.minor`: a minor bump only adds nullable columns (old readers keep working), a
major bump changes or removes columns, and readers refuse a major they do not know. The name and version travel
inside each Parquet file's schema metadata, so a file found on its own in a bucket still says what it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

NAME_KEY = b"dypo.schema"
VERSION_KEY = b"dypo.schema_version"


@dataclass(frozen=True)
class TableSpec:
    name: str
    version: str
    schema: pa.Schema

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def with_metadata(self) -> pa.Schema:
        return self.schema.with_metadata({NAME_KEY: self.name.encode(), VERSION_KEY: self.version.encode()})


_EPISODE_KEYS = [
    pa.field("run", pa.string(), nullable=False),
    pa.field("iteration", pa.int32(), nullable=False),
    pa.field("task_id", pa.string(), nullable=False),
    pa.field("group_id", pa.string(), nullable=False),
    pa.field("episode_id", pa.string(), nullable=False),
]

TURNS = TableSpec("turns", "1.1", pa.schema([
    *_EPISODE_KEYS,
    pa.field("turn_index", pa.int32(), nullable=False),
    pa.field("observation", pa.string()),
    pa.field("generated_text", pa.string()),
    pa.field("think", pa.string()),
    pa.field("action", pa.string()),
    pa.field("malformed", pa.bool_(), nullable=False),
    pa.field("malformed_reason", pa.string()),
    pa.field("env_reward", pa.float64()),
    pa.field("done", pa.bool_()),
    pa.field("context_tokens", pa.int32()),
    pa.field("generated_tokens", pa.int32()),
    pa.field("sampling_logprob", pa.float64()),
    pa.field("latency_s", pa.float64()),
    pa.field("context_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("generated_token_ids", pa.list_(pa.int32()), nullable=False),
    # 1.1: context bounds. observation_truncated: the observation was cut to env.max_observation_chars;
    # context_reset: context_token_ids is the whole (windowed) context of the turn, not a piece appended to the
    # episode's running context. Null in 1.0 files, meaning false.
    pa.field("observation_truncated", pa.bool_()),
    pa.field("context_reset", pa.bool_()),
]))

# 1.1: `format_error_turns` added: the malformed turns that broke the turn format (not_admissible excluded).
# Null in 1.0 files, where readers take every malformed turn as a format error.
EPISODES = TableSpec("episodes", "1.1", pa.schema([
    *_EPISODE_KEYS,
    pa.field("draw", pa.int32(), nullable=False),
    pa.field("task_type", pa.string()),
    pa.field("split", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("return", pa.float64(), nullable=False),
    pa.field("success", pa.bool_(), nullable=False),
    pa.field("score", pa.float64()),
    pa.field("turns", pa.int32(), nullable=False),
    pa.field("malformed_turns", pa.int32(), nullable=False),
    pa.field("generated_tokens", pa.int32(), nullable=False),
    pa.field("total_tokens", pa.int32(), nullable=False),
    pa.field("termination", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("format_error_turns", pa.int32()),
]))

BATCH = TableSpec("batch", "1.0", pa.schema([
    *_EPISODE_KEYS,
    pa.field("draw", pa.int32(), nullable=False),
    pa.field("accepted", pa.bool_(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("return", pa.float64(), nullable=False),
    pa.field("advantage", pa.float64()),
]))

# 1.1: `split` added (evaluate.splits may name several held-out folds; null in 1.0 files, which are heldout).
EVAL_METRICS = TableSpec("eval_metrics", "1.1", pa.schema([
    pa.field("run", pa.string(), nullable=False),
    pa.field("iteration", pa.int32(), nullable=False),
    pa.field("split", pa.string(), nullable=True),
    pa.field("task_type", pa.string(), nullable=False),
    pa.field("episodes", pa.int32(), nullable=False),
    pa.field("success_rate", pa.float64(), nullable=False),
    pa.field("mean_return", pa.float64(), nullable=False),
    pa.field("mean_turns", pa.float64(), nullable=False),
    pa.field("malformed_turn_rate", pa.float64(), nullable=False),
]))

# 2.0: `episodes` became `samples` (episodes, or turns with optimize.sample_form per_turn); kl_ref added.
TRAIN_METRICS = TableSpec("train_metrics", "2.0", pa.schema([
    pa.field("run", pa.string(), nullable=False),
    pa.field("iteration", pa.int32(), nullable=False),
    pa.field("update", pa.int32(), nullable=False),
    pa.field("loss", pa.float64(), nullable=False),
    pa.field("clip_fraction", pa.float64()),
    pa.field("approx_kl", pa.float64()),
    pa.field("entropy", pa.float64()),
    pa.field("grad_norm", pa.float64()),
    pa.field("kl_ref", pa.float64()),  # KL to the frozen reference; null without a KL term
    pa.field("samples", pa.int32(), nullable=False),
    pa.field("tokens", pa.int64(), nullable=False),
]))

ALL = {spec.name: spec for spec in (TURNS, EPISODES, BATCH, EVAL_METRICS, TRAIN_METRICS)}
