"""An episode's return and its malformed-turn counts, as the filter and the advantage read them."""

from __future__ import annotations

import pytest

from dypo.stages.config import RolloutConfig
from dypo.stages.episodes import episode_return
from dypo.stages.trajectory import EpisodeRecord, EpisodeSpec, Task, TurnRecord


def turn(index: int, reason: str | None) -> TurnRecord:
    return TurnRecord(turn_index=index, observation="", observation_truncated=False, context_token_ids=[1],
                      context_reset=False, generated_token_ids=[2], generated_text="", think=None, action=None,
                      malformed=reason is not None, malformed_reason=reason, env_reward=0.0, done=False,
                      sampling_logprob=0.0, latency_s=0.0)


def record(*reasons: str | None, won: bool = True) -> EpisodeRecord:
    spec = EpisodeSpec(Task("t", "twx-coin", "coin", "train", 0), "g", "e")
    return EpisodeRecord(spec, [turn(i, reason) for i, reason in enumerate(reasons)], won=won)


def test_inadmissible_commands_are_malformed_but_not_format_errors() -> None:
    played = record(None, "not_admissible", "repeated_tag", "not_admissible", "budget_exhausted")
    assert played.malformed_turns == 4
    assert played.format_error_turns == 2


def test_the_default_return_is_the_task_outcome_and_the_penalty_is_opt_in() -> None:
    played = record(None, "not_admissible", "misplaced_tag", won=True)
    assert episode_return(played, RolloutConfig()) == 1.0
    assert episode_return(record("not_admissible", won=False), RolloutConfig()) == 0.0
    assert episode_return(played, RolloutConfig(malformed_penalty=0.1)) == pytest.approx(0.8)
