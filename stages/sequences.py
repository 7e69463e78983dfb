"""Episodes as training sequences: one token sequence per episode, a loss mask over what the policy wrote.

DESIGN.md §1.3: an episode is trained as `[prompt, gen_1, obs_1, gen_2, …, gen_T]` built from the exact token
ids of the rollout; only generated tokens carry loss and every one of them carries the episode's advantage.
The per-turn form (one sample per turn, its context as prompt) is the alternative for comparison, and the only
form for episodes played with a history window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


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


@dataclass(frozen=True)
class TurnTokens:
    """One recorded turn, as turns.parquet stores it."""

    context_ids: Sequence[int]  # fed before generating: a piece appended to the context, or the whole context
    generated_ids: Sequence[int]
    context_reset: bool = False  # context_ids is the turn's whole context (a re-encoded history window)


def episode_sequence(turns: Sequence[TurnTokens], mask_observations: bool = True) -> tuple[list[int], list[int]]:
    """Concatenate each turn's context piece and generated ids into one sequence and its loss mask.

    The first turn must bring a context: a generated token at position 0 has no prefix to be scored against.
    `mask_observations=False` (an ablation) lets the observation pieces after the prompt carry loss too.
    """
    if not turns or not turns[0].context_ids:
        raise ValueError("an episode needs at least one turn, and its first turn needs context (prompt) tokens")
    if any(turn.context_reset for turn in turns[1:]):
        raise ValueError("this episode was played with a history window (its context was re-encoded), so it is "
                         "not one token sequence; train it with optimize.sample_form: per_turn")
    input_ids: list[int] = []
    loss_mask: list[int] = []
    for index, turn in enumerate(turns):
        observation_loss = 0 if mask_observations or index == 0 else 1
        input_ids += [*turn.context_ids, *turn.generated_ids]
        loss_mask += [observation_loss] * len(turn.context_ids) + [1] * len(turn.generated_ids)
    return input_ids, loss_mask


def turn_samples(turns: Sequence[TurnTokens]) -> list[tuple[list[int], list[int]]]:
    """One (ids, loss mask) sample per turn: the context the turn was generated from, then its generated ids.

    This is the per-turn form (as in verl-agent): each turn is its own sample whose prompt is everything the model
    saw, so a history window trains exactly what was sampled. Loss falls on the turn's generated ids only.
    """
    samples = []
    prefix: list[int] = []
    for turn in turns:
        prefix = [*turn.context_ids] if turn.context_reset else [*prefix, *turn.context_ids]
        if not prefix:
            raise ValueError("a turn needs context (prompt) tokens before its generated ones")
        samples.append(([*prefix, *turn.generated_ids], [0] * len(prefix) + [1] * len(turn.generated_ids)))
        prefix = [*prefix, *turn.generated_ids]
    return samples


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
