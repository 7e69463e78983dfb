"""The batched multi-turn rollout engine: the policy plays episodes against game sessions.

Episodes are played a batch at a time. Each turn, every still-running episode of the batch generates together,
token by token, stopping at `</action>`. The action goes to the game and the game's observation becomes the
next context piece. Records keep the exact token ids the model saw and sampled, plus the log-probabilities of
the sampled tokens under the distribution they were drawn from, so the optimize stage trains on precisely this
sequence and can audit the gap between its own log-probs and the sampler's.

The batch keeps one KV cache across all its turns, so a turn encodes only its new observation instead of the
whole history again: re-encoding would make a turn's cost grow with the square of the episode's length, and
dominates a 10-turn episode. Episodes leave the cache when they end. With a history window (the prompt plus the
last K turns, as verl-agent trains), the context changes its prefix every turn, so each turn re-encodes the
window from scratch; the record says so (`context_reset`), and the optimize stage then trains per turn.

Context is bounded twice: observations longer than `max_observation_chars` are cut (and flagged), and an episode
whose next turn could overflow `max_context_tokens` ends (termination `context_full`) instead of running past
the model's positions.

The loop is our own rather than `generate`: it needs that cache across turns, a seeded generator (reproducible
rollouts without touching global RNG state), and the log-probs after temperature and top-p. Its forward pass is
our own too (cached_forward.py): the model's layers run on the real tokens of each padded block only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dypo.stages.cached_forward import check_supported, forward_block
from dypo.stages.config import SamplingConfig
from dypo.stages.conversation import observation_ids, prompt_ids
from dypo.stages.environments import EnvError, EnvPool, GameSession
from dypo.stages.kv_cache import compact_columns, growing_cache, put_rows, take_rows
from dypo.stages.policy import stop_token_ids
from dypo.stages.trajectory import EpisodeRecord, EpisodeSpec, TurnRecord
from dypo.stages.turn_format import MalformedReason, parse_turn

# What the model reads after a malformed turn. The game receives nothing (its state is unchanged), and the
# message names the expected shape so the model can recover within the episode; the turn is still flagged.
INVALID_FORMAT_OBSERVATION = "Invalid action format. Reply as <think>...</think><action>...</action>."
INVALID_ACTION_OBSERVATION = "Invalid action: that command is not one of the admissible commands."
TRUNCATION_MARK = " [truncated]"


@dataclass(frozen=True)
class EpisodeRules:
    """How an episode is played, beyond sampling: its limits and what happens to a malformed turn."""

    system_prompt: str  # the env family's prompt: the task and the turn format
    max_turns: int
    max_observation_chars: int
    max_context_tokens: int
    history_window: int | None = None  # None: the whole episode in one KV cache; K: prompt + last K turns
    check_admissible: bool = False  # actions outside the env's admissible list are malformed
    noop_action: str | None = None  # sent to the env after a malformed turn; None sends nothing


def bounded_observation(text: str, limit: int) -> tuple[str, bool]:
    """The observation cut to `limit` characters (with a visible mark), and whether it was cut."""
    if len(text) <= limit:
        return text, False
    return text[:max(limit - len(TRUNCATION_MARK), 0)] + TRUNCATION_MARK, True


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


def _left_padded(chunks: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(chunk) for chunk in chunks)
    input_ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for row, chunk in enumerate(chunks):
        input_ids[row, width - len(chunk):] = torch.tensor(chunk)
        attention_mask[row, width - len(chunk):] = 1
    return input_ids, attention_mask


class _BatchContext:
    """The KV cache of a batch's running episodes, kept across turns so a turn encodes only what is new.

    Rows of different lengths leave holes (attention mask 0) wherever one row is padded or waits for another;
    position ids count only real tokens, so every token gets the position (hence the log-probs) it has in the
    unpadded sequence the optimize stage scores. Between turns the holes are squeezed out (see kv_cache.py).
    """

    def __init__(self, model: PreTrainedModel, rows: int) -> None:
        self.model = model
        self.cache = growing_cache()
        self.attention_mask = torch.zeros((rows, 0), dtype=torch.long)
        self.next_position = torch.zeros(rows, dtype=torch.long)

    def select(self, rows: torch.Tensor) -> None:
        """Keep the rows `rows`, in that order: drops episodes that ended, and copies a row that `rows` repeats."""
        self.cache.batch_select_indices(rows)
        self.attention_mask, self.next_position = self.attention_mask[rows], self.next_position[rows]

    def take(self, rows: torch.Tensor) -> _BatchContext:
        """The rows `rows` as a batch of their own (copies), so rows that stopped generating stop costing compute;
        `put` merges what the taken rows appended back."""
        taken = _BatchContext(self.model, len(rows))
        taken.cache = take_rows(self.cache, rows)
        taken.attention_mask, taken.next_position = self.attention_mask[rows], self.next_position[rows]
        return taken

    def put(self, rows: torch.Tensor, taken: _BatchContext) -> None:
        """Merge `taken` (from `take(rows)`) back: the batch widens to its columns, holes in the other rows."""
        put_rows(self.cache, rows, taken.cache)
        grown = taken.attention_mask.shape[1] - self.attention_mask.shape[1]
        self.attention_mask = torch.nn.functional.pad(self.attention_mask, (0, grown))
        self.attention_mask[rows] = taken.attention_mask
        self.next_position[rows] = taken.next_position

    def compact(self) -> None:
        """Close the holes the last turn left, so attention reads only cached tokens and the narrowest padding."""
        if self.attention_mask.shape[1] == 0:
            return
        columns = compact_columns(self.attention_mask)
        for layer in self.cache.layers:
            layer.gather_columns(columns)
        self.attention_mask = self.attention_mask.gather(1, columns)

    def feed_chunks(self, chunks: Sequence[list[int]], pad_id: int) -> torch.Tensor:
        """Append each row's chunk (left-padded to the longest) and return each row's next-token logits.

        On an empty context, rows with equal chunks are encoded once and then copied: the episodes of a group
        all start from their task's prompt, so the first turn of a batch of groups encodes one prompt per task.
        """
        if self.attention_mask.shape[1] > 0:
            return self.feed(*_left_padded(chunks, pad_id))
        slot = {chunk: index for index, chunk in enumerate(dict.fromkeys(map(tuple, chunks)))}  # first-seen order
        copies = torch.tensor([slot[tuple(chunk)] for chunk in chunks])
        self.attention_mask = torch.zeros((len(slot), 0), dtype=torch.long)
        self.next_position = torch.zeros(len(slot), dtype=torch.long)
        logits = self.feed(*_left_padded([list(chunk) for chunk in slot], pad_id))
        self.select(copies)
        return logits[copies]

    def feed(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Append a [rows, width] block (mask 0 = hole) and return each row's next-token logits.

        A row's logits mean something only if its last column is a real token, as in a left-padded chunk.
        """
        position_ids = self.next_position[:, None] + (mask.cumsum(dim=-1) - 1).clamp(min=0)
        self.attention_mask = torch.cat([self.attention_mask, mask], dim=-1)
        self.next_position = self.next_position + mask.sum(dim=-1)
        return forward_block(self.model, self.cache, input_ids, mask, position_ids, self.attention_mask)


