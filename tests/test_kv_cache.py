"""The rollout engine's KV cache and forward pass against transformers' own, on a real (tiny) Qwen2 model.

Whatever the engine does to its cache (grow it in place, hand rows to a sub-batch and take them back, squeeze out
holes), the next-token logits must be those of the plain DynamicCache run fed the same tokens, and the engine's
own forward (cached_forward.py) must give transformers' logits and cache contents. Tolerance 1e-5 absolute: only
float summation order may differ.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dypo.stages.cached_forward import check_supported, forward_block
from dypo.stages.kv_cache import (
    GrowingLayer,
    compact_columns,
    growing_cache,
    put_rows,
    take_rows,
)

ATOL = 1e-5
VOCAB = 97


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).eval()


def feed(model, cache, attention_mask: torch.Tensor, next_position: torch.Tensor, input_ids: torch.Tensor,
         mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward of a [rows, width] block with holes (mask 0), positions counting real tokens only, as the
    engine feeds; returns the last column's logits and the updated mask and positions."""
    position_ids = next_position[:, None] + (mask.cumsum(-1) - 1).clamp(min=0)
    attention_mask = torch.cat([attention_mask, mask], dim=-1)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=cache, use_cache=True).logits[:, -1]
    return logits, attention_mask, next_position + mask.sum(-1)


def blocks(rows: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A prompt block (left-padded to different lengths), then single-token steps where some rows wait (holes)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 4, 7, 1][:rows])
    prompt_mask = (torch.arange(9)[None, :] >= 9 - lengths[:, None]).long()
    result = [(torch.randint(1, VOCAB, (rows, 9), generator=generator), prompt_mask)]
    for step in range(6):
        waiting = torch.rand(rows, generator=generator) < 0.3
        waiting[(step + 1) % rows] = True  # every row waits at least once
        waiting[step % rows] = False  # somebody is always fed
        result.append((torch.randint(1, VOCAB, (rows, 1), generator=generator), (~waiting).long()[:, None]))
    return result


def test_growing_layer_appends_like_concatenation() -> None:
    layer, expected_keys = GrowingLayer(), None
    for width in (3, 70, 1, 1, 200):  # crosses the first capacity and a doubling
        keys, values = torch.randn(2, 2, width, 8), torch.randn(2, 2, width, 8)
        got_keys, got_values = layer.update(keys, values)
        expected_keys = keys if expected_keys is None else torch.cat([expected_keys, keys], dim=-2)
        assert torch.equal(got_keys, expected_keys)
        assert got_values.shape == got_keys.shape and layer.get_seq_length() == expected_keys.shape[-2]


def test_growing_cache_gives_dynamic_cache_logits(model) -> None:
    caches = {"dynamic": DynamicCache(config=model.config), "growing": growing_cache()}
    state = {name: (torch.zeros((4, 0), dtype=torch.long), torch.zeros(4, dtype=torch.long)) for name in caches}
    for input_ids, mask in blocks(4, seed=1):
        logits = {}
        for name, cache in caches.items():
            logits[name], *state[name] = feed(model, cache, *state[name], input_ids, mask)
        torch.testing.assert_close(logits["growing"], logits["dynamic"], rtol=0, atol=ATOL)


def test_taken_rows_decode_alone_and_merge_back(model) -> None:
    """Rows 0 and 2 decode as a batch of their own, then rejoin; every row's next logits match the run that kept
    all four rows together (the others waiting as holes)."""
    steps = blocks(4, seed=2)
    together, alone = DynamicCache(config=model.config), growing_cache()
    empty = (torch.zeros((4, 0), dtype=torch.long), torch.zeros(4, dtype=torch.long))
    _, mask_t, pos_t = feed(model, together, *empty, *steps[0])
    _, mask_a, pos_a = feed(model, alone, *empty, *steps[0])
    rows = torch.tensor([0, 2])
    taken, taken_mask, taken_pos = take_rows(alone, rows), mask_a[rows], pos_a[rows]
    for input_ids, _ in steps[1:4]:
        fed = torch.zeros(4, 1, dtype=torch.long)
        fed[rows] = 1
        logits_t, mask_t, pos_t = feed(model, together, mask_t, pos_t, input_ids, fed)
        logits_a, taken_mask, taken_pos = feed(model, taken, taken_mask, taken_pos, input_ids[rows],
                                               torch.ones(2, 1, dtype=torch.long))
        torch.testing.assert_close(logits_a, logits_t[rows], rtol=0, atol=ATOL)
    put_rows(alone, rows, taken)
    mask_a = torch.nn.functional.pad(mask_a, (0, taken_mask.shape[1] - mask_a.shape[1]))
    mask_a[rows], pos_a[rows] = taken_mask, taken_pos
    assert torch.equal(mask_a, mask_t) and torch.equal(pos_a, pos_t)
    for input_ids, mask in steps[4:]:
        logits_t, mask_t, pos_t = feed(model, together, mask_t, pos_t, input_ids, mask)
        logits_a, mask_a, pos_a = feed(model, alone, mask_a, pos_a, input_ids, mask)
        torch.testing.assert_close(logits_a, logits_t, rtol=0, atol=ATOL)


