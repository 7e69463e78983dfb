"""Conversation encoding and the rollout engine, played against real TextWorldExpress games.

The policy is tiny (hidden 64, 2 layers). One copy is briefly fine-tuned on expert games so that it writes
well-formed turns that reach the game; an untrained copy writes garbage, which exercises the malformed path.
"""

from __future__ import annotations

import pytest
import torch

from dypo.stages.config import EnvConfig, ModelConfig, SamplingConfig
from dypo.stages.conversation import expert_sequence, observation_ids, prompt_ids, turn_ids
from dypo.stages.environments import EnvError, EnvPool, StepResult, expert_turns, make_tasks
from dypo.stages.generation import INVALID_FORMAT_OBSERVATION, play_episodes
from dypo.stages.policy import build_model, stop_token_ids, train_tokenizer
from dypo.stages.trajectory import EpisodeRecord, EpisodeSpec
from dypo.stages.turn_format import SYSTEM_PROMPT, render_turn

ENV = EnvConfig()
TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
TERMINATIONS = {"won", "lost", "max_turns", "env_error"}


@pytest.fixture(scope="module")
def pool():
    with EnvPool(ENV, size=4) as pool:
        yield pool


@pytest.fixture(scope="module")
def games(pool):
    session = pool.sessions(1)[0]
    return [expert_turns(ENV, task, session) for task in make_tasks(ENV, "train", 24)]


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
    """100 supervised steps on the experts' first two turns: enough to write the turn format, and to win some."""
    model = build_model(tokenizer, TINY, seed=0)
    sequences = [expert_sequence(tokenizer, turns[:2]) for turns in games]
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


def _specs(count: int, group_size: int = 2) -> list[EpisodeSpec]:
    tasks = make_tasks(ENV, "train", count // group_size, start=100)
    return [EpisodeSpec(task, f"g{i // group_size}", f"e{i}") for i, task in enumerate(
        task for task in tasks for _ in range(group_size))]


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
    assert prompt_ids(tokenizer, observation) == tokenizer.encode(expected, add_special_tokens=False)


def test_observation_closes_and_reopens_the_assistant_message(tokenizer):
    text = tokenizer.decode(observation_ids(tokenizer, "You see a door."), skip_special_tokens=False)
    assert text == "<|im_end|>\n<|im_start|>user\nYou see a door.<|im_end|>\n<|im_start|>assistant\n"


def test_expert_sequence_masks_exactly_the_turns(tokenizer, games):
    turns = max(games, key=len)
    input_ids, loss_mask = expert_sequence(tokenizer, turns)
    assert len(input_ids) == len(loss_mask)
    expected_ids, expected_mask = [], []
    for index, turn in enumerate(turns):
        context = (prompt_ids if index == 0 else observation_ids)(tokenizer, turn.observation)
        generated = turn_ids(tokenizer, turn.think, turn.action)
        assert generated[-1] == tokenizer.convert_tokens_to_ids("</action>")
        assert tokenizer.decode(generated) == render_turn(turn.think, turn.action)
        expected_ids += context + generated
        expected_mask += [0] * len(context) + [1] * len(generated)
    assert (input_ids, loss_mask) == (expected_ids, expected_mask)


# --- the rollout engine ------------------------------------------------------------------------------------------


def test_same_seed_same_records_other_seed_other_tokens(trained, tokenizer, pool):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=24)
    play = [play_episodes(trained, tokenizer, _specs(6), pool, sampling, max_turns=3, batch_episodes=4, seed=seed)
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
    records = play_episodes(trained, tokenizer, _specs(6), pool, sampling, max_turns=4, batch_episodes=4, seed=1)
    checked = 0
    for record in records:
        assert record.termination in TERMINATIONS
        sequence, spans = _full_sequence(record)
        assert record.turns[0].context_token_ids == prompt_ids(tokenizer, record.turns[0].observation)
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
    records = play_episodes(trained, tokenizer, specs, pool, sampling, max_turns=4, batch_episodes=4, seed=0,
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
    first, other_seed = (play_episodes(trained, tokenizer, _specs(4), pool, sampling, max_turns=2, batch_episodes=4,
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
    nucleus = play_episodes(trained, tokenizer, _specs(4), pool, tiny_nucleus, max_turns=2, batch_episodes=4, seed=3)
    assert _tokens(nucleus) == _tokens(first)
    assert all(turn.sampling_logprob == 0.0 for record in nucleus for turn in record.turns)


def test_malformed_turn_sends_nothing_and_says_so(untrained, tokenizer, pool):
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=8)
    records = play_episodes(untrained, tokenizer, _specs(2), pool, sampling, max_turns=3, batch_episodes=2, seed=0)
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
    records = play_episodes(trained, tokenizer, _specs(4), _FailingPool(pool), sampling, max_turns=6,
                            batch_episodes=4, seed=0)
    failed = [record for record in records if record.termination == "env_error"]
    assert failed, "some episode should have reached a second game step"
    for record in failed:
        assert "JVM went away" in record.error
        assert sum(not turn.malformed for turn in record.turns) == 2
        assert not record.turns[-1].malformed and not record.turns[-1].done