def _generate_turn(
    context: _BatchContext,
    chunks: Sequence[list[int]],
    sampling: SamplingConfig,
    stop_ids: list[int],
    pad_id: int,
    generator: torch.Generator,
) -> list[_Sample]:
    """Feed each row its new chunk, then sample one turn per row.

    A row's last sampled token (its stop token, or the last one the budget allowed) is not fed here: it opens
    the row's next chunk. That keeps one rule for every way a turn ends. Turn lengths vary (a valid turn stops
    after about 20 tokens, a rambling one runs to the budget), so once half the decoding rows have stopped, the
    rest decode as a batch of their own (`take`), merged back when the turn ends; copying the live rows' cache
    costs less than a few decode steps over the stopped ones.
    """
    logits = context.feed_chunks(chunks, pad_id)
    stops = torch.tensor(stop_ids)
    live = torch.arange(len(chunks))  # rows still generating, in row order
    decoding, decoding_rows = context, live  # the batch being fed, and which rows of `context` it holds
    taken: list[tuple[_BatchContext, torch.Tensor]] = []  # each taken batch's parent and the parent's rows
    tokens: list[list[int]] = [[] for _ in chunks]
    logprob = [0.0] * len(chunks)
    stopped = [False] * len(chunks)
    for step in range(sampling.max_new_tokens):
        drawn, drawn_logprob = _draw(logits[torch.isin(decoding_rows, live)], sampling, generator)
        for row, token, token_logprob in zip(live.tolist(), drawn.tolist(), drawn_logprob.tolist(), strict=True):
            tokens[row].append(token)
            logprob[row] += token_logprob
        finished = torch.isin(drawn, stops)
        for row in live[finished].tolist():
            stopped[row] = True
        live, drawn = live[~finished], drawn[~finished]
        if len(live) == 0 or step == sampling.max_new_tokens - 1:
            break
        in_decoding = torch.isin(decoding_rows, live)
        if 2 * len(live) <= len(decoding_rows):
            taken.append((decoding, in_decoding.nonzero().squeeze(-1)))
            decoding, decoding_rows = decoding.take(taken[-1][1]), live
            in_decoding = torch.ones(len(live), dtype=torch.bool)
        input_ids = torch.full((len(decoding_rows), 1), pad_id, dtype=torch.long)
        input_ids[in_decoding, 0] = drawn
        logits = decoding.feed(input_ids, in_decoding[:, None].long())
    while taken:
        parent, rows = taken.pop()
        parent.put(rows, decoding)
        decoding = parent
    return [_Sample(tokens[row], logprob[row], stopped[row]) for row in range(len(chunks))]


