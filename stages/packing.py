"""Padding-free packing: training sequences laid end to end in rows, scored without attending across them.

Right-padding a batch to its longest sequence spends compute on padding in proportion to the spread of lengths,
and episode lengths spread widely (a won-in-two episode next to a ten-turn one). Packing instead fills rows with
whole sequences (first-fit decreasing), so a forward pass costs what the real tokens cost, up to the rows'
tails; `packed_micro_batches` cuts an update into forward passes of a token budget (see there for the row width),
and `packed_token_logprobs` scores only the tokens the loss reads.

Sequences in a row must not see each other. transformers' Qwen2 does this natively from `position_ids`: when no
attention mask and no cache is given, a position that does not continue its predecessor's (here: a restart at 0)
opens a new sequence, and its mask builder confines attention to each sequence, with rotary positions
restarting as well. Two conditions make or break it, both checked against the installed
transformers 5.23 source and by tests/test_packing.py: no `attention_mask` may be passed, and `use_cache` must be
False, since a cache, which Qwen2 creates by default, silently switches the detection off and lets a row attend
across its sequences. Only sdpa (the default) and eager attention are accepted, the two verified here forward
and backward: flash-attention kernels find sequence boundaries in position ids only for a batch of a single row
(they would read each row as one sequence), and flex attention has no backward pass on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dypo.stages.sequences import TrainingSequence

# Attention implementations whose mask builder honours packed position ids on a multi-row batch (verified here).
PACKING_ATTENTION = ("sdpa", "eager")


def pack_rows(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices into `lengths` grouped into rows of at most `token_budget` tokens, by first-fit decreasing.

    Longest first, each sequence goes to the first row with room; rows come in the order they were opened and
    hold their sequences in placement order, so the same lengths always give the same rows. A sequence longer
    than the budget gets a row of its own: it needs that memory whether packed or not (the rollout bounds it by
    `max_context_tokens`), and refusing it would drop an accepted episode after the rollout was paid for.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be at least 1, got {token_budget}")
    if any(length < 1 for length in lengths):
        raise ValueError(f"every sequence needs at least one token; got lengths {sorted(lengths)[:3]}…")
    rows: list[list[int]] = []
    free: list[int] = []  # tokens left in each row
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        row = next((r for r, room in enumerate(free) if room >= length), None)
        if row is None:
            rows.append([index])
            free.append(max(token_budget - length, 0))
        else:
            rows[row].append(index)
            free[row] -= length
    return rows


@dataclass(frozen=True)
class Span:
    """Where one sequence lies in a packed batch."""

    row: int
    start: int
    length: int


@dataclass(frozen=True)
class PackedBatch:
    """Sequences packed into [rows, width] tensors, with everything the loss needs in the same layout.

    `width` is the longest row, so only the rows' tails are padding. `position_ids` restart at 0 with every
    sequence (and with the padding tail, which is its own block of attention); `sequence_index` names the input
    sequence of each token (-1 on padding); `advantages` holds a sequence's advantage on its loss tokens, 0
    elsewhere. `spans[i]` locates input sequence i, in the order the sequences were given.
    """

    input_ids: Tensor
    position_ids: Tensor
    sequence_index: Tensor
    loss_mask: Tensor
    advantages: Tensor
    spans: tuple[Span, ...]

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens."""
        return sum(span.length for span in self.spans)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def place(self, per_sequence: Sequence[Tensor]) -> Tensor:
        """Per-sequence token values (e.g. log pi_old of every token) laid out like the packed batch, 0 elsewhere."""
        if len(per_sequence) != len(self.spans):
            raise ValueError(f"got values for {len(per_sequence)} sequences, the batch packs {len(self.spans)}")
        placed = torch.zeros(self.input_ids.shape, dtype=torch.float32)
        for index, (values, span) in enumerate(zip(per_sequence, self.spans, strict=True)):
            if values.shape != (span.length,):
                raise ValueError(f"sequence {index} has {span.length} tokens but its values have shape "
                                 f"{tuple(values.shape)}")
            placed[span.row, span.start:span.start + span.length] = values
        return placed

    def unpack(self, packed: Tensor) -> list[Tensor]:
        """The inverse of `place`: each sequence's values, copied out so they do not keep the batch alive."""
        return [packed[span.row, span.start:span.start + span.length].clone() for span in self.spans]


def pack_sequences(sequences: Sequence[TrainingSequence], token_budget: int, pad_id: int) -> PackedBatch:
    """Pack `sequences` into rows of about `token_budget` tokens (see `pack_rows`)."""
    if not sequences:
        raise ValueError("nothing to pack: the batch has no sequences")
    return _lay_out(sequences, pack_rows([len(seq.input_ids) for seq in sequences], token_budget), pad_id)


