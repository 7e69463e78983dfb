"""What the benchmarks share: the embedded default config, a briefly warm-started policy of its shape, and the
machine's load (the numbers mean little on a machine that is busy with something else).

The rollout and optimize benchmarks both need episodes of realistic length, and an untrained policy does not
write them: it never emits `</action>`, so every turn runs to the 48-token budget. A supervised warm start on the
family's expert games (the warmstart stage's recipe, without DeepSpeed or storage) gives turns that stop at
`</action>` after about 22 tokens, as the experts' turns do (20-25). It does not give a good player: at the
config's temperature (0.7) most turns still break the tag format, the model then reads the short "invalid
format" feedback instead of a room description, and nearly every episode runs its full `max_turns`. That is
the early-training regime, where failed episodes run longest and rollout costs most; its observations are
shorter than a good player's, which favours the sequential baseline (less history to re-encode).

The policy is cached as an ordinary checkpoint directory under DYPO_CACHE_DIR (default .cache/) keyed by its
recipe, so only the first benchmark run pays for it (22 minutes under a load of 20 on 2 cores here).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from dypo.stages.config import Config, load_config
from dypo.stages.conversation import expert_sequence
from dypo.stages.dypo_loss import sft_loss, token_logprobs
from dypo.stages.environments import EnvPool, get_family
from dypo.stages.episodes import system_prompt
from dypo.stages.policy import build_model, load_policy, save_policy, train_tokenizer
from dypo.stages.sequences import TrainingSequence, collate
from dypo.stages.warmstart import corpus

PROJECT = Path(__file__).resolve().parents[1]
CONFIG = PROJECT / "configs" / "tiny-cpu.yaml"
# The warm start, shared by every benchmark (and so built once): more steps or data barely change the turns the
# tiny policy writes at the config's temperature (checked up to 300 steps on whole games).
EXPERT_TASKS, SFT_STEPS, SFT_BATCH, SFT_LEARNING_RATE = 100, 300, 8, 1e-2


@dataclass(frozen=True)
class WarmPolicy:
    config: Config
    model: Qwen2ForCausalLM
    tokenizer: PreTrainedTokenizerFast
    directory: Path  # the cached checkpoint


def warm_policy(seed: int = 0) -> WarmPolicy:
    """The tiny-cpu config's policy: tokenizer and model built as warmstart builds them, then SFT_STEPS AdamW
    steps on EXPERT_TASKS expert games; loaded from the cache when it was built before."""
    config = load_config(CONFIG)
    recipe = {"config": CONFIG.read_text(), "expert_tasks": EXPERT_TASKS, "sft_steps": SFT_STEPS, "seed": seed,
              "sft": [None, SFT_BATCH, SFT_LEARNING_RATE]}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(os.environ.get("DYPO_CACHE_DIR", PROJECT / ".cache")) / "bench" / f"warm-policy-{key}"
    if not (directory / "model.safetensors").is_file():
        model, tokenizer = _warm_start(config, seed)
        save_policy(model, tokenizer, directory)
    model, tokenizer = load_policy(directory)
    return WarmPolicy(config, model, tokenizer, directory)


def _warm_start(config: Config, seed: int) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    tasks = get_family(config.env).make_tasks("train", EXPERT_TASKS)
    with EnvPool(config.env, size=2) as pool:
        games = pool.expert_episodes(tasks)
    prompt = system_prompt(config.env)
    tokenizer = train_tokenizer(corpus(prompt, games), config.model.vocab_size)
    model = build_model(tokenizer, config.model, seed=seed)
    sequences = [TrainingSequence(*expert_sequence(tokenizer, prompt, turns), advantage=0.0) for turns in games]
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LEARNING_RATE)
    rng = random.Random(seed)
    model.train()
    for step in range(SFT_STEPS):
        batch = rng.sample(sequences, min(SFT_BATCH, len(sequences)))
        tensors = collate(batch, tokenizer.pad_token_id)
        logp, _ = token_logprobs(model, tensors["input_ids"], tensors["attention_mask"])
        loss = sft_loss(logp, tensors["loss_mask"], sum(seq.num_loss_tokens for seq in batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (0, SFT_STEPS - 1):
            print(f"warm start: step {step + 1}/{SFT_STEPS}, SFT loss {loss.item():.3f}", flush=True)
    return model.eval(), tokenizer


@torch.no_grad()
def widened(model: Qwen2ForCausalLM, factor: int, num_layers: int) -> Qwen2ForCausalLM:
    """A Qwen2 model `factor` times as wide and `num_layers` deep that computes exactly `model`'s function.

    For measuring an engine at a realistic policy size without training one: the wide model plays the same
    episodes (same turn lengths) as `model` while every forward costs what a model of its size costs. Widths grow
    by adding heads (head_dim kept), MLP channels and hidden channels whose weights are zero, so the added hidden
    channels stay zero through the residual stream; the norms' weights and eps are rescaled so that RMS over the
    wider hidden state equals RMS over the original; added layers have zero output projections, so they add
    their cost and nothing else.
    """
    source = model.config
    if num_layers < source.num_hidden_layers or factor < 1:
        raise ValueError(f"widened() only grows a model: factor {factor} >= 1, num_layers {num_layers} >= "
                         f"{source.num_hidden_layers}")
    hidden, wide = source.hidden_size, source.hidden_size * factor
    config = Qwen2Config(**{**source.to_dict(), "hidden_size": wide, "num_hidden_layers": num_layers,
                            "num_attention_heads": source.num_attention_heads * factor,
                            "num_key_value_heads": source.num_key_value_heads * factor,
                            "intermediate_size": source.intermediate_size * factor,
                            "head_dim": source.hidden_size // source.num_attention_heads,
                            "rms_norm_eps": source.rms_norm_eps * hidden / wide, "layer_types": None})
    big = Qwen2ForCausalLM(config)
    for parameter in big.parameters():
        parameter.zero_()
    norm_scale = math.sqrt(hidden / wide)  # RMS over `wide` channels of which only `hidden` are non-zero

    def copy_into(target: torch.nn.Module, original: torch.nn.Module) -> None:
        for name, tensor in original.named_parameters():
            getattr(target, name)[tuple(slice(0, size) for size in tensor.shape)] = tensor

    big.model.embed_tokens.weight[:, :hidden] = model.model.embed_tokens.weight
    for index, layer in enumerate(big.model.layers):
        layer.input_layernorm.weight.fill_(norm_scale)
        layer.post_attention_layernorm.weight.fill_(norm_scale)
        if index >= source.num_hidden_layers:
            continue
        original = model.model.layers[index]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            copy_into(getattr(layer.self_attn, name), getattr(original.self_attn, name))
        for name in ("gate_proj", "up_proj", "down_proj"):
            copy_into(getattr(layer.mlp, name), getattr(original.mlp, name))
        layer.input_layernorm.weight[:hidden] *= original.input_layernorm.weight
        layer.post_attention_layernorm.weight[:hidden] *= original.post_attention_layernorm.weight
    big.model.norm.weight.fill_(norm_scale)
    big.model.norm.weight[:hidden] *= model.model.norm.weight
    big.generation_config = model.generation_config
    return big.eval()


def use_threads(threads: int) -> None:
    """Set torch's intra-op threads. The default is one: the 2 cores here are shared with the game workers (and
    often with other jobs), and with more OpenMP threads than free cores every parallel op waits at a barrier
    for a descheduled thread; a batch-16 decode step of the tiny model measured 25 ms on one thread and 340 ms on
    two under a load of 15. Both sides of a comparison run with the same setting."""
    torch.set_num_threads(threads)


def load_note() -> str:
    """The 1-minute load average against the core count, printed with every result."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