@dataclass
class _Episode:
    """An episode in play: its record, its game, and what the model reads next."""

    record: EpisodeRecord
    session: GameSession
    carried: list[int]  # the previous turn's last token, not yet in the KV cache (see _generate_turn)
    pending_ids: list[int]  # the context piece to append before the next generation
    observation: str  # the text behind pending_ids
    observation_truncated: bool = False
    prompt_ids: list[int] = field(default_factory=list)
    history: list[list[int]] = field(default_factory=list)  # per played turn: its generated ids + next observation's
    cached_tokens: int = 0  # tokens of this episode in the batch's KV cache

    @property
    def running(self) -> bool:
        return self.record.termination == "running"

    def next_chunk(self, history_window: int | None) -> list[int]:
        """What to feed before the next turn: the new piece, or (with a window) the whole re-encoded window."""
        if history_window is None:
            return self.carried + self.pending_ids
        return self.prompt_ids + [token for turn in self.history[-history_window:] for token in turn]

    def end(self, termination: str, error: str | None = None) -> None:
        self.record.termination = termination
        self.record.error = error


def _start(spec: EpisodeSpec, session: GameSession, tokenizer: PreTrainedTokenizerBase,
           rules: EpisodeRules) -> _Episode:
    episode = _Episode(EpisodeRecord(spec), session, [], [], "")
    try:
        observation = session.reset(spec.task)
    except EnvError as error:
        episode.end(error.termination, f"reset failed: {error}")
        return episode
    episode.observation, episode.observation_truncated = bounded_observation(observation, rules.max_observation_chars)
    episode.pending_ids = episode.prompt_ids = prompt_ids(tokenizer, rules.system_prompt, episode.observation)
    return episode


def _play_turn(episode: _Episode, sample: _Sample, tokenizer: PreTrainedTokenizerBase, generation_s: float,
               rules: EpisodeRules, context_ids: list[int]) -> None:
    """Apply one generated turn: parse it, send the action to the game, record the turn, prepare the next.

    `context_ids` is what was fed before this turn's generation (without the carried token), as recorded.
    """
    started = time.perf_counter()
    text = tokenizer.decode(sample.token_ids, skip_special_tokens=False)
    reward, done, error, parsed = 0.0, False, None, None
    try:
        admissible = episode.session.admissible_commands() if rules.check_admissible else None
        parsed = parse_turn(text, budget_exhausted=not sample.stopped, admissible=admissible)
        if parsed.malformed:
            feedback = (INVALID_ACTION_OBSERVATION if parsed.reason == MalformedReason.NOT_ADMISSIBLE
                        else INVALID_FORMAT_OBSERVATION)
            next_observation = feedback
            if rules.noop_action is not None:  # the game's clock moves and the model sees where it stands
                result = episode.session.step(rules.noop_action)
                reward, done = result.reward, result.done
                next_observation = f"{feedback}\n{result.observation}"
        else:
            result = episode.session.step(parsed.action)
            reward, done, next_observation = result.reward, result.done, result.observation
            episode.record.score, episode.record.won = result.score, result.won
    except EnvError as failure:
        parsed = parsed or parse_turn(text, budget_exhausted=not sample.stopped)
        error = failure
    episode.record.turns.append(TurnRecord(
        turn_index=len(episode.record.turns),
        observation=episode.observation,
        observation_truncated=episode.observation_truncated,
        context_token_ids=context_ids,
        context_reset=rules.history_window is not None,
        generated_token_ids=sample.token_ids,
        generated_text=text,
        think=parsed.think,
        action=parsed.action,
        malformed=parsed.malformed,
        malformed_reason=None if parsed.reason is None else parsed.reason.value,
        env_reward=reward,
        done=done,
        sampling_logprob=sample.logprob,
        latency_s=generation_s + time.perf_counter() - started,
    ))
    episode.carried = sample.token_ids[-1:]
    episode.cached_tokens += len(context_ids) + len(sample.token_ids) - 1
    if error is not None:
        episode.end(error.termination, f"step failed: {error}")
    elif done:
        episode.end("won" if episode.record.won else "lost")
    else:
        episode.observation, episode.observation_truncated = bounded_observation(next_observation,
                                                                                 rules.max_observation_chars)
        episode.pending_ids = observation_ids(tokenizer, episode.observation)
        episode.history.append(sample.token_ids + episode.pending_ids)


