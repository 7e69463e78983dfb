"""The batched multi-turn rollout engine: the policy plays episodes against game sessions.

Each turn, every still-running episode of a batch generates together from its whole context (left-padded, one
prefill, then token by token with a KV cache), stopping at `</action>`. The action goes to the game and the
game's observation becomes the next context piece. Records keep the exact token ids the model saw and sampled,
plus the log-probabilities of the sampled tokens under the distribution they were drawn from, so the optimize
stage trains on precisely this sequence and can audit the gap between its own log-probs and the sampler's.

The loop is our own rather than `generate`: it needs a seeded generator (reproducible rollouts without touching
global RNG state), the log-probs after temperature and top-p, and it drops finished rows from the batch.
A cache kept per episode across turns (no re-prefill of the history) is a later step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from dypo.stages.config import SamplingConfig
from dypo.stages.conversation import observation_ids, prompt_ids
from dypo.stages.environments import EnvError, EnvPool, GameSession
from dypo.stages.policy import stop_token_ids
from dypo.stages.trajectory import EpisodeRecord, EpisodeSpec, TurnRecord
from dypo.stages.turn_format import parse_turn

# What the model reads after a malformed turn. The game receives nothing (its state is unchanged), and the
# message names the expected shape so the model can recover within the episode; the turn is still flagged.
INVALID_FORMAT_OBSERVATION = "Invalid action format. Reply as <think>...</think><action>...</action>."


@dataclass(frozen=True)
class _Sample:
    token_ids: list[int]
    logprob: float  # sum over token_ids, under the sampling distribution
    stopped: bool  # ended with a stop token (False: the token budget ran out)


def _draw(
    logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob under the distribution it was drawn from.

    Greedy decoding draws from a point mass, so its log-prob is 0. Otherwise the distribution is
    softmax(logits / temperature) restricted to the top-p nucleus and renormalised; the optimize stage must
    apply the same temperature when it compares its log-probs with these.
    """
    if sampling.temperature == 0:
        return logits.argmax(dim=-1), torch.zeros(logits.shape[0])
    logprobs = torch.log_softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = logprobs.exp().sort(dim=-1, descending=True)
        sorted_outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p  # nucleus already full
        outside = torch.empty_like(sorted_outside).scatter(-1, order, sorted_outside)
        logprobs = torch.log_softmax(logprobs.masked_fill(outside, float("-inf")), dim=-1)
    tokens = torch.multinomial(logprobs.exp(), num_samples=1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _left_padded(contexts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(context) for context in contexts)
    input_ids = torch.full((len(contexts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(contexts), width), dtype=torch.long)
    for row, context in enumerate(contexts):
        input_ids[row, width - len(context):] = torch.tensor(context)
        attention_mask[row, width - len(context):] = 1
    return input_ids, attention_mask


def _sample_batch(
    model: PreTrainedModel,
    contexts: Sequence[list[int]],
    sampling: SamplingConfig,
    stop_ids: list[int],
    pad_id: int,
    generator: torch.Generator,
) -> list[_Sample]:
    """Continue every context by one turn.

    Position ids come from the attention mask, so a left-padded row gets the same positions (hence the same
    log-probs) as its unpadded sequence in the optimize stage. Rows leave the batch and the KV cache as soon as
    they stop, so a long turn does not make the finished ones pay for it.
    """
    input_ids, attention_mask = _left_padded(contexts, pad_id)
    position_ids = (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=cache, use_cache=True, logits_to_keep=1,
    ).logits[:, -1]
    next_position = position_ids[:, -1] + 1
    stops = torch.tensor(stop_ids)
    rows = torch.arange(len(contexts))  # the original index of each row still in the batch
    tokens: list[list[int]] = [[] for _ in contexts]
    logprob = [0.0] * len(contexts)
    stopped = [False] * len(contexts)
    for step in range(sampling.max_new_tokens):
        drawn, drawn_logprob = _draw(logits.float(), sampling, generator)
        for row, token, token_logprob in zip(rows.tolist(), drawn.tolist(), drawn_logprob.tolist(), strict=True):
            tokens[row].append(token)
            logprob[row] += token_logprob
        finished = torch.isin(drawn, stops)
        for row in rows[finished].tolist():
            stopped[row] = True
        if finished.all() or step == sampling.max_new_tokens - 1:
            break
        keep = (~finished).nonzero().squeeze(-1)
        if finished.any():
            cache.batch_select_indices(keep)
        rows, attention_mask, next_position = rows[keep], attention_mask[keep], next_position[keep]
        attention_mask = torch.cat([attention_mask, torch.ones((len(rows), 1), dtype=torch.long)], dim=-1)
        logits = model(
            input_ids=drawn[keep][:, None], attention_mask=attention_mask, position_ids=next_position[:, None],
            past_key_values=cache, use_cache=True,
        ).logits[:, -1]
        next_position = next_position + 1
    return [_Sample(tokens[row], logprob[row], stopped[row]) for row in range(len(contexts))]


@dataclass
class _Episode:
    """An episode in play: its record, its game, and what the model reads next."""

    record: EpisodeRecord
    session: GameSession
    sequence: list[int]  # every token so far: context and generated pieces of the turns already played
    pending_ids: list[int]  # the context piece to append before the next generation
    observation: str  # the text behind pending_ids

    @property
    def running(self) -> bool:
        return self.record.termination == "running"

    def end(self, termination: str, error: str | None = None) -> None:
        self.record.termination = termination
        self.record.error = error


def _start(spec: EpisodeSpec, session: GameSession, tokenizer: PreTrainedTokenizerBase) -> _Episode:
    episode = _Episode(EpisodeRecord(spec), session, [], [], "")
    try:
        observation = session.reset(spec.task)
    except EnvError as error:
        episode.end("env_error", f"reset failed: {error}")
        return episode
    episode.pending_ids, episode.observation = prompt_ids(tokenizer, observation), observation
    return episode


def _play_turn(
    episode: _Episode, sample: _Sample, tokenizer: PreTrainedTokenizerBase, generation_s: float
) -> None:
    """Apply one generated turn: parse it, send the action to the game, record the turn, prepare the next."""
    started = time.perf_counter()
    text = tokenizer.decode(sample.token_ids, skip_special_tokens=False)
    parsed = parse_turn(text, budget_exhausted=not sample.stopped)
    reward, done, next_observation, error = 0.0, False, INVALID_FORMAT_OBSERVATION, None
    if not parsed.malformed:
        try:
            result = episode.session.step(parsed.action)
        except EnvError as failure:
            error = f"step failed: {failure}"
        else:
            reward, done, next_observation = result.reward, result.done, result.observation
            episode.record.score = result.score
            episode.record.won = result.won
    episode.record.turns.append(TurnRecord(
        turn_index=len(episode.record.turns),
        observation=episode.observation,
        context_token_ids=episode.pending_ids,
        generated_token_ids=sample.token_ids,
        generated_text=text,
        think=parsed.think,
        action=parsed.action,
        malformed=parsed.malformed,
        malformed_reason=parsed.reason,
        env_reward=reward,
        done=done,
        sampling_logprob=sample.logprob,
        latency_s=generation_s + time.perf_counter() - started,
    ))
    episode.sequence += episode.pending_ids + sample.token_ids
    if error is not None:
        episode.end("env_error", error)
    elif done:
        episode.end("won" if episode.record.won else "lost")
    else:
        episode.pending_ids = observation_ids(tokenizer, next_observation)
        episode.observation = next_observation


def _batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """A generator per batch, so a batch's rollouts do not depend on how many tokens earlier batches drew."""
    state = np.random.SeedSequence([seed, batch_index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.inference_mode()
def play_episodes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    specs: list[EpisodeSpec],
    pool: EnvPool,
    sampling: SamplingConfig,
    max_turns: int,
    batch_episodes: int,
    seed: int,
    on_turn: Callable[[int], None] | None = None,
) -> list[EpisodeRecord]:
    """Play every spec to its end and return the records in spec order.

    Episodes run `batch_episodes` at a time. An episode ends when the game says done (won or lost), after
    `max_turns` turns (malformed turns count), or when its game fails (env_error, keeping the turns played).
    The same seed, model and specs give identical records. `on_turn(n)` is called after each batched turn with
    the number n of turns played so far over all episodes, to drive a progress bar.

    A turn's latency is the wall time of the batched generation it was part of plus its own parsing and game
    step, i.e. what the episode waited for.
    """
    model.eval()
    stop_ids = stop_token_ids(tokenizer)
    records: list[EpisodeRecord] = []
    turns_played = 0
    for batch_index, start in enumerate(range(0, len(specs), batch_episodes)):
        batch = specs[start:start + batch_episodes]
        generator = _batch_generator(seed, batch_index)
        sessions = pool.sessions(len(batch))
        episodes = [_start(spec, session, tokenizer) for spec, session in zip(batch, sessions, strict=True)]
        for _ in range(max_turns):
            running = [episode for episode in episodes if episode.running]
            if not running:
                break
            started = time.perf_counter()
            samples = _sample_batch(
                model, [episode.sequence + episode.pending_ids for episode in running],
                sampling, stop_ids, tokenizer.pad_token_id, generator,
            )
            generation_s = time.perf_counter() - started
            for episode, sample in zip(running, samples, strict=True):
                _play_turn(episode, sample, tokenizer, generation_s)
            turns_played += len(running)
            if on_turn is not None:
                on_turn(turns_played)
        for episode in episodes:
            if episode.running:
                episode.end("max_turns")
        records.extend(episode.record for episode in episodes)
    return records
