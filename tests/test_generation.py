"""Conversation encoding and the rollout engine, played against real TextWorldExpress games.

The policy is tiny (hidden 64, 2 layers). One copy is briefly fine-tuned on expert games so that it writes
well-formed turns that reach the game; an untrained copy writes garbage, which exercises the malformed path.
"""

from __future__ import annotations

import pytest
import torch

from dypo.stages import generation
from dypo.stages.config import EnvConfig, ModelConfig, SamplingConfig
from dypo.stages.conversation import expert_sequence, observation_ids, prompt_ids, turn_ids
from dypo.stages.environments import EnvError, EnvPool, StepResult, get_family
from dypo.stages.generation import (
    INVALID_ACTION_OBSERVATION,
    INVALID_FORMAT_OBSERVATION,
    TRUNCATION_MARK,
    EpisodeRules,
    play_episodes,
)
from dypo.stages.policy import build_model, stop_token_ids, train_tokenizer
from dypo.stages.trajectory import EpisodeRecord, EpisodeSpec, Task
from dypo.stages.turn_format import SYSTEM_PROMPT, render_turn

ENV = EnvConfig()
TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
TERMINATIONS = {"won", "lost", "max_turns", "context_full", "env_error", "env_timeout"}


@pytest.fixture(scope="module")
def pool():
    with EnvPool(ENV, size=4) as pool:
        yield pool


@pytest.fixture(scope="module")
def games(pool):
    return pool.expert_episodes(get_family(ENV).make_tasks("train", 24))


@pytest.fixture(scope="module")
def tokenizer(games):
    texts = [SYSTEM_PROMPT] + [piece for turns in games for turn in turns
                               for piece in (turn.observation, render_turn(turn.think, turn.action))]
    return train_tokenizer(texts, vocab_size=512)


@pytest.fixture(scope="module")
def untrained(tokenizer):
    return build_model(tokenizer, TINY, seed=0)


@pytest.fixture(scope="module")
def trained(tokenizer, games):
    """100 supervised steps on whole expert games: enough to keep the turn format for a whole episode, and to win
    a game whose coin lies in the first room (tests that need an early win pick such games: `_short_and_long`)."""
    model = build_model(tokenizer, TINY, seed=0)
    sequences = [expert_sequence(tokenizer, SYSTEM_PROMPT, turns) for turns in games]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(100):
        picked = torch.randperm(len(sequences), generator=generator)[:8].tolist()
        width = max(len(sequences[i][0]) for i in picked)
        input_ids = torch.full((len(picked), width), tokenizer.pad_token_id)
        labels = torch.full((len(picked), width), -100)
        for row, index in enumerate(picked):
            ids, mask = sequences[index]
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(ids)] = torch.where(torch.tensor(mask) == 1, torch.tensor(ids), -100)
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _rules(max_turns: int, **changes) -> EpisodeRules:
    """The engine's limits as the tiny default sets them, with `changes`."""
    fields = {"system_prompt": SYSTEM_PROMPT, "max_observation_chars": ENV.max_observation_chars,
              "max_context_tokens": 2048, **changes}
    return EpisodeRules(max_turns=max_turns, **fields)


