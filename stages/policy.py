"""The tiny policy: a byte-level BPE tokenizer trained locally and a randomly initialised Qwen2 model.

Nothing comes from a model hub: the embedded default builds its policy from the expert games' text, then the
warmstart stage teaches it the turn format. The result is an ordinary Hugging Face directory (config, tokenizer,
`model.safetensors`) so the same checkpoint loads in transformers, vLLM and DeepSpeed without conversion.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from dypo.stages.config import ModelConfig
from dypo.stages.turn_format import ACTION_CLOSE, ACTION_OPEN, THINK_CLOSE, THINK_OPEN

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

CHATML_TOKENS = (ENDOFTEXT, IM_START, IM_END)
TAG_TOKENS = (THINK_OPEN, THINK_CLOSE, ACTION_OPEN, ACTION_CLOSE)
SPECIAL_TOKENS = CHATML_TOKENS + TAG_TOKENS

# Qwen2's ChatML template, so `apply_chat_template` renders exactly what `conversation.py` encodes piecewise.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SPECIAL_SPLIT = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))


def _text_pieces(texts: Iterable[str]) -> Iterator[str]:
    """The texts cut at the special tokens.

    The BPE trainer does not extract added tokens from its input, so tags left in the corpus would spend merges
    on fragments like `action` that encoding never reaches (an added token is matched before BPE runs).
    """
    for text in texts:
        yield from (piece for piece in _SPECIAL_SPLIT.split(text) if piece)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE whose ids survive a save and `AutoTokenizer` reload unchanged.

    transformers 5 rebuilds a `Qwen2Tokenizer`'s normalizer, pre-tokenizer and decoder from code when it loads a
    directory whose config says `qwen2`, ignoring the ones stored in tokenizer.json; training with exactly that
    pipeline (NFC, Qwen2's split regex, byte level) is what keeps encodings identical across the reload.

    The ChatML tokens are special (dropped by `skip_special_tokens`); the think/action tags are added tokens that
    are *not* special, so decoders that skip special tokens by default (vLLM, HF) still return the tags the turn
    parser needs. Every one of them is a single id. `vocab_size` counts all of them; a small corpus may stop
    the trainer short of it.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TAG_TOKENS),
        special_tokens=list(CHATML_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_text_pieces(texts), trainer)
    tokenizer.add_tokens([AddedToken(tag, special=False, normalized=False) for tag in TAG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
    )


def stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids that end a turn: `</action>` closes a well-formed turn, the other two end a message without one."""
    return [tokenizer.convert_tokens_to_ids(token) for token in (ACTION_CLOSE, IM_END, ENDOFTEXT)]


def build_model(tokenizer: PreTrainedTokenizerFast, cfg: ModelConfig, seed: int) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 model sized by `cfg`, reproducible from `seed` without touching global RNG.

    Embeddings are tied (as in the small Qwen2.5 models): at this size the output matrix would otherwise be a
    large share of all parameters. The generation config stops at `</action>` too, so plain HF or vLLM
    generation from a saved checkpoint ends turns where the rollout engine does.
    """
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def save_policy(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Write a Hugging Face directory: config, generation config, `model.safetensors`, tokenizer files."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def load_policy(directory: Path) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """Load a saved policy in float32 and eval mode.

    Only safetensors weights are accepted (a pickled `.bin` can run code on load), the model class is fixed and
    no remote code is trusted, so loading a checkpoint from shared storage cannot execute anything.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"policy directory {directory} does not exist")
    if not any(directory.glob("*.safetensors")):
        raise FileNotFoundError(
            f"{directory} holds no *.safetensors weights; a policy directory is written by save_policy "
            "(or any save_pretrained(safe_serialization=True)), and pickled .bin weights are refused"
        )
    model = Qwen2ForCausalLM.from_pretrained(directory, use_safetensors=True, dtype=torch.float32,
                                             local_files_only=True)
    # local_files_only: never reach for a hub, and transformers records this flag in the tokenizer_config.json the
    # next save writes, so stating it keeps checkpoints byte-identical whether or not HF_HUB_OFFLINE is set.
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False, local_files_only=True)
    return model.eval(), tokenizer
