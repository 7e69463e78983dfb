"""What the benchmarks share: the embedded default config, a briefly warm-started policy of its shape, and the
machine's load (the numbers mean little on a machine that is busy with something else).

The rollout and optimize benchmarks both need episodes of realistic length, and an untrained policy does not
write them: it never emits `</action>`, so every turn runs to the token budget, every action is malformed, the
game never moves and every episode lasts exactly `max_turns`. A short supervised warm start on the family's
expert games (the warmstart stage's recipe on the games' first turns, without DeepSpeed or storage) is enough for
turns that stop at `</action>`, actions that reach the game and episodes that end at different turns (won early,
or cut at max_turns), which is what a batched engine and a packed loss are up against in a real run. The policy
is cached as an ordinary checkpoint directory, so the second benchmark run and the other benchmark reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

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
SFT_TURNS, SFT_BATCH, SFT_LEARNING_RATE = None, 8, 1e-2


@dataclass(frozen=True)
class WarmPolicy:
    config: Config
    model: Qwen2ForCausalLM
    tokenizer: PreTrainedTokenizerFast
    directory: Path  # the cached checkpoint


def warm_policy(expert_tasks: int, sft_steps: int, seed: int = 0) -> WarmPolicy:
    """The tiny-cpu config's policy: tokenizer and model built as warmstart builds them, then `sft_steps` AdamW
    steps on the first turns of `expert_tasks` expert games; loaded from the cache when it was built before."""
    config = load_config(CONFIG)
    recipe = {"config": CONFIG.read_text(), "expert_tasks": expert_tasks, "sft_steps": sft_steps, "seed": seed,
              "sft": [SFT_TURNS, SFT_BATCH, SFT_LEARNING_RATE]}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(os.environ.get("DYPO_CACHE_DIR", PROJECT / ".cache")) / "bench" / f"warm-policy-{key}"
    if not (directory / "model.safetensors").is_file():
        model, tokenizer = _warm_start(config, expert_tasks, sft_steps, seed)
        save_policy(model, tokenizer, directory)
    model, tokenizer = load_policy(directory)
    return WarmPolicy(config, model, tokenizer, directory)


def _warm_start(config: Config, expert_tasks: int, sft_steps: int,
                seed: int) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    tasks = get_family(config.env).make_tasks("train", expert_tasks)
    with EnvPool(config.env, size=2) as pool:
        games = pool.expert_episodes(tasks)
    prompt = system_prompt(config.env)
    tokenizer = train_tokenizer(corpus(prompt, games), config.model.vocab_size)
    model = build_model(tokenizer, config.model, seed=seed)
    sequences = [TrainingSequence(*expert_sequence(tokenizer, prompt, turns[:SFT_TURNS]), advantage=0.0)
                 for turns in games]
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LEARNING_RATE)
    rng = random.Random(seed)
    model.train()
    for step in range(sft_steps):
        batch = rng.sample(sequences, min(SFT_BATCH, len(sequences)))
        tensors = collate(batch, tokenizer.pad_token_id)
        logp, _ = token_logprobs(model, tensors["input_ids"], tensors["attention_mask"])
        loss = sft_loss(logp, tensors["loss_mask"], sum(seq.num_loss_tokens for seq in batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in (0, sft_steps - 1):
            print(f"warm start: step {step + 1}/{sft_steps}, SFT loss {loss.item():.3f}", flush=True)
    return model.eval(), tokenizer


def use_threads(threads: int) -> None:
    """Set torch's intra-op threads. The default is one: the 2 cores here are shared with the game workers (and
    often with other jobs), and with more OpenMP threads than free cores every parallel op waits at a barrier
    for a descheduled thread; a batch-16 decode step of the tiny model measured 25 ms on one thread and 340 ms on
    two under a load of 14. Both sides of a comparison run with the same setting."""
    torch.set_num_threads(threads)


def load_note() -> str:
    """The 1-minute load average against the core count, printed with every result."""
    return f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