def _specs(count: int, group_size: int = 2, tasks: list[Task] | None = None) -> list[EpisodeSpec]:
    """`count` episodes in groups of `group_size`, on `tasks` or on train games the policy never saw."""
    tasks = tasks or get_family(ENV).make_tasks("train", count // group_size, start=100)
    return [EpisodeSpec(task, f"g{i // group_size}", f"e{i}") for i, task in enumerate(
        task for task in tasks for _ in range(group_size))][:count]


def _short_and_long(pool: EnvPool) -> list[Task]:
    """An unseen game the expert wins in one step (the coin is in the first room) and one it needs 6+ steps for."""
    tasks = get_family(ENV).make_tasks("train", 40, start=100)
    lengths = [len(turns) for turns in pool.expert_episodes(tasks)]
    return [next(task for task, n in zip(tasks, lengths, strict=True) if n == 1),
            next(task for task, n in zip(tasks, lengths, strict=True) if n >= 6)]


def _full_sequence(record: EpisodeRecord) -> tuple[list[int], list[tuple[int, int]]]:
    """The episode's token sequence and, per turn, the (start, end) of its generated tokens."""
    sequence: list[int] = []
    spans = []
    for turn in record.turns:
        sequence += turn.context_token_ids
        spans.append((len(sequence), len(sequence) + len(turn.generated_token_ids)))
        sequence += turn.generated_token_ids
    return sequence, spans


def _tokens(records: list[EpisodeRecord]) -> list[list[list[int]]]:
    return [[turn.generated_token_ids for turn in record.turns] for record in records]


# --- conversation encoding ---------------------------------------------------------------------------------------


def test_prompt_is_the_chat_template(tokenizer, games):
    observation = games[0][0].observation
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": observation}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt_ids(tokenizer, SYSTEM_PROMPT, observation) == tokenizer.encode(expected, add_special_tokens=False)


def test_observation_closes_and_reopens_the_assistant_message(tokenizer):
    text = tokenizer.decode(observation_ids(tokenizer, "You see a door."), skip_special_tokens=False)
    assert text == "<|im_end|>\n<|im_start|>user\nYou see a door.<|im_end|>\n<|im_start|>assistant\n"


def test_expert_sequence_masks_exactly_the_turns(tokenizer, games):
    turns = max(games, key=len)
    input_ids, loss_mask = expert_sequence(tokenizer, SYSTEM_PROMPT, turns)
    assert len(input_ids) == len(loss_mask)
    expected_ids, expected_mask = [], []
    for index, turn in enumerate(turns):
        context = (prompt_ids(tokenizer, SYSTEM_PROMPT, turn.observation) if index == 0
                   else observation_ids(tokenizer, turn.observation))
        generated = turn_ids(tokenizer, turn.think, turn.action)
        assert generated[-1] == tokenizer.convert_tokens_to_ids("</action>")
        assert tokenizer.decode(generated) == render_turn(turn.think, turn.action)
        expected_ids += context + generated
        expected_mask += [0] * len(context) + [1] * len(generated)
    assert (input_ids, loss_mask) == (expected_ids, expected_mask)


# --- the rollout engine ------------------------------------------------------------------------------------------


def test_same_seed_same_records_other_seed_other_tokens(trained, tokenizer, pool):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=24)
    play = [play_episodes(trained, tokenizer, _specs(6), pool, sampling, rules=_rules(3), batch_episodes=4, seed=seed)
            for seed in (7, 7, 8)]
    first, again, other = play
    assert _tokens(first) == _tokens(again)
    assert [[t.sampling_logprob for t in r.turns] for r in first] == [[t.sampling_logprob for t in r.turns]
                                                                      for r in again]
    assert [r.termination for r in first] == [r.termination for r in again]
    assert _tokens(first) != _tokens(other)


def test_recorded_logprobs_are_the_models_on_the_full_sequence(trained, tokenizer, pool):
    """The on-policy check: what the optimize stage recomputes on the stored ids is what the sampler drew."""
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=24)
    records = play_episodes(trained, tokenizer, _specs(6), pool, sampling, rules=_rules(4), batch_episodes=4, seed=1)
    checked = 0
    for record in records:
        assert record.termination in TERMINATIONS
        sequence, spans = _full_sequence(record)
        assert record.turns[0].context_token_ids == prompt_ids(tokenizer, SYSTEM_PROMPT, record.turns[0].observation)
        for turn in record.turns[1:]:
            assert turn.context_token_ids == observation_ids(tokenizer, turn.observation)
        with torch.no_grad():
            logits = trained(input_ids=torch.tensor([sequence])).logits[0]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        targets = torch.tensor(sequence)
        for turn, (start, end) in zip(record.turns, spans, strict=True):
            recomputed = logprobs[start - 1:end - 1].gather(-1, targets[start:end, None]).sum().item()
            assert recomputed == pytest.approx(turn.sampling_logprob, abs=1e-4)
            checked += 1
    assert checked >= len(records)