def _batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """A generator per batch, so a batch's rollouts do not depend on how many tokens earlier batches drew."""
    state = np.random.SeedSequence([seed, batch_index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _end_overflowing(rows: list[_Episode], rules: EpisodeRules, max_new_tokens: int) -> None:
    """End episodes whose next turn could push their context past `max_context_tokens`."""
    for episode in rows:
        chunk = len(episode.next_chunk(rules.history_window))
        cached = episode.cached_tokens if rules.history_window is None else 0
        if episode.running and cached + chunk + max_new_tokens > rules.max_context_tokens:
            episode.end("context_full")


@torch.inference_mode()
def play_episodes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    specs: list[EpisodeSpec],
    pool: EnvPool,
    sampling: SamplingConfig,
    rules: EpisodeRules,
    batch_episodes: int,
    seed: int,
    first_batch: int = 0,
    on_turn: Callable[[int], None] | None = None,
) -> list[EpisodeRecord]:
    """Play every spec to its end and return the records in spec order.

    Episodes run `batch_episodes` at a time. An episode ends when the game says done (won or lost), after
    `rules.max_turns` turns (malformed turns count), when its context is full, or when its game fails
    (env_error / env_timeout, keeping the turns played). The same seed, model and specs give identical records.
    `first_batch` numbers the first batch, so a shard playing batches k, k+1, … of a larger set of specs samples
    them exactly as the whole set's play does.
    `on_turn(n)` is called after each batched turn with the number n of turns played so far over all episodes,
    to drive a progress bar.

    A turn's latency is the wall time of the batched generation it was part of plus its own parsing and game
    step, i.e. what the episode waited for. The games of a batch reset and step concurrently: each session is
    its own worker process, so threads overlap their round trips (the sampling stays on this thread, so the
    records do not depend on thread timing).
    """
    check_supported(model)
    model.eval()
    stop_ids = stop_token_ids(tokenizer)
    records: list[EpisodeRecord] = []
    turns_played = 0
    with ThreadPoolExecutor(max_workers=batch_episodes, thread_name_prefix="game") as games:
        for batch_index, start in enumerate(range(0, len(specs), batch_episodes), start=first_batch):
            batch = specs[start:start + batch_episodes]
            generator = _batch_generator(seed, batch_index)
            episodes = list(games.map(_start, batch, pool.sessions(len(batch)), repeat(tokenizer), repeat(rules)))
            # The episodes in the KV cache, in row order.
            rows = [episode for episode in episodes if episode.running]
            context = _BatchContext(model, len(rows))
            for _ in range(rules.max_turns):
                _end_overflowing(rows, rules, sampling.max_new_tokens)
                running = [row for row, episode in enumerate(rows) if episode.running]
                if not running:
                    break
                if rules.history_window is not None:  # the window's prefix moved: encode it afresh
                    rows = [rows[row] for row in running]
                    context = _BatchContext(model, len(rows))
                else:
                    if len(running) < len(rows):
                        context.select(torch.tensor(running))
                        rows = [rows[row] for row in running]
                    context.compact()
                chunks = [episode.next_chunk(rules.history_window) for episode in rows]
                recorded = [chunk if rules.history_window is not None else episode.pending_ids
                            for chunk, episode in zip(chunks, rows, strict=True)]
                started = time.perf_counter()
                samples = _generate_turn(context, chunks, sampling, stop_ids, tokenizer.pad_token_id, generator)
                generation_s = time.perf_counter() - started
                list(games.map(_play_turn, rows, samples, repeat(tokenizer), repeat(generation_s), repeat(rules),
                               recorded))
                turns_played += len(rows)
                if on_turn is not None:
                    on_turn(turns_played)
            for episode in episodes:
                if episode.running:
                    episode.end("max_turns")
            records.extend(episode.record for episode in episodes)
    return records
