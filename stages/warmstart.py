"""Stage `warmstart` (iteration 0): build the tiny policy and teach it the turn format from expert games.

RL from a random policy on multi-turn games would never see a success, so every group would have zero variance
and DyPO would have nothing to learn from. The warmstart trains a byte-level BPE tokenizer on the environment's
own text, builds a randomly initialised Qwen2-architecture model, and fine-tunes it briefly on expert games (a
family's expert, which wins every game, see `EnvFamily.expert_turns`) rendered in the exact
`<think>…</think><action>…</action>` format the rollout engine samples. It is deliberately short: the policy
should play the format and sometimes win, leaving room for RL.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import Progress

from dypo.stages.commit import StageOutcome, commit_stage, input_digest
from dypo.stages.context import RunContext
from dypo.stages.conversation import expert_sequence
from dypo.stages.dypo_loss import sft_loss
from dypo.stages.environments import EnvPool, ExpertTurn, get_family
from dypo.stages.episodes import system_prompt
from dypo.stages.packing import PackedBatch, packed_micro_batches, packed_token_logprobs
from dypo.stages.policy import build_model, train_tokenizer
from dypo.stages.sequences import TrainingSequence
from dypo.stages.trainer import DeepSpeedTrainer, launch_world_size
from dypo.stages.turn_format import render_turn

_EXPERT_WORKERS = 2  # expert games are played in this many env workers at once


@dataclass(frozen=True)
class SupervisedMicroBatch:
    packed: PackedBatch
    num_tokens_total: int  # loss tokens of the whole update, so micro-batch losses sum to the batch mean


def supervised_loss(engine: torch.nn.Module, batch: SupervisedMicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
    logp, _ = packed_token_logprobs(engine, batch.packed)
    return sft_loss(logp, batch.packed.loss_mask, batch.num_tokens_total), {}


def corpus(prompt: str, games: list[list[ExpertTurn]]) -> list[str]:
    """The text the tokenizer learns from: what the model will read and write."""
    texts = [prompt]
    for turns in games:
        texts += [piece for turn in turns for piece in (turn.observation, render_turn(turn.think, turn.action))]
    return texts


def warmstart(ctx: RunContext, iteration: int = 0, force: bool = False) -> StageOutcome:
    if iteration != 0:
        raise ValueError(f"warmstart is iteration 0 of a run, got --iter {iteration}")
    ranks = launch_world_size()
    if ranks > 1:  # every rank would build, train and commit its own policy
        raise ValueError(f"warmstart runs as one process (it builds the small policy from scratch), but this is "
                         f"one of {ranks} ranks of a distributed launch: run `dypo stage warmstart` "
                         "without torchrun (only optimize runs data-parallel)")
    cfg = ctx.config
    digest = input_digest("warmstart", cfg.section("run", "env", "model", "warmstart", "optimize"), [], {})

    def body(writer):
        tasks = get_family(cfg.env).make_tasks("train", cfg.warmstart.expert_tasks, start=0)
        with EnvPool(cfg.env, _EXPERT_WORKERS) as pool, Progress(transient=True) as bar:
            bar.add_task("warmstart: expert games", total=None)
            games = pool.expert_episodes(tasks)
        prompt = system_prompt(cfg.env)
        tokenizer = train_tokenizer(corpus(prompt, games[:cfg.model.tokenizer_corpus_tasks]), cfg.model.vocab_size)
        model = build_model(tokenizer, cfg.model, seed=cfg.run.seed)
        sequences = [TrainingSequence(*expert_sequence(tokenizer, prompt, turns), advantage=0.0) for turns in games]
        trainer = DeepSpeedTrainer(model, learning_rate=cfg.warmstart.learning_rate,
                                   zero_stage=cfg.optimize.zero_stage, max_grad_norm=cfg.optimize.max_grad_norm,
                                   extensions_dir=ctx.cache / "torch_extensions")
        rng = random.Random(cfg.run.seed)
        losses = []
        with Progress(transient=True) as bar:
            progress = bar.add_task("warmstart: supervised steps", total=cfg.warmstart.steps)
            for _ in range(cfg.warmstart.steps):
                batch = rng.sample(sequences, min(cfg.warmstart.batch_size, len(sequences)))
                total = sum(seq.num_loss_tokens for seq in batch)
                chunks = [SupervisedMicroBatch(packed, total) for _, packed in packed_micro_batches(
                    batch, range(len(batch)), cfg.optimize.micro_batch_tokens, tokenizer.pad_token_id)]
                losses.append(trainer.update(chunks, supervised_loss)["loss"])
                bar.update(progress, advance=1, description=f"warmstart: supervised steps (loss {losses[-1]:.3f})")
        with tempfile.TemporaryDirectory(dir=ctx.cache) as scratch:
            checkpoint = Path(scratch) / "checkpoint"
            trainer.save(checkpoint, Path(scratch) / "optimizer", tokenizer)
            writer.write_dir("checkpoint", checkpoint)
        writer.metrics.update({
            "expert_episodes": len(games),
            "mean_expert_turns": sum(len(g) for g in games) / len(games),
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "vocab_size": len(tokenizer),
            "sft_loss_first": losses[0] if losses else float("nan"),
            "sft_loss": losses[-1] if losses else float("nan"),
        })

    return commit_stage(ctx.store, "warmstart", 0, digest, [], force, body)