def test_turns_stop_at_action_close_and_reach_the_game(trained, tokenizer, pool):
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=32)
    specs = _specs(4)
    steps: list[int] = []
    records = play_episodes(trained, tokenizer, specs, pool, sampling, rules=_rules(4), batch_episodes=4, seed=0,
                            on_turn=steps.append)
    action_close = tokenizer.convert_tokens_to_ids("</action>")
    turns = [turn for record in records for turn in record.turns]
    assert steps[-1] == len(turns) and steps == sorted(steps)
    assert [record.spec for record in records] == specs
    well_formed = [turn for turn in turns if not turn.malformed]
    assert well_formed, "the fine-tuned policy should write at least one well-formed turn"
    for turn in well_formed:
        assert turn.generated_token_ids.count(action_close) == 1 and turn.generated_token_ids[-1] == action_close
        assert turn.generated_text.endswith("</action>") and turn.action
    for turn in turns:
        ended = turn.generated_token_ids[-1] in stop_token_ids(tokenizer)
        assert ended or len(turn.generated_token_ids) == sampling.max_new_tokens
        assert ended or turn.malformed_reason == "budget_exhausted"
        assert not any(token in stop_token_ids(tokenizer) for token in turn.generated_token_ids[:-1])
    for record in records:
        assert record.termination in TERMINATIONS
        assert record.turns[-1].done == (record.termination in {"won", "lost"})
        assert len(record.turns) == 4 or record.termination != "max_turns"


def test_greedy_is_temperature_zero_argmax(trained, tokenizer, pool):
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=24)
    first, other_seed = (play_episodes(trained, tokenizer, _specs(4), pool, sampling, rules=_rules(2), batch_episodes=4,
                                       seed=seed) for seed in (0, 5))
    assert _tokens(first) == _tokens(other_seed)
    for record in first:
        sequence, spans = _full_sequence(record)
        with torch.no_grad():
            logits = trained(input_ids=torch.tensor([sequence])).logits[0]
        for turn, (start, end) in zip(record.turns, spans, strict=True):
            assert logits[start - 1:end - 1].argmax(dim=-1).tolist() == turn.generated_token_ids
            assert turn.sampling_logprob == 0.0
    # a nucleus so small that only the top token is in it samples greedily too
    tiny_nucleus = SamplingConfig(temperature=1.0, top_p=1e-6, max_new_tokens=24)
    nucleus = play_episodes(trained, tokenizer, _specs(4), pool, tiny_nucleus, rules=_rules(2), batch_episodes=4,
                            seed=3)
    assert _tokens(nucleus) == _tokens(first)
    assert all(turn.sampling_logprob == 0.0 for record in nucleus for turn in record.turns)


def test_malformed_turn_sends_nothing_and_says_so(untrained, tokenizer, pool):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    records = play_episodes(untrained, tokenizer, _specs(2), pool, sampling, rules=_rules(3), batch_episodes=2, seed=0)
    for record in records:
        assert record.termination == "max_turns" and len(record.turns) == 3
        for previous, turn in zip(record.turns, record.turns[1:], strict=False):
            if previous.malformed:
                assert turn.observation == INVALID_FORMAT_OBSERVATION
                assert previous.action is None and previous.env_reward == 0.0 and not previous.done


class _FailingPool:
    """Real sessions whose game engine fails at the second step."""

    class Session:
        def __init__(self, session):
            self.session, self.steps = session, 0

        def reset(self, task):
            return self.session.reset(task)

        def step(self, action) -> StepResult:
            self.steps += 1
            if self.steps == 2:
                raise EnvError("the JVM went away")
            return self.session.step(action)

        def admissible_commands(self):
            return self.session.admissible_commands()

    def __init__(self, pool):
        self.pool = pool

    def sessions(self, n):
        return [self.Session(session) for session in self.pool.sessions(n)]