def test_compaction_removes_holes_and_keeps_the_logits(model) -> None:
    steps = blocks(4, seed=3)
    holey, compacted = DynamicCache(config=model.config), growing_cache()
    state_h = state_c = (torch.zeros((4, 0), dtype=torch.long), torch.zeros(4, dtype=torch.long))
    for input_ids, mask in steps[:-1]:
        _, *state_h = feed(model, holey, *state_h, input_ids, mask)
        _, *state_c = feed(model, compacted, *state_c, input_ids, mask)
    mask_c, pos_c = state_c
    columns = compact_columns(mask_c)
    for layer in compacted.layers:
        layer.gather_columns(columns)
    mask_c = mask_c.gather(1, columns)
    assert mask_c.shape[1] == int(state_h[0].sum(-1).max()) < state_h[0].shape[1]
    assert (mask_c.sum(-1) == state_h[0].sum(-1)).all() and mask_c[:, -1].all()  # only the padding of short rows
    logits_h, *_ = feed(model, holey, *state_h, *steps[-1])
    logits_c, *_ = feed(model, compacted, mask_c, pos_c, *steps[-1])
    torch.testing.assert_close(logits_c, logits_h, rtol=0, atol=ATOL)


def test_compact_columns_keeps_each_rows_tokens_in_order() -> None:
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 0], [1, 1, 1, 0, 1]])
    assert compact_columns(mask).tolist() == [[4, 0, 2, 3], [1, 3, 4, 2], [0, 1, 2, 4]]
    assert mask.gather(1, compact_columns(mask)).tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]]


def test_growing_layer_refuses_what_it_does_not_support() -> None:
    layer = GrowingLayer()
    layer.update(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4))
    for call in (lambda: layer.crop(-1), lambda: layer.batch_repeat_interleave(2),
                 lambda: layer.reorder_cache(torch.tensor([0]))):
        with pytest.raises(NotImplementedError, match="rollout engine"):
            call()


def test_the_engines_forward_gives_transformers_logits_and_cache(model) -> None:
    """A left-padded prompt, decode steps where rows wait (holes), then a turn's left-padded chunk on top of the
    cache: every row whose last column is real gets transformers' logits, the others zeros, and the cache holds
    transformers' keys and values."""
    lengths = torch.tensor([3, 5, 1, 2])
    chunk_mask = (torch.arange(5)[None, :] >= 5 - lengths[:, None]).long()
    chunk = torch.randint(1, VOCAB, (4, 5), generator=torch.Generator().manual_seed(6))
    steps = [*blocks(4, seed=5), (chunk, chunk_mask)]
    reference, ours = DynamicCache(config=model.config), growing_cache()
    mask_r = mask_o = torch.zeros((4, 0), dtype=torch.long)
    pos_r = pos_o = torch.zeros(4, dtype=torch.long)
    for input_ids, mask in steps:
        expected, mask_r, pos_r = feed(model, reference, mask_r, pos_r, input_ids, mask)
        position_ids = pos_o[:, None] + (mask.cumsum(-1) - 1).clamp(min=0)
        mask_o, pos_o = torch.cat([mask_o, mask], dim=-1), pos_o + mask.sum(-1)
        got = forward_block(model, ours, input_ids, mask, position_ids, mask_o)
        fed = mask[:, -1].bool()
        torch.testing.assert_close(got[fed], expected[fed], rtol=0, atol=ATOL)
        assert not got[~fed].any()
    real = mask_o.bool()
    for mine, theirs in zip(ours.layers, reference.layers, strict=True):
        for got, expected in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
            torch.testing.assert_close(got.transpose(1, 2)[real], expected.transpose(1, 2)[real], rtol=0,
                                       atol=ATOL)


def test_the_engines_forward_refuses_a_wide_block_that_is_not_left_padded(model) -> None:
    mask = torch.tensor([[1, 0, 1]])
    with pytest.raises(ValueError, match="suffix"):
        forward_block(model, growing_cache(), torch.ones((1, 3), dtype=torch.long), mask,
                      torch.tensor([[0, 0, 1]]), mask)


def test_the_engines_forward_refuses_models_it_would_compute_differently() -> None:
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(TypeError, match="Qwen2ForCausalLM"):
        check_supported(llama)
    windowed = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            use_sliding_window=True, sliding_window=8, max_window_layers=1))
    with pytest.raises(ValueError, match="use_sliding_window=false"):
        check_supported(windowed)
