"""Packed scoring against the padded batch it replaces, on a real tiny Qwen2 in fp32 on CPU.

Tolerance: per-token log-probs and entropies of a packed forward equal those of one unpadded forward per
sequence within 1e-5 absolute (fp32 logits of order 1: what differs is only the reduction order inside the
attention kernels), and parameter gradients of the loss within 1e-5 relative + 1e-7 absolute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import Qwen2Config, Qwen2ForCausalLM

from dypo.stages.dypo_loss import dypo_loss, token_logprobs
from dypo.stages.packing import (
    PACKING_ATTENTION,
    pack_rows,
    pack_sequences,
    packed_micro_batches,
    packed_token_logprobs,
)
from dypo.stages.sequences import TrainingSequence, collate
from dypo.stages.trainer import DeepSpeedTrainer

VOCAB, PAD = 300, 0
ATOL = 1e-5


def tiny_model(attn_implementation: str = "sdpa") -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Qwen2ForCausalLM(config).eval()


def make_sequences(lengths: list[int], seed: int = 0) -> list[TrainingSequence]:
    """Random token ids laid out like episodes: the first third prompt, then turns of 5 generated tokens and
    3 observation tokens; advantages vary in sign and size."""
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for index, length in enumerate(lengths):
        ids = torch.randint(1, VOCAB, (length,), generator=generator).tolist()
        prompt = max(1, length // 3)
        loss_mask = [int(i >= prompt and (i - prompt) % 8 < 5) for i in range(length)]
        sequences.append(TrainingSequence(ids, loss_mask, (-1) ** index * (index + 1)))
    return sequences


# very different lengths, including a single token and sequences that fill a row on their own
LENGTHS = [3, 150, 1, 40, 97, 12, 64, 2, 120]
BUDGET = 160


@pytest.mark.parametrize("attn_implementation", PACKING_ATTENTION)
def test_packed_logprobs_equal_one_unpadded_forward_per_sequence(attn_implementation: str) -> None:
    model = tiny_model(attn_implementation)
    sequences = make_sequences(LENGTHS)
    packed = pack_sequences(sequences, BUDGET, PAD)
    assert packed.input_ids.shape[0] < len(sequences)  # several sequences share rows
    with torch.no_grad():
        logp, entropy = packed_token_logprobs(model, packed, temperature=0.7, with_entropy=True)
        for seq, got_logp, got_entropy in zip(sequences, packed.unpack(logp), packed.unpack(entropy), strict=True):
            ids = torch.tensor([seq.input_ids])
            want_logp, want_entropy = token_logprobs(model, ids, torch.ones_like(ids), with_entropy=True,
                                                     temperature=0.7)
            loss_tokens = torch.tensor(seq.loss_mask, dtype=torch.bool)
            torch.testing.assert_close(got_logp[loss_tokens], want_logp[0, loss_tokens], rtol=0, atol=ATOL)
            torch.testing.assert_close(got_entropy[loss_tokens], want_entropy[0, loss_tokens], rtol=0, atol=ATOL)
            assert (got_logp[~loss_tokens] == 0).all() and (got_entropy[~loss_tokens] == 0).all()
    assert (logp[~packed.loss_mask] == 0).all() and (entropy[~packed.loss_mask] == 0).all()
    assert (logp[packed.loss_mask] < 0).all() and (entropy[packed.loss_mask] > 0).all()
    assert packed_token_logprobs(model, packed)[1] is None


def test_a_sequence_never_attends_to_its_row_neighbours() -> None:
    """Changing one sequence's tokens leaves every other sequence's log-probs bit for bit the same."""
    model = tiny_model()
    sequences = make_sequences([30, 20, 25], seed=1)
    for changed in range(len(sequences)):
        edited = list(sequences)
        ids = [(token % (VOCAB - 1)) + 1 for token in sequences[changed].input_ids[::-1]]
        edited[changed] = TrainingSequence(ids, sequences[changed].loss_mask, sequences[changed].advantage)
        with torch.no_grad():
            before, after = (pack_sequences(seqs, 100, PAD) for seqs in (sequences, edited))
            assert before.input_ids.shape[0] == 1  # all three in one row, in the same places
            assert before.spans == after.spans
            old = before.unpack(packed_token_logprobs(model, before)[0])
            new = after.unpack(packed_token_logprobs(model, after)[0])
        for index in range(len(sequences)):
            assert torch.equal(old[index], new[index]) is (index != changed)


@pytest.mark.parametrize("attn_implementation", PACKING_ATTENTION)
def test_loss_gradients_equal_those_of_the_padded_batch(attn_implementation: str) -> None:
    sequences = make_sequences(LENGTHS, seed=2)
    packed = pack_sequences(sequences, BUDGET, PAD)
    padded = collate(sequences, PAD)
    total = sum(seq.num_loss_tokens for seq in sequences)
    assert packed.num_loss_tokens == total and packed.num_tokens == sum(LENGTHS)
    reference = tiny_model()
    with torch.no_grad():
        logp, _ = token_logprobs(reference, padded["input_ids"], padded["attention_mask"])
    # pi_old off the current policy, so ratios leave 1 and some clip
    generator = torch.Generator().manual_seed(3)
    old = [logp[row, :len(seq.input_ids)] + 0.3 * torch.randn(len(seq.input_ids), generator=generator)
           for row, seq in enumerate(sequences)]

    def gradients(packing: bool) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        model = tiny_model(attn_implementation).train()
        if packing:
            logp, _ = packed_token_logprobs(model, packed)
            loss, stats = dypo_loss(logp, packed.place(old), packed.advantages, packed.loss_mask, 0.2, 0.28, total)
        else:
            logp, _ = token_logprobs(model, padded["input_ids"], padded["attention_mask"])
            logp_old = torch.zeros_like(logp)
            for row, values in enumerate(old):
                logp_old[row, :len(values)] = values
            loss, stats = dypo_loss(logp, logp_old, padded["advantages"], padded["loss_mask"], 0.2, 0.28, total)
        loss.backward()
        return {name: param.grad for name, param in model.named_parameters()}, {"loss": loss.item(), **stats}

    packed_grads, packed_stats = gradients(packing=True)
    padded_grads, padded_stats = gradients(packing=False)
    assert 0 < packed_stats["clip_fraction"] < 1
    assert packed_stats == pytest.approx(padded_stats, rel=1e-5)
    for name, grad in padded_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-7)


def test_packed_scoring_through_the_deepspeed_engine(tmp_path: Path) -> None:
    """Optimize calls the loss with the engine, whose own `config` is DeepSpeed's: scoring must find the model's."""
    model = tiny_model()
    sequences = make_sequences([20, 9, 33], seed=4)
    packed = pack_sequences(sequences, 64, PAD)
    with torch.no_grad():
        want, _ = packed_token_logprobs(model, packed)
    trainer = DeepSpeedTrainer(model, learning_rate=1e-3, zero_stage=0, max_grad_norm=1.0,
                               extensions_dir=Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions")
    with torch.no_grad():
        got, _ = packed_token_logprobs(trainer.engine, packed)
    assert torch.equal(got, want)


def test_rows_respect_the_budget_and_an_overlong_sequence_gets_its_own_row() -> None:
    assert pack_rows([5, 3, 7, 2, 4], 10) == [[2, 1], [0, 4], [3]]
    assert pack_rows([25, 4, 6], 10) == [[0], [2, 1]]
    packed = pack_sequences(make_sequences([25, 4, 6]), 10, PAD)
    assert packed.input_ids.shape == (2, 25)  # the overlong row sets the width; the other row is padded
    assert packed.sequence_index[1].tolist() == [2] * 6 + [1] * 4 + [-1] * 15
    assert packed.position_ids[1].tolist() == [*range(6), *range(4), *range(15)]
    assert packed.spans[1].row == 1 and packed.spans[1].start == 6 and packed.spans[1].length == 4


def test_place_and_unpack_are_inverse_and_check_shapes() -> None:
    sequences = make_sequences([4, 7, 2])
    packed = pack_sequences(sequences, 8, PAD)
    values = [torch.arange(len(seq.input_ids), dtype=torch.float32) + 10 * i for i, seq in enumerate(sequences)]
    placed = packed.place(values)
    assert all(torch.equal(a, b) for a, b in zip(packed.unpack(placed), values, strict=True))
    assert (placed[packed.sequence_index < 0] == 0).all()
    for seq, advantages, loss_mask in zip(sequences, packed.unpack(packed.advantages), packed.unpack(packed.loss_mask),
                                          strict=True):
        assert loss_mask.tolist() == [bool(m) for m in seq.loss_mask]
        assert advantages.tolist() == [m * seq.advantage for m in seq.loss_mask]
    with pytest.raises(ValueError, match="values for 2 sequences"):
        packed.place(values[:2])
    with pytest.raises(ValueError, match="sequence 1 has 7 tokens"):
        packed.place([values[0], values[1][:3], values[2]])


def test_micro_batches_pack_rows_as_wide_as_the_longest_sequence_into_the_budget() -> None:
    sequences = make_sequences(LENGTHS)
    chosen = [8, 0, 3, 5, 1, 6, 7, 2]  # lengths 120, 3, 40, 12, 150, 64, 2, 1: rows of at most 150 tokens
    batches = packed_micro_batches(sequences, chosen, 320, PAD)
    assert sorted(index for members, _ in batches for index in members) == sorted(chosen)
    # rows 150 | 120+12+3+2+1 | 64+40: two rows fit 320 slots; the last pass is as wide as its own row
    assert [packed.input_ids.shape for _, packed in batches] == [(2, 150), (1, 104)]
    for members, packed in batches:
        assert packed.input_ids.numel() <= 320
        for index, ids in zip(members, packed.unpack(packed.input_ids), strict=True):
            assert ids.tolist() == sequences[index].input_ids
    # a budget below the longest sequence still runs it, one row per pass
    one_row_each = packed_micro_batches(sequences, chosen, 100, PAD)
    assert [packed.input_ids.shape for _, packed in one_row_each] == [(1, 150), (1, 138), (1, 104)]
    with pytest.raises(ValueError, match="no sequences were chosen"):
        packed_micro_batches(sequences, [], 100, PAD)
    with pytest.raises(ValueError, match="token_budget must be at least 1"):
        packed_micro_batches(sequences, chosen, 0, PAD)


@pytest.mark.parametrize(("lengths", "budget", "message"), [
    ([3, 4], 0, "token_budget must be at least 1"),
    ([3, 0], 8, "at least one token"),
])
def test_bad_packing_requests_are_refused(lengths: list[int], budget: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pack_rows(lengths, budget)


def test_an_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="no sequences"):
        pack_sequences([], 8, PAD)


def test_flash_attention_is_refused_with_the_fix() -> None:
    model = tiny_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        packed_token_logprobs(model, pack_sequences(make_sequences([3, 4]), 8, PAD))


@given(st.lists(st.integers(1, 40), max_size=60), st.integers(1, 48))
def test_first_fit_decreasing_places_each_sequence_once_within_budget(lengths: list[int], budget: int) -> None:
    rows = pack_rows(lengths, budget)
    assert sorted(index for row in rows for index in row) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in row) for row in rows]
    for row, load in zip(rows, loads, strict=True):
        assert load <= budget or len(row) == 1
    # first fit never leaves two rows that one row could hold: any two rows together exceed the budget
    assert all(loads[i] + loads[j] > budget for i in range(len(rows)) for j in range(i + 1, len(rows)))