def test_env_error_ends_the_episode_and_keeps_its_turns(trained, tokenizer, pool):
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=32)
    records = play_episodes(trained, tokenizer, _specs(4), _FailingPool(pool), sampling, rules=_rules(6),
                            batch_episodes=4, seed=0)
    failed = [record for record in records if record.termination == "env_error"]
    assert failed, "some episode should have reached a second game step"
    for record in failed:
        assert "JVM went away" in record.error
        assert sum(not turn.malformed for turn in record.turns) == 2
        assert not record.turns[-1].malformed and not record.turns[-1].done


# --- context bounds, KV-cache reuse, malformed-turn handling ------------------------------------------------------


def test_kv_cache_reuse_gives_the_tokens_of_full_re_encoding(trained, tokenizer, pool):
    """A history window as long as the episode re-encodes the whole history every turn, with no cache across turns;
    greedy decoding must produce exactly the tokens of the engine that keeps one KV cache for the episode."""
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=32)
    cached = play_episodes(trained, tokenizer, _specs(6), pool, greedy, rules=_rules(5), batch_episodes=3, seed=0)
    re_encoded = play_episodes(trained, tokenizer, _specs(6), pool, greedy, rules=_rules(5, history_window=5),
                               batch_episodes=3, seed=0)
    assert sum(len(record.turns) for record in cached) > 6, "episodes should run several turns"
    assert _tokens(re_encoded) == _tokens(cached)
    assert all(turn.context_reset for record in re_encoded for turn in record.turns)
    assert not any(turn.context_reset for record in cached for turn in record.turns)


def test_a_history_window_keeps_the_prompt_and_the_last_turns(trained, tokenizer, pool):
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=32)
    (record,) = play_episodes(trained, tokenizer, _specs(2, group_size=1)[:1], pool, sampling,
                              rules=_rules(4, history_window=1), batch_episodes=1, seed=0)
    assert len(record.turns) >= 3, "the episode should last a few turns"
    prompt = record.turns[0].context_token_ids
    for previous, turn in zip(record.turns, record.turns[1:], strict=False):
        expected = prompt + previous.generated_token_ids + observation_ids(tokenizer, turn.observation)
        assert turn.context_token_ids == expected


def _played_with_forward_shapes(model, tokenizer, pool, sampling: SamplingConfig, max_turns: int,
                                specs: list[EpisodeSpec]) -> tuple[list[EpisodeRecord], list[tuple[int, int]]]:
    """The episodes played in one batch, and the [rows, width] of every forward pass the engine made."""
    shapes: list[tuple[int, int]] = []
    forward = generation.forward_block

    def recording(model, cache, input_ids, *args):
        shapes.append(tuple(input_ids.shape))
        return forward(model, cache, input_ids, *args)

    generation.forward_block = recording
    try:
        records = play_episodes(model, tokenizer, specs, pool, sampling, rules=_rules(max_turns),
                                batch_episodes=len(specs), seed=0)
    finally:
        generation.forward_block = forward
    return records, shapes


def test_a_finished_episode_leaves_the_batch(trained, tokenizer, pool):
    """Each turn starts with one forward over the new context pieces; its batch holds only running episodes
    (the first turn's, one row per distinct prompt)."""
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=32)
    records, shapes = _played_with_forward_shapes(trained, tokenizer, pool, greedy, 6,
                                                  _specs(4, tasks=_short_and_long(pool)))
    rows_per_turn = [rows for rows, width in shapes if width > 1]  # a turn's first feed; token steps feed width 1
    running = [sum(len(record.turns) > turn for record in records) for turn in range(6)]
    assert rows_per_turn == [2] + [count for count in running[1:] if count]
    assert [record.termination for record in records[:2]] == ["won", "won"], "the coin was in the first room"
    assert running[-1] < running[0], "the won episodes should stop consuming compute"


