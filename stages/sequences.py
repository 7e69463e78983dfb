"""Episodes as training sequences: one token sequence per episode, a loss mask over what the policy wrote.

DESIGN.md §1.3: an episode is trained as `[prompt, gen_1, obs_1, gen_2, …, gen_T]` built from the exact token
ids of the rollout; only generated tokens carry loss and every one of them carries the episode's advantage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

Item = TypeVar("Item")


@dataclass(frozen=True)
class TrainingSequence:
    input_ids: list[int]
    loss_mask: list[int]  # 1 on tokens the policy generated, 0 on prompt and observation tokens
    advantage: float

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"{len(self.input_ids)} input ids but {len(self.loss_mask)} loss-mask entries")

    @property
    def num_loss_tokens(self) -> int:
        return sum(self.loss_mask)


def episode_sequence(turns: Sequence[tuple[Sequence[int], Sequence[int]]]) -> tuple[list[int], list[int]]:
    """Concatenate (context_token_ids, generated_token_ids) of each turn into ids and a loss mask.

    Callers pass `[(t.context_token_ids, t.generated_token_ids) for t in episode.turns]`. The first turn must
    bring a context: a generated token at position 0 has no prefix to be scored against.
    """
    if not turns or not turns[0][0]:
        raise ValueError("an episode needs at least one turn, and its first turn needs context (prompt) tokens")
    input_ids: list[int] = []
    loss_mask: list[int] = []
    for context_ids, generated_ids in turns:
        input_ids += [*context_ids, *generated_ids]
        loss_mask += [0] * len(context_ids) + [1] * len(generated_ids)
    return input_ids, loss_mask


def collate(seqs: Sequence[TrainingSequence], pad_id: int) -> dict[str, Tensor]:
    """Right-pad sequences into [batch, longest] tensors: input_ids, attention_mask, loss_mask, advantages.

    `advantages` holds the episode's advantage on its loss tokens and 0 elsewhere. Right padding keeps every
    real token at the same position as in an unpadded forward pass, so log-probs do not depend on batching.
    """
    width = max(len(seq.input_ids) for seq in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, seq in enumerate(seqs):
        length = len(seq.input_ids)
        input_ids[row, :length] = torch.tensor(seq.input_ids, dtype=torch.long)
        attention_mask[row, :length] = 1
        loss_mask[row, :length] = torch.tensor(seq.loss_mask, dtype=torch.bool)
    advantages = loss_mask * torch.tensor([seq.advantage for seq in seqs], dtype=torch.float32).unsqueeze(1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "advantages": advantages}


def micro_batches(items: Sequence[Item], size: int) -> list[list[Item]]:
    """Consecutive chunks of `size` items (sequences, or indices into them) in the given order; the last may be shorter.

    The order is the caller's (e.g. a seeded shuffle), so the same inputs always give the same micro-batches
    and a re-run of the optimize stage accumulates gradients in the same order.
    """
    if size < 1:
        raise ValueError(f"micro-batch size must be at least 1, got {size}")
    return [list(items[start:start + size]) for start in range(0, len(items), size)]
