"""The DyPO objective (DESIGN.md §1): group-relative advantages and a clipped, token-level policy loss.

Losses take `num_tokens_total`, the number of loss tokens of the whole batch, rather than averaging inside a
micro-batch: with that normaliser the per-micro-batch losses (and statistics) simply add up to the token-level
mean over the batch, which is what gradient accumulation needs to reproduce one big forward pass exactly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor


def group_advantages(returns: Sequence[float], group_ids: Sequence[str], std_normalize: bool,
                     eps: float) -> list[float]:
    """A_i = (R_i - mean_g) / (std_g + eps), or R_i - mean_g without normalisation, in input order.

    std_g is the population standard deviation (ddof=0): the group is the whole set being compared, not a sample
    from a larger one, so a group of two episodes with returns 1 and 0 gets advantages of about +1 and -1.
    Returns are centred on the group's first return before averaging, which keeps the arithmetic stable and
    makes a group whose returns are all equal give advantages that are exactly zero.
    """
    if len(returns) != len(group_ids):
        raise ValueError(f"got {len(returns)} returns but {len(group_ids)} group ids")
    members: dict[str, list[int]] = defaultdict(list)
    for index, group_id in enumerate(group_ids):
        members[group_id].append(index)

    advantages = [0.0] * len(returns)
    for indices in members.values():
        shifted = [returns[i] - returns[indices[0]] for i in indices]
        mean = math.fsum(shifted) / len(shifted)
        deviations = [value - mean for value in shifted]
        scale = math.sqrt(math.fsum(d * d for d in deviations) / len(deviations)) + eps if std_normalize else 1.0
        for i, deviation in zip(indices, deviations, strict=True):
            advantages[i] = deviation / scale if scale else 0.0  # scale is 0 only for an all-equal group, eps=0
    return advantages


def aggregation_weights(num_loss_tokens: Sequence[int], aggregation: str) -> list[float]:
    """Per-sample factors on the advantage that turn the loss's token-level mean into the chosen aggregation.

    token_mean (DAPO): every generated token of the update weighs 1/N, so a sample weighs its length. In
    multi-turn play the losers are the long episodes (they run to max_turns), so their negative advantage
    outweighs the short wins of their own group and the update mostly pushes down tokens both share.
    sample_mean (GRPO's 1/|o_i| per sample, then a mean over the G samples): sample i's tokens weigh
    1/(G |o_i|), i.e. the factor N/(G |o_i|) on its advantage, so each sample weighs its advantage alone and a
    group's pushes up and down balance. The factors are positive, so they never change which clip binds.
    """
    if aggregation == "token_mean":
        return [1.0] * len(num_loss_tokens)
    if aggregation == "sample_mean":
        total = sum(num_loss_tokens)
        return [total / (len(num_loss_tokens) * count) if count else 0.0 for count in num_loss_tokens]
    raise ValueError(f"unknown loss aggregation {aggregation!r}; use token_mean or sample_mean")


def token_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                   with_entropy: bool = False, temperature: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Log-probability of every token given its prefix, [batch, seq], aligned with `input_ids`.

    Position 0 has no prefix and gets 0 (it is always a prompt token, so it never carries loss). With
    `with_entropy`, also the entropy of the distribution each token was drawn from (same alignment, else None),
    to watch the policy collapse. `temperature` scales the logits as the sampler did, so the policy being
    optimised is the distribution the rollout actually drew from (pi = softmax(logits / T)).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)  # position t predicts token t + 1
    logp = log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None

    def shift(values: Tensor) -> Tensor:
        return torch.cat([values.new_zeros(values.shape[0], 1), values], dim=1)

    return shift(logp), None if entropy is None else shift(entropy)


def dypo_loss(logp: Tensor, logp_old: Tensor, advantages_per_token: Tensor, loss_mask: Tensor, eps_low: float,
              eps_high: float, num_tokens_total: int, logp_ref: Tensor | None = None,
              kl_coef: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """L = -sum_{gen tokens} min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) / |gen tokens of the batch|.

    All inputs are [batch, seq]; `loss_mask` is 1 on generated tokens. DyPO has no KL term; the GRPO ablation
    adds `kl_coef * KL(pi_theta || pi_ref)` per token, estimated as in DeepSeekMath by
    exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1 (`logp_ref` from the frozen reference).
    The statistics are this micro-batch's share of batch means (summed over micro-batches they give the batch
    value):
      clip_fraction: tokens where the clipped term is strictly smaller, i.e. the clip binds and the token's
        gradient is zero;
      approx_kl: KL(pi_old || pi_theta) by the k3 estimator (r - 1) - log r, which is unbiased for samples
        drawn from pi_old and never negative (Schulman, "Approximating KL Divergence", 2020);
      ratio_mean: the mean of r = pi_theta / pi_old (1 on the first update after a rollout);
      kl_ref: the reference KL estimate (only with a reference).
    """
    mask = loss_mask.bool()
    # log r_t, set to 0 off the loss tokens so padding can never overflow exp() or leak NaN gradients
    log_ratio = torch.where(mask, logp - logp_old, 0.0)
    ratio = log_ratio.exp()
    unclipped = ratio * advantages_per_token
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages_per_token
    # pessimistic bound: once r leaves the trust region in the direction A favours, the gradient stops
    surrogate = torch.minimum(unclipped, clipped)
    loss = -torch.where(mask, surrogate, 0.0).sum() / num_tokens_total

    with torch.no_grad():
        stats = {
            "clip_fraction": ((clipped < unclipped) & mask).sum().item() / num_tokens_total,
            "approx_kl": torch.where(mask, ratio - 1.0 - log_ratio, 0.0).sum().item() / num_tokens_total,
            "ratio_mean": torch.where(mask, ratio, 0.0).sum().item() / num_tokens_total,
        }
    if logp_ref is not None:
        log_ref_ratio = torch.where(mask, logp_ref - logp, 0.0)
        kl_ref = torch.where(mask, log_ref_ratio.exp() - log_ref_ratio - 1.0, 0.0).sum() / num_tokens_total
        loss = loss + kl_coef * kl_ref
        stats["kl_ref"] = kl_ref.item()
    return loss, stats


def sft_loss(logp: Tensor, loss_mask: Tensor, num_tokens_total: int) -> Tensor:
    """Token-level negative log-likelihood of the masked tokens, averaged over the whole batch (warmstart)."""
    return -torch.where(loss_mask.bool(), logp, 0.0).sum() / num_tokens_total
