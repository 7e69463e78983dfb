"""In-memory records of played episodes, shared by the rollout engine and the stages that store them.

Token ids are kept exactly as the policy saw and produced them, so the optimize stage trains on the very
sequence that was sampled (no re-tokenization drift between rollout and update).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dypo.stages.turn_format import MalformedReason

NOT_ADMISSIBLE = MalformedReason.NOT_ADMISSIBLE.value


@dataclass(frozen=True)
class Task:
    """One playable game: the same task (id + seed) always starts from the same initial state."""

    task_id: str
    family: str
    task_type: str
    split: str
    seed: int


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode to play: episodes sharing a group_id play the same task."""

    task: Task
    group_id: str
    episode_id: str


@dataclass
class TurnRecord:
    turn_index: int
    observation: str  # the observation text the model saw right before this turn
    observation_truncated: bool  # the observation was cut to env.max_observation_chars
    # Tokens fed before generating: the new piece (prompt or observation) appended to the episode's context, or,
    # when context_reset, the whole context the turn was generated from (a history window re-encoded).
    context_token_ids: list[int]
    context_reset: bool
    generated_token_ids: list[int]
    generated_text: str
    think: str | None
    action: str | None
    malformed: bool
    malformed_reason: str | None
    env_reward: float
    done: bool
    sampling_logprob: float  # sum of the sampling log-probs of the generated tokens
    latency_s: float


@dataclass
class EpisodeRecord:
    spec: EpisodeSpec
    turns: list[TurnRecord] = field(default_factory=list)
    won: bool = False
    score: float = 0.0
    termination: str = "running"  # won | lost | max_turns | context_full | env_error | env_timeout
    error: str | None = None

    @property
    def malformed_turns(self) -> int:
        return sum(turn.malformed for turn in self.turns)

    @property
    def format_error_turns(self) -> int:
        """Malformed turns that broke the turn format (tags, token budget), as opposed to a well-formed command
        the game cannot execute: the filter's over-generation rule counts only these."""
        return sum(turn.malformed and turn.malformed_reason != NOT_ADMISSIBLE for turn in self.turns)
