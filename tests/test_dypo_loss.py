"""The DyPO loss, advantages and sequence packing against hand-computed values and autograd."""

from __future__ import annotations

import math
import statistics
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import Qwen2Config, Qwen2ForCausalLM

from dypo.stages.dypo_loss import aggregation_weights, dypo_loss, group_advantages, sft_loss, token_logprobs
from dypo.stages.sequences import TrainingSequence, TurnTokens, collate, episode_sequence, turn_samples

EPS_LOW, EPS_HIGH = 0.2, 0.28


class FixedLogits(torch.nn.Module):
    """A stand-in policy whose logits are a leaf tensor, so tests can read their gradient."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


def two_episodes() -> dict[str, torch.Tensor]:
    """Episode 1: [prompt, gen, gen, pad] with A=+1; episode 2: [prompt, prompt, gen, gen] with A=-0.5."""
    loss_mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    logp_old = torch.full((2, 4), -2.0)
    # 100 on the pad overflows exp() in float32: masked positions must not turn that into NaN
    log_ratio = torch.tensor([[0.0, 0.1, 0.5, 100.0], [0.0, 0.0, -0.5, 0.2]])
    advantages = loss_mask * torch.tensor([[1.0], [-0.5]])
    logp = (logp_old + log_ratio).requires_grad_()
    return {"logp": logp, "logp_old": logp_old, "advantages": advantages, "loss_mask": loss_mask}


def test_hand_computed_two_episode_loss() -> None:
    batch = two_episodes()
    loss, stats = dypo_loss(batch["logp"], batch["logp_old"], batch["advantages"], batch["loss_mask"], EPS_LOW,
                            EPS_HIGH, num_tokens_total=4)
    # episode 1 (A=+1):    r=e^0.1=1.105 is inside [0.8, 1.28] -> 1.105;  r=e^0.5=1.649 -> clipped to 1.28
    # episode 2 (A=-0.5):  r=e^-0.5=0.607: min(-0.303, 0.8*-0.5=-0.4) = -0.4;  r=e^0.2=1.221 inside -> -0.611
    expected = -(math.exp(0.1) + 1.28 - 0.4 - 0.5 * math.exp(0.2)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(-0.343617, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(2 / 4)  # the second token of each episode is clipped
    ratios = [math.exp(x) for x in (0.1, 0.5, -0.5, 0.2)]
    assert stats["ratio_mean"] == pytest.approx(sum(ratios) / 4, abs=1e-6)
    assert stats["approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in ratios) / 4, abs=1e-6)
    loss.backward()
    assert torch.isfinite(batch["logp"].grad).all() and batch["logp"].grad[0, 3] == 0


def test_micro_batch_losses_and_stats_sum_to_the_batch_value() -> None:
    batch = two_episodes()
    whole = dypo_loss(batch["logp"], batch["logp_old"], batch["advantages"], batch["loss_mask"], EPS_LOW, EPS_HIGH, 4)
    parts = [dypo_loss(*(batch[k][i:i + 1] for k in ("logp", "logp_old", "advantages", "loss_mask")), EPS_LOW,
                       EPS_HIGH, 4) for i in range(2)]
    assert sum(loss.item() for loss, _ in parts) == pytest.approx(whole[0].item(), abs=1e-6)
    for key, value in whole[1].items():
        assert sum(stats[key] for _, stats in parts) == pytest.approx(value, abs=1e-6)


def _logits_and_logp(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 11, (2, 6), generator=generator)
    logits = torch.randn(2, 6, 11, generator=generator, requires_grad=True)
    logp, _ = token_logprobs(FixedLogits(logits), input_ids, torch.ones_like(input_ids))
    return logits, input_ids, logp


def test_masked_tokens_get_exactly_zero_gradient() -> None:
    logits, _, logp = _logits_and_logp()
    loss_mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 1, 0]], dtype=torch.bool)
    advantages = loss_mask * torch.tensor([[0.7], [-1.3]])
    logp_old = logp.detach() + 0.05 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    loss, _ = dypo_loss(logp, logp_old, advantages, loss_mask, EPS_LOW, EPS_HIGH, int(loss_mask.sum()))
    loss.backward()
    # logits at position t predict token t + 1; the last position predicts nothing
    predicts_loss_token = torch.zeros(2, 6, dtype=torch.bool)
    predicts_loss_token[:, :-1] = loss_mask[:, 1:]
    row_norms = logits.grad.abs().sum(-1)
    assert torch.all(row_norms[~predicts_loss_token] == 0)
    assert torch.all(row_norms[predicts_loss_token] > 0)


def test_on_policy_loss_is_minus_mean_advantage_and_gradient_is_reinforce() -> None:
    logits, _, logp = _logits_and_logp(seed=2)
    loss_mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    advantages = loss_mask * torch.tensor([[1.5], [-0.25]])
    n = int(loss_mask.sum())
    loss, stats = dypo_loss(logp, logp.detach(), advantages, loss_mask, EPS_LOW, EPS_HIGH, n)
    assert loss.item() == pytest.approx(-(advantages[loss_mask]).mean().item(), abs=1e-6)
    assert stats["ratio_mean"] == pytest.approx(1.0) and stats["approx_kl"] == 0 and stats["clip_fraction"] == 0
    (dypo_grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    reinforce = -(advantages * logp * loss_mask).sum() / n
    (reinforce_grad,) = torch.autograd.grad(reinforce, logits)
    torch.testing.assert_close(dypo_grad, reinforce_grad, rtol=0, atol=1e-7)


def test_sample_mean_weighs_each_sample_by_its_advantage_alone() -> None:
    """GRPO's form: the mean over samples of each sample's token mean of the clipped surrogate."""
    batch = two_episodes()
    loss_mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)  # 2 tokens with A=+1, 1 with A=-0.5
    episode_1 = (math.exp(0.1) + 1.28) / 2  # the second ratio, e^0.5, is clipped at 1.28
    episode_2 = -0.5 * math.exp(0.2)
    weights = aggregation_weights([2, 1], "sample_mean")
    assert weights == [3 / 4, 3 / 2]
    weighted = loss_mask * torch.tensor([[1.0 * weights[0]], [-0.5 * weights[1]]])
    loss, _ = dypo_loss(batch["logp"], batch["logp_old"], weighted, loss_mask, EPS_LOW, EPS_HIGH, 3)
    assert loss.item() == pytest.approx(-(episode_1 + episode_2) / 2, abs=1e-6)
    assert aggregation_weights([2, 1], "token_mean") == [1.0, 1.0]
    plain = loss_mask * torch.tensor([[1.0], [-0.5]])
    token_mean, _ = dypo_loss(batch["logp"], batch["logp_old"], plain, loss_mask, EPS_LOW, EPS_HIGH, 3)
    assert token_mean.item() == pytest.approx(-(2 * episode_1 + episode_2) / 3, abs=1e-6)


def test_an_unknown_aggregation_is_refused() -> None:
    with pytest.raises(ValueError, match="use token_mean or sample_mean"):
        aggregation_weights([3], "sum")


@pytest.mark.parametrize(("log_ratio", "advantage", "grad_is_zero"), [
    (math.log(1.5), 1.0, True),    # above 1 + eps_high and A > 0: clipped, no further push up
    (math.log(0.5), -1.0, True),   # below 1 - eps_low and A < 0: clipped, no further push down
    (math.log(1.5), -1.0, False),  # above the range but A < 0: the unclipped term is the pessimistic one
    (math.log(0.5), 1.0, False),   # below the range but A > 0: likewise
    (math.log(1.1), 1.0, False),   # inside the range
])
def test_clipping_at_both_edges(log_ratio: float, advantage: float, grad_is_zero: bool) -> None:
    logp_old = torch.tensor([[-3.0, -1.0]])
    logp = (logp_old + torch.tensor([[0.0, log_ratio]])).requires_grad_()
    loss_mask = torch.tensor([[0, 1]], dtype=torch.bool)
    loss, stats = dypo_loss(logp, logp_old, loss_mask * advantage, loss_mask, EPS_LOW, EPS_HIGH, 1)
    loss.backward()
    assert (logp.grad[0, 1].item() == 0) is grad_is_zero
    assert stats["clip_fraction"] == (1.0 if grad_is_zero else 0.0)


def test_sft_loss_is_the_token_mean_nll_of_the_batch() -> None:
    logp = torch.tensor([[0.0, -1.0, -2.0], [0.0, -4.0, -9.0]])
    loss_mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    assert sft_loss(logp, loss_mask, 3).item() == pytest.approx((1 + 2 + 4) / 3)
    assert sft_loss(logp[:1], loss_mask[:1], 3).item() + sft_loss(logp[1:], loss_mask[1:], 3).item() == (
        pytest.approx(7 / 3))


def test_token_logprobs_and_entropy_of_a_real_model_ignore_right_padding() -> None:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    short = TrainingSequence([5, 6, 7, 8], [0, 0, 1, 1], 1.0)
    long = TrainingSequence([9, 10, 11, 12, 13, 14, 15], [0, 0, 0, 1, 1, 1, 1], -1.0)
    batch = collate([short, long], pad_id=0)
    with torch.no_grad():
        logp, entropy = token_logprobs(model, batch["input_ids"], batch["attention_mask"], with_entropy=True)
        alone = torch.tensor([short.input_ids])
        logits = model(input_ids=alone).logits
    reference = torch.log_softmax(logits[0, :-1], -1).gather(-1, alone[0, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp[0, 1:4], reference, rtol=0, atol=1e-5)
    assert logp[0, 0] == 0 and entropy[0, 0] == 0
    probs = torch.softmax(logits[0, :-1], -1)
    torch.testing.assert_close(entropy[0, 1:4], -(probs * probs.log()).sum(-1), rtol=0, atol=1e-5)
    assert token_logprobs(model, batch["input_ids"], batch["attention_mask"])[1] is None


@given(st.lists(st.tuples(st.sampled_from("abcd"), st.floats(-10, 10, allow_nan=False)), min_size=1, max_size=24),
       st.booleans())
def test_group_advantages_have_zero_mean_per_group(rows: list[tuple[str, float]], std_normalize: bool) -> None:
    group_ids, returns = [g for g, _ in rows], [r for _, r in rows]
    advantages = group_advantages(returns, group_ids, std_normalize, eps=1e-6)
    assert len(advantages) == len(returns)
    for group in set(group_ids):
        values = [a for a, g in zip(advantages, group_ids, strict=True) if g == group]
        members = [r for r, g in zip(returns, group_ids, strict=True) if g == group]
        # rounding error of the centring, amplified by the division by (std + eps)
        divisor = statistics.pstdev(members) + 1e-6 if std_normalize else 1.0
        assert abs(sum(values) / len(values)) <= 1e-12 * max(1.0, *map(abs, members)) / divisor


@given(st.floats(-1e6, 1e6, allow_nan=False), st.integers(1, 16), st.booleans())
def test_an_all_equal_group_gets_exactly_zero_advantage(value: float, size: int, std_normalize: bool) -> None:
    assert group_advantages([value] * size, ["g"] * size, std_normalize, eps=1e-6) == [0.0] * size
    assert group_advantages([value] * size, ["g"] * size, std_normalize, eps=0.0) == [0.0] * size


def test_group_advantages_use_the_population_std_in_input_order() -> None:
    returns, groups = [1.0, 0.0, 0.0, 0.5, 1.0, 0.0], ["a", "b", "a", "b", "a", "b"]
    # group a = (1, 0, 1): mean 2/3, population std sqrt(2)/3; group b = (0, 0.5, 0): mean 1/6, std sqrt(2)/6
    expected = [1 / math.sqrt(2), -1 / math.sqrt(2), -math.sqrt(2), math.sqrt(2), 1 / math.sqrt(2), -1 / math.sqrt(2)]
    assert group_advantages(returns, groups, True, eps=0.0) == pytest.approx(expected)
    assert group_advantages(returns, groups, False, eps=1e-6) == pytest.approx([1 / 3, -1 / 6, -2 / 3, 1 / 3, 1 / 3,
                                                                                 -1 / 6])
    with pytest.raises(ValueError, match="group ids"):
        group_advantages([1.0], ["a", "b"], True, 1e-6)


def test_episode_sequence_masks_everything_but_generated_tokens() -> None:
    ids, mask = episode_sequence([TurnTokens([1, 2, 3], [4, 5]), TurnTokens([6], [7, 8, 9])])
    assert ids == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert mask == [0, 0, 0, 1, 1, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="context"):
        episode_sequence([TurnTokens([], [4, 5])])


def test_the_observation_masking_ablation_puts_loss_on_observations_but_never_on_the_prompt() -> None:
    _, mask = episode_sequence([TurnTokens([1, 2, 3], [4, 5]), TurnTokens([6], [7, 8, 9])], mask_observations=False)
    assert mask == [0, 0, 0, 1, 1, 1, 1, 1, 1]


def test_per_turn_samples_are_each_turns_context_then_its_tokens() -> None:
    turns = [TurnTokens([1, 2, 3], [4, 5]), TurnTokens([6], [7, 8, 9]), TurnTokens([10], [11])]
    samples = turn_samples(turns)
    assert samples == [([1, 2, 3, 4, 5], [0, 0, 0, 1, 1]),
                       ([1, 2, 3, 4, 5, 6, 7, 8, 9], [0] * 6 + [1, 1, 1]),
                       ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0] * 10 + [1])]
    # the last turn's sample is the whole episode, and the per-turn loss tokens are the episode's generated tokens
    assert samples[-1][0] == episode_sequence(turns)[0]
    assert sum(sum(mask) for _, mask in samples) == sum(episode_sequence(turns)[1])


def test_a_windowed_episode_trains_per_turn_only() -> None:
    """With a history window each turn records its whole (re-encoded) context."""
    turns = [TurnTokens([1, 2], [3], context_reset=True), TurnTokens([1, 2, 3, 4], [5], context_reset=True),
             TurnTokens([1, 2, 5, 6], [7], context_reset=True)]
    assert turn_samples(turns) == [([1, 2, 3], [0, 0, 1]), ([1, 2, 3, 4, 5], [0, 0, 0, 0, 1]),
                                   ([1, 2, 5, 6, 7], [0, 0, 0, 0, 1])]
    with pytest.raises(ValueError, match="per_turn"):
        episode_sequence(turns)


def test_kl_to_the_reference_is_the_deepseekmath_estimator_and_zero_at_the_reference() -> None:
    batch = two_episodes()
    args = (batch["logp"], batch["logp_old"], batch["advantages"], batch["loss_mask"], EPS_LOW, EPS_HIGH, 4)
    plain, _ = dypo_loss(*args)
    at_reference, stats = dypo_loss(*args, logp_ref=batch["logp"].detach(), kl_coef=0.5)
    assert stats["kl_ref"] == 0.0 and at_reference.item() == pytest.approx(plain.item(), abs=1e-7)
    # reference log-probs 0.3 below the policy on every token: KL per token = e^-0.3 + 0.3 - 1
    with_kl, stats = dypo_loss(*args, logp_ref=batch["logp"].detach() - 0.3, kl_coef=0.5)
    per_token = math.exp(-0.3) + 0.3 - 1
    assert stats["kl_ref"] == pytest.approx(4 * per_token / 4, abs=1e-6)
    assert with_kl.item() == pytest.approx(plain.item() + 0.5 * per_token, abs=1e-6)
    # its gradient pulls each loss token's log-prob toward the reference: d/dlogp = 0.5 * (1 - e^-0.3) / 4 > 0
    kl_only = dypo_loss(batch["logp"], batch["logp"].detach(), torch.zeros(2, 4), batch["loss_mask"], EPS_LOW,
                        EPS_HIGH, 4, logp_ref=batch["logp"].detach() - 0.3, kl_coef=0.5)[0]
    (gradient,) = torch.autograd.grad(kl_only, batch["logp"])
    expected = batch["loss_mask"] * 0.5 * (1 - math.exp(-0.3)) / 4
    assert torch.allclose(gradient, expected, atol=1e-7)


def test_collate_right_pads_and_spreads_the_advantage_over_loss_tokens() -> None:
    batch = collate([TrainingSequence([1, 2, 3], [0, 1, 1], 0.5), TrainingSequence([4, 5], [0, 1], -2.0)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[False, True, True], [False, True, False]]
    assert batch["advantages"].tolist() == [[0.0, 0.5, 0.5], [0.0, -2.0, 0.0]]
    with pytest.raises(ValueError, match="loss-mask"):
        TrainingSequence([1, 2], [0], 0.0)


