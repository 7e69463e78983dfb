"""The rollout engine's forward pass: the policy's own modules, run over real tokens only and the batch's KV cache.

A turn's first feed is a block of every row's new context piece, left-padded to the longest; in a batch of game
episodes the pieces differ a lot (a room description against a one-line "invalid format" note), and padding was
about 40% of what a turn fed on the benchmark's batch. transformers' forward runs every layer on the padded block
and builds a [rows, 1, width, columns] mask on each call. This forward keeps the block's real tokens in one flat
[tokens, hidden] tensor through the embedding, norms, projections, rotary embedding and MLP, so those cost what
the real tokens cost; only attention, whose queries must meet each row's own cache, sees the padded layout, and
padding queries are dropped right after it. Only the rows' last positions go through the output head. On a
decode step (one token per row) it also skips transformers' per-call mask building.

It calls the model's own layers (projections, norms, rotary embedding, MLP), so the weights, rotary variant and
numerics are the model's; tests/test_kv_cache.py checks the logits and the cache against transformers' forward.
It supports the architecture the pipeline loads (Qwen2, full attention on every layer) and refuses anything else
instead of computing something different.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM, apply_rotary_pos_emb


def check_supported(model: PreTrainedModel) -> None:
    """Refuse a model this forward would compute differently from transformers."""
    if not isinstance(model, Qwen2ForCausalLM):
        raise TypeError(f"the rollout engine runs Qwen2ForCausalLM policies, not {type(model).__name__}; "
                        "load the policy with stages.policy.load_policy")
    kinds = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"the rollout engine supports full attention on every layer, and this model's config has "
                         f"layer_types {sorted(kinds)}; set use_sliding_window=false in its config.json")


def _block_bias(attention_mask: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The [rows, 1, width, columns] additive attention mask (0 or -inf) of a block that fills the last `width`
    columns: query i of the block sees every real column up to and including its own.

    `attention_mask` [rows, columns] marks cached tokens (1) and holes (0), the block's own columns included.
    Built once per forward as a float bias, because sdpa turns a boolean mask into one on every layer's call.
    """
    columns = attention_mask.shape[1]
    seen = attention_mask.bool()[:, None, None, :]
    if width > 1:
        seen = seen & torch.ones((width, columns), dtype=torch.bool).tril(columns - width)
    return torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, float("-inf"))


def _attend_rows(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                 lengths: list[int], scale: float) -> torch.Tensor:
    """Attention of a block whose rows' real tokens are a suffix of the block, one row at a time.

    `query` [tokens, heads, head_dim] holds the real tokens row after row, `lengths` how many each row has;
    `keys`, `values` [rows, kv_heads, columns, head_dim] and `bias` [rows, 1, width, columns] are the padded
    layout. A row's queries are its last lengths[r] positions, so no padding query is computed: attention is
    most of a turn's first block's cost, and 37-64% of such a block was padding in the benchmark's batches.
    """
    out = torch.empty_like(query)
    start = 0
    for row, length in enumerate(lengths):
        if length == 0:
            continue
        rows_query = query[start:start + length].transpose(0, 1)[None]  # [1, heads, length, head_dim]
        attended = torch.nn.functional.scaled_dot_product_attention(
            rows_query, keys[row:row + 1], values[row:row + 1], attn_mask=bias[row:row + 1, :, -length:],
            scale=scale, enable_gqa=True)
        out[start:start + length] = attended[0].transpose(0, 1)
        start += length
    return out


def _attend_one_step(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                     real: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of a decode step (one query per row; `real` says which rows have one), as two matmuls.

    A decode step reads every cached key and value once and does little arithmetic on them, so its speed is
    memory bandwidth. The query heads that share a key/value head are stacked into one matrix against that
    head's keys, so each key is read once for all of them; sdpa's CPU kernel, built for blocks of queries, made
    a decode step 10-20% slower here.
    """
    rows, kv_heads = keys.shape[:2]
    grouped = query.new_zeros((rows, query.shape[1], query.shape[2])).index_copy_(0, real, query)
    grouped = grouped.view(rows, kv_heads, -1, query.shape[2])  # [rows, kv_heads, heads per kv head, head_dim]
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(scale).add_(bias)  # [rows, kv_heads, group, cols]
    attended = torch.matmul(torch.softmax(scores, dim=-1), values)  # [rows, kv_heads, group, head_dim]
    return attended.reshape(rows, query.shape[1], query.shape[2])[real]


@torch.inference_mode()
def forward_block(model: Qwen2ForCausalLM, cache: Cache, input_ids: torch.Tensor, mask: torch.Tensor,
                  position_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Append a [rows, width] block to `cache` and return each row's next-token logits [rows, vocab] (float32).

    `mask` [rows, width] marks the block's real tokens (0 = hole): a single column (a decode step, where rows
    that wait are holes) or, wider, a suffix of each row (left padding). `position_ids` [rows, width] are the
    tokens' positions; `attention_mask` [rows, columns] covers the cache after the block is appended. A row's
    logits are those after its last column, so they mean something only if that column is a real token; for
    the others they are zero.
    """
    rows, width = input_ids.shape
    lengths = mask.sum(dim=-1)
    if width > 1 and not torch.equal(mask.bool(), torch.arange(width) >= width - lengths[:, None]):
        raise ValueError("a block wider than one token must hold each row's real tokens as a suffix (left padding)")
    config = model.config
    real = mask.reshape(-1).nonzero().squeeze(-1)  # flat indices of the block's real tokens, row after row
    every_token_real = len(real) == rows * width
    positions = position_ids.reshape(-1)[real]
    hidden = model.model.embed_tokens(input_ids.reshape(-1)[real])  # [tokens, hidden]
    cos, sin = model.model.rotary_emb(hidden, positions[None])
    cos, sin = cos[0], sin[0]  # [tokens, head_dim]
    bias = _block_bias(attention_mask, width, hidden.dtype)
    row_lengths = lengths.tolist()  # the per-row attention loop's bounds, the same for every layer

    def padded(states: torch.Tensor) -> torch.Tensor:
        """[tokens, heads, head_dim] → [rows, heads, width, head_dim], holes zero (their keys are masked)."""
        if not every_token_real:
            states = states.new_zeros((rows * width, *states.shape[1:])).index_copy_(0, real, states)
        return states.view(rows, width, *states.shape[1:]).transpose(1, 2)

    for layer_index, layer in enumerate(model.model.layers):
        attention = layer.self_attn
        normed = layer.input_layernorm(hidden)
        query = attention.q_proj(normed).view(len(real), config.num_attention_heads, attention.head_dim)
        key = attention.k_proj(normed).view(len(real), config.num_key_value_heads, attention.head_dim)
        value = attention.v_proj(normed).view(len(real), config.num_key_value_heads, attention.head_dim)
        query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1)
        keys, values = cache.update(padded(key), padded(value), layer_index)
        if width > 1:
            attended = _attend_rows(query, keys, values, bias, row_lengths, attention.scaling)
        else:
            attended = _attend_one_step(query, keys, values, bias, real, attention.scaling)
        hidden = hidden + attention.o_proj(attended.reshape(len(real), -1))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    # each row's last column, where it is a real token: its index among the real tokens
    last_column = torch.arange(1, rows + 1) * width - 1
    has_last = mask[:, -1].bool()
    last_hidden = hidden.new_zeros((rows, hidden.shape[-1]))
    last_hidden[has_last] = hidden[torch.searchsorted(real, last_column[has_last])]
    logits = model.lm_head(model.model.norm(last_hidden)).float()
    return logits.masked_fill(~has_last[:, None], 0.0)