def _lay_out(sequences: Sequence[TrainingSequence], rows: Sequence[Sequence[int]], pad_id: int) -> PackedBatch:
    """The tensors of `sequences` placed in `rows` (indices into `sequences`), each row in the given order."""
    width = max(sum(len(sequences[i].input_ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    sequence_index = torch.full((len(rows), width), -1, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    advantages = torch.zeros((len(rows), width), dtype=torch.float32)
    spans: list[Span | None] = [None] * len(sequences)
    for row, members in enumerate(rows):
        start = 0
        for index in members:
            seq = sequences[index]
            end = start + len(seq.input_ids)
            input_ids[row, start:end] = torch.tensor(seq.input_ids, dtype=torch.long)
            position_ids[row, start:end] = torch.arange(end - start)
            sequence_index[row, start:end] = index
            loss_mask[row, start:end] = torch.tensor(seq.loss_mask, dtype=torch.bool)
            advantages[row, start:end] = torch.tensor(seq.loss_mask, dtype=torch.float32) * seq.advantage
            spans[index] = Span(row, start, end - start)
            start = end
        position_ids[row, start:] = torch.arange(width - start)  # the padding tail attends only to itself
    return PackedBatch(input_ids, position_ids, sequence_index, loss_mask, advantages, tuple(spans))


def packed_token_logprobs(model: torch.nn.Module, packed: PackedBatch, temperature: float = 1.0,
                          with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log pi of every loss token given its own sequence's prefix, [rows, width] like `packed.input_ids`.

    Only tokens with `loss_mask` set are scored; every other token gets 0, as the first token of a sequence does
    in `dypo_loss.token_logprobs` (same alignment otherwise). Everything downstream reads loss tokens only (the
    clipped loss, SFT, pi_old, pi_ref and the sampling-gap audit), and prompts and observations are most of a
    multi-turn episode, so the LM head and the vocabulary-wide softmax run on the generated tokens alone: with
    Qwen2.5's 152k vocabulary in fp32, the logits of one token take 600 KB. With `with_entropy`, the entropy of
    each scored token's distribution likewise (else None). `temperature` scales the logits as the sampler did.
    `model` may be a DeepSpeed engine wrapping the policy.
    """
    policy = getattr(model, "module", model)  # a DeepSpeed engine's own `config` is DeepSpeed's, not the model's
    implementation = policy.config._attn_implementation
    if implementation not in PACKING_ATTENTION:
        raise ValueError(f"packed scoring needs an attention implementation that separates packed sequences on a "
                         f"multi-row batch ({', '.join(PACKING_ATTENTION)}); this model uses {implementation!r}. "
                         "Load the policy with attn_implementation='sdpa'.")
    # No attention mask and no cache: that is what makes Qwen2 derive per-sequence attention from position ids.
    # `logits_to_keep` selecting no position skips the LM head; the last hidden state is the normed one it reads.
    output = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                   output_hidden_states=True, logits_to_keep=torch.empty(0, dtype=torch.long))
    # position t predicts token t + 1, which is scored iff it is a loss token with a prefix in its own sequence
    scored = packed.loss_mask[:, 1:] & (packed.position_ids[:, 1:] > 0)
    hidden = output.hidden_states[-1][:, :-1][scored]
    logits = policy.get_output_embeddings()(hidden).float() / temperature
    normalizer = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, packed.input_ids[:, 1:][scored].unsqueeze(-1)).squeeze(-1) - normalizer

    def aligned(values: Tensor) -> Tensor:
        laid_out = values.new_zeros(scored.shape).masked_scatter(scored, values)
        return torch.cat([values.new_zeros(scored.shape[0], 1), laid_out], dim=1)

    if not with_entropy:
        return aligned(logp), None
    entropy = normalizer - (torch.softmax(logits, dim=-1) * logits).sum(-1)  # H = logsumexp(z) - E_p[z]
    return aligned(logp), aligned(entropy)


def packed_micro_batches(sequences: Sequence[TrainingSequence], indices: Sequence[int], token_budget: int,
                         pad_id: int) -> list[tuple[list[int], PackedBatch]]:
    """The sequences `indices` packed for gradient accumulation: forward passes of at most `token_budget` slots.

    Rows are as wide as the longest of these sequences, and each pass holds as many rows as fit the budget (at
    least one). The row width is that, not the budget, because sdpa and eager attention on CPU compute a row's
    whole width x width score matrix, masked parts included: one 4096-token row of four 1000-token episodes
    costs about four times the attention of four 1000-token rows. Rows as wide as the longest sequence keep
    that cost at what padding to the longest would cost per row, while packing the short sequences together
    removes the padding and the rows it would fill.

    Returns each pass's members (indices into `sequences`) with its packed batch: activation memory is bounded by
    the budget (or by the longest sequence, when that alone exceeds it).
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be at least 1, got {token_budget}")
    lengths = [len(sequences[i].input_ids) for i in indices]
    if not lengths:
        raise ValueError("nothing to pack: no sequences were chosen")
    width = max(lengths)
    rows = pack_rows(lengths, width)
    rows_per_pass = max(1, token_budget // width)
    passes = []
    for chunk in (rows[start:start + rows_per_pass] for start in range(0, len(rows), rows_per_pass)):
        order = [k for row in chunk for k in row]  # positions in `indices`, in packed order
        local = {k: position for position, k in enumerate(order)}
        packed = _lay_out([sequences[indices[k]] for k in order], [[local[k] for k in row] for row in chunk], pad_id)
        passes.append(([indices[k] for k in order], packed))
    return passes
