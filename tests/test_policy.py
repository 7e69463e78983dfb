"""The locally built policy: tokenizer ids survive a reload, checkpoints round-trip, unsafe dirs are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config

from dypo.stages.config import ModelConfig
from dypo.stages.policy import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_model,
    load_policy,
    save_policy,
    stop_token_ids,
    train_tokenizer,
)

TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)

CORPUS = [
    f"You are in the {room}. There is a closed {door} door leading {way}. "
    f"<think>The coin is not here; try {way}.</think><action>open {door} door</action>\n"
    for room in ("kitchen", "pantry", "backyard", "living room", "corridor", "bathroom")
    for door in ("wooden", "screen", "glass", "frosted-glass")
    for way in ("north", "south", "east", "west")
] * 4

# Text that exercises the pieces a mismatched pipeline gets wrong: NFC composition (e + combining accent),
# digits (split one per token by Qwen2's regex), runs of spaces and newlines, punctuation, and every special token.
PROBE = (
    "<|im_start|>user\nCafe\u0301 café  123456 items!!\n\n\n  <think>go  north?</think><action>open door</action>"
    "<|im_end|>\n<|im_start|>assistant\n\tit's\r\nthe END<|endoftext|>"
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400)


def _reloaded_tokenizer(tokenizer, directory: Path):
    """Save as a checkpoint would (tokenizer + a qwen2 config.json), then load through AutoTokenizer."""
    tokenizer.save_pretrained(directory)
    Qwen2Config(vocab_size=len(tokenizer)).save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def test_special_tokens_are_single_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
        assert tokenizer.encode(f"x{token}y", add_special_tokens=False)[1] == token_id
    assert tokenizer.pad_token == "<|endoftext|>"


def test_corpus_tags_spend_no_merges(tokenizer):
    assert not any("action" in piece or "think" in piece for piece in tokenizer.get_vocab()
                   if piece not in SPECIAL_TOKENS)


def test_reload_keeps_ids_identical(tokenizer, tmp_path):
    reloaded = _reloaded_tokenizer(tokenizer, tmp_path)
    assert type(reloaded).__name__ == "Qwen2Tokenizer"  # the class that rebuilds the pre-tokenizer on load
    for text in [PROBE, *CORPUS[:10], "unseen words: zebra quixotic 42 ½ 日本"]:
        assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    for token in SPECIAL_TOKENS:
        assert reloaded.convert_tokens_to_ids(token) == tokenizer.convert_tokens_to_ids(token)
        assert len(reloaded.encode(token, add_special_tokens=False)) == 1
    assert reloaded.pad_token_id == tokenizer.pad_token_id
    assert reloaded.decode(reloaded.encode(PROBE, add_special_tokens=False)) == PROBE.replace("Cafe\u0301", "Café")


def test_tags_survive_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("<think>a</think><action>b</action><|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>a</think><action>b</action>"


def test_chat_template_is_chatml(tokenizer, tmp_path):
    reloaded = _reloaded_tokenizer(tokenizer, tmp_path)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected


def test_build_model_is_seeded_and_leaves_global_rng_alone(tokenizer):
    state = torch.random.get_rng_state()
    first, second, other = (build_model(tokenizer, TINY, seed) for seed in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = first.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(weights, second.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(weights, other.model.layers[0].self_attn.q_proj.weight)
    assert first.config.vocab_size == len(tokenizer) and first.config.hidden_size == 64
    assert first.generation_config.eos_token_id == stop_token_ids(tokenizer)


def test_save_load_roundtrip_gives_identical_logits(tokenizer, tmp_path):
    model = build_model(tokenizer, TINY, seed=0)
    save_policy(model, tokenizer, tmp_path / "policy")
    assert (tmp_path / "policy" / "model.safetensors").is_file()
    assert not list((tmp_path / "policy").glob("*.bin"))
    loaded, loaded_tokenizer = load_policy(tmp_path / "policy")
    assert not loaded.training and loaded.dtype == torch.float32
    input_ids = torch.tensor([loaded_tokenizer.encode(PROBE, add_special_tokens=False)])
    assert input_ids.tolist()[0] == tokenizer.encode(PROBE, add_special_tokens=False)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)


def test_load_refuses_directory_without_safetensors(tokenizer, tmp_path):
    model = build_model(tokenizer, TINY, seed=0)
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # pickled weights only
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_policy(tmp_path)
