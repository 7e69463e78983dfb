"""The benchmarks' helpers: a widened policy must play exactly as the policy it was widened from."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from bench.common import widened
from dypo.stages.generation import _BatchContext


def _small_model() -> Qwen2ForCausalLM:
    config = Qwen2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # random norm weights, so the test sees whether their rescaling is right
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.uniform_(0.5, 1.5)
    return model.eval()


def test_a_widened_model_computes_the_same_logits_at_its_size() -> None:
    model = _small_model()
    wide = widened(model, factor=3, num_layers=4)
    assert (wide.config.hidden_size, wide.config.num_hidden_layers, wide.config.num_attention_heads) == (96, 4, 12)
    assert sum(p.numel() for p in wide.parameters()) > 8 * sum(p.numel() for p in model.parameters())
    input_ids = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = model(input_ids).logits, wide(input_ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_a_widened_model_decodes_the_same_in_the_rollout_engine() -> None:
    model = _small_model()
    wide = widened(model, factor=2, num_layers=3)
    prompt = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    logits = []
    for policy in (model, wide):
        context = _BatchContext(policy, rows=2)
        steps = [context.feed(prompt, torch.ones_like(prompt))]
        for _ in range(5):
            next_ids = steps[-1].argmax(dim=-1, keepdim=True)
            steps.append(context.feed(next_ids, torch.ones_like(next_ids)))
        logits.append(torch.stack(steps))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def test_widened_refuses_to_shrink() -> None:
    with pytest.raises(ValueError, match="only grows"):
        widened(_small_model(), factor=2, num_layers=1)