def test_a_groups_shared_prompt_is_encoded_once_and_its_episodes_sample_apart(trained, tokenizer, pool):
    """Two groups of two start from two prompts: the first forward encodes two rows, and each episode then
    samples on its own (same prompt, different turns)."""
    records, shapes = _played_with_forward_shapes(trained, tokenizer, pool, SamplingConfig(temperature=1.0,
                                                                                          max_new_tokens=24), 2,
                                                  _specs(4, group_size=2))
    assert shapes[0][0] == 2
    for group in range(2):
        members = records[2 * group:2 * group + 2]
        assert len({tuple(record.turns[0].context_token_ids) for record in members}) == 1
        assert len({tuple(tuple(turn.generated_token_ids) for turn in record.turns) for record in members}) > 1


def test_rows_that_ended_their_turn_leave_the_decode_batch(trained, tokenizer, pool):
    """Once half the rows decoding together have ended their turn, the others decode as a batch of their own: the
    rows of every single-token forward follow that rule exactly, given the turns' lengths."""
    records, shapes = _played_with_forward_shapes(trained, tokenizer, pool, SamplingConfig(temperature=1.0,
                                                                                          max_new_tokens=32), 4,
                                                  _specs(4))
    decode_rows = [rows for rows, width in shapes if width == 1]
    expected = []
    for turn in range(4):
        lengths = [len(record.turns[turn].generated_token_ids) for record in records if len(record.turns) > turn]
        rows = len(lengths)
        for step in range(max(lengths, default=0) - 1):  # the feed after each draw but the last
            live = sum(length > step + 1 for length in lengths)
            rows = live if 2 * live <= rows else rows
            expected.append(rows)
    assert decode_rows == expected
    assert min(expected) < 4 / 2, "some turns should end early, so later steps decode fewer rows"


def test_a_full_context_ends_the_episode_within_its_bound(trained, tokenizer, pool):
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=32)
    limit = 260
    records = play_episodes(trained, tokenizer, _specs(4), pool, sampling, rules=_rules(8, max_context_tokens=limit),
                            batch_episodes=4, seed=0)
    assert any(record.termination == "context_full" for record in records)
    for record in records:
        sequence, _ = _full_sequence(record)
        assert len(sequence) <= limit


def test_long_observations_are_cut_and_flagged(trained, tokenizer, pool):
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=32)
    records = play_episodes(trained, tokenizer, _specs(2), pool, sampling, rules=_rules(2, max_observation_chars=60),
                            batch_episodes=2, seed=0)
    first = records[0].turns[0]
    assert first.observation_truncated and first.observation.endswith(TRUNCATION_MARK)
    assert all(len(turn.observation) <= 60 for record in records for turn in record.turns)


def test_noop_after_a_malformed_turn_shows_the_game_state(untrained, tokenizer, pool):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    records = play_episodes(untrained, tokenizer, _specs(2), pool, sampling,
                            rules=_rules(3, noop_action="look around"), batch_episodes=2, seed=0)
    followed = [(previous, turn) for record in records for previous, turn in zip(record.turns, record.turns[1:],
                                                                                 strict=False) if previous.malformed]
    assert followed
    for _, turn in followed:
        assert turn.observation.startswith(INVALID_FORMAT_OBSERVATION + "\n")
        assert "You are in the" in turn.observation  # the no-op's answer: where the agent stands


def test_an_inadmissible_action_is_malformed_and_never_reaches_the_game(trained, tokenizer, pool):
    """Sessions that admit only `look around`: every well-formed turn of the policy is then not admissible."""

    class OnlyLook(_FailingPool.Session):
        def step(self, action):
            assert action == "look around", f"{action!r} reached the game"
            return self.session.step(action)

        def admissible_commands(self):
            return ["look around"]

    class OnlyLookPool(_FailingPool):
        def sessions(self, n):
            return [OnlyLook(session) for session in self.pool.sessions(n)]

    sampling = SamplingConfig(temperature=0.0, max_new_tokens=32)
    records = play_episodes(trained, tokenizer, _specs(2), OnlyLookPool(pool), sampling,
                            rules=_rules(2, check_admissible=True), batch_episodes=2, seed=0)
    first = records[0].turns[0]
    assert first.malformed and first.malformed_reason == "not_admissible" and first.action is None
    assert records[0].turns[1].observation == INVALID_ACTION_OBSERVATION
