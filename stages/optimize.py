"""Stage `optimize`: one DyPO update of the policy on the filtered batch (DESIGN.md §1).

Each accepted episode is one token sequence with its loss mask (generated tokens only) and its group-relative
advantage from the filter. `logp_old` is recomputed here with the weights that played the rollout, before any
update; with the default of one update per iteration the ratio is exactly 1 and the clipped loss reduces to
-mean(A) over generated tokens, whose gradient is the policy gradient. The new weights and AdamW's state are
written for the next iteration.
"""

from __future__ import annotations

import random
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from dypo.schemas.tables import BATCH, TRAIN_METRICS, TURNS
from dypo.stages.commit import StageOutcome, commit_stage, input_digest, require_committed
from dypo.stages.context import RunContext
from dypo.stages.dypo_loss import dypo_loss, token_logprobs
from dypo.stages.policy import load_policy
from dypo.stages.sequences import TrainingSequence, collate, episode_sequence, micro_batches
from dypo.stages.trainer import DeepSpeedTrainer


@dataclass(frozen=True)
class PolicyMicroBatch:
    sequences: list[TrainingSequence]
    old_logprobs: list[torch.Tensor]  # per sequence, unpadded: log pi_old of every token
    pad_id: int
    num_tokens_total: int  # generated tokens of the whole update (token-level mean over the batch)
    eps_low: float
    eps_high: float
    temperature: float  # the rollout's sampling temperature: pi = softmax(logits / T)


def policy_loss(engine: torch.nn.Module, batch: PolicyMicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
    tensors = collate(batch.sequences, batch.pad_id)
    logp_old = torch.zeros_like(tensors["advantages"])
    for row, old in enumerate(batch.old_logprobs):
        logp_old[row, :len(old)] = old
    logp, entropy = token_logprobs(engine, tensors["input_ids"], tensors["attention_mask"], with_entropy=True,
                                   temperature=batch.temperature)
    loss, stats = dypo_loss(logp, logp_old, tensors["advantages"], tensors["loss_mask"], batch.eps_low,
                            batch.eps_high, batch.num_tokens_total)
    stats["entropy"] = (entropy * tensors["loss_mask"]).sum().item() / batch.num_tokens_total
    return loss, stats


@torch.no_grad()
def old_logprobs(model: torch.nn.Module, sequences: list[TrainingSequence], pad_id: int, chunk: int,
                 temperature: float) -> list[torch.Tensor]:
    """log pi_old of every token, with the weights that played the rollout (before any update)."""
    model.eval()
    result = []
    for part in micro_batches(sequences, chunk):
        tensors = collate(part, pad_id)
        logp, _ = token_logprobs(model, tensors["input_ids"], tensors["attention_mask"], temperature=temperature)
        result += [logp[row, :len(seq.input_ids)].clone() for row, seq in enumerate(part)]
    return result


def load_sequences(ctx: RunContext, batch: pa.Table, draw_dirs: list[str],
                   ) -> tuple[list[TrainingSequence], list[float]]:
    """Accepted episodes as training sequences, built from the exact token ids the rollout recorded, and each
    episode's summed sampling log-prob as the rollout engine recorded it (to audit against `logp_old`)."""
    accepted = batch.filter(pc.field("accepted"))
    advantages = dict(zip(accepted.column("episode_id").to_pylist(), accepted.column("advantage").to_pylist(),
                          strict=True))
    turns_by_episode: dict[str, list[dict]] = defaultdict(list)
    for directory in draw_dirs:
        turns = ctx.store.read_table(f"{directory}/turns.parquet", TURNS)
        turns = turns.filter(pc.is_in(turns.column("episode_id"), pa.array(list(advantages), pa.string())))
        columns = ["episode_id", "turn_index", "context_token_ids", "generated_token_ids", "sampling_logprob"]
        for row in turns.select(columns).to_pylist():
            turns_by_episode[row["episode_id"]].append(row)
    missing = set(advantages) - set(turns_by_episode)
    if missing:
        raise ValueError(f"batch.parquet accepts episodes with no turns in {draw_dirs}: {sorted(missing)[:3]}")
    sequences, sampling_logprobs = [], []
    for episode_id in sorted(advantages):
        rows = sorted(turns_by_episode[episode_id], key=lambda r: r["turn_index"])
        ids, mask = episode_sequence([(r["context_token_ids"], r["generated_token_ids"]) for r in rows])
        sequences.append(TrainingSequence(ids, mask, advantages[episode_id]))
        sampling_logprobs.append(sum(r["sampling_logprob"] for r in rows))
    return sequences, sampling_logprobs


def sampling_logprob_gap(sequences: list[TrainingSequence], old: list[torch.Tensor],
                         sampling_logprobs: list[float]) -> float:
    """Mean per-token |log pi_old - log p_sampler| over generated tokens: ~0 when the rollout was on-policy.

    A gap means the optimize stage scores different tokens or a different distribution than the sampler drew
    from (wrong checkpoint, re-tokenization, a temperature mismatch, or a numerically different engine).
    """
    gaps = [abs(float(logp[torch.tensor(seq.loss_mask, dtype=torch.bool)].sum()) - sampled)
            for seq, logp, sampled in zip(sequences, old, sampling_logprobs, strict=True)]
    return sum(gaps) / sum(seq.num_loss_tokens for seq in sequences)


def optimize(ctx: RunContext, iteration: int, force: bool = False) -> StageOutcome:
    if iteration < 1:
        raise ValueError(f"optimize runs in iterations >= 1, got {iteration}")
    cfg = ctx.config.optimize
    filtered = require_committed(ctx.store, "filter", iteration)
    policy, _ = ctx.checkpoint(iteration - 1)
    digest = input_digest("optimize", ctx.config.section("run", "rollout", "optimize"), [filtered, policy],
                          {"iteration": iteration})

    def body(writer):
        batch = ctx.store.read_table(f"{filtered.directory}/batch.parquet", BATCH)
        sequences, sampling_logprobs = load_sequences(ctx, batch, filtered.manifest.details["draw_stages"].split(","))
        temperature = ctx.config.rollout.sampling.temperature or 1.0  # a greedy rollout has no temperature
        model, tokenizer = load_policy(ctx.checkpoint_dir(iteration - 1))
        trainer = DeepSpeedTrainer(model, learning_rate=cfg.learning_rate, zero_stage=cfg.zero_stage,
                                   max_grad_norm=cfg.max_grad_norm, extensions_dir=ctx.cache / "torch_extensions")
        if iteration > 1:  # AdamW's moments travel from the previous optimize stage
            trainer.load_optimizer(ctx.local_copy(policy, "optimizer"))
        rows = []
        if sequences:
            old = old_logprobs(trainer.model, sequences, tokenizer.pad_token_id, cfg.micro_batch_episodes, temperature)
            writer.metrics["sampling_logprob_gap"] = sampling_logprob_gap(sequences, old, sampling_logprobs)
            rng = random.Random(ctx.config.run.seed * 7919 + iteration)
            indices = list(range(len(sequences)))
            mini = cfg.mini_batch_episodes or len(sequences)
            for _ in range(cfg.ppo_epochs):
                rng.shuffle(indices)
                for start in range(0, len(indices), mini):
                    chosen = indices[start:start + mini]
                    total = sum(sequences[i].num_loss_tokens for i in chosen)
                    chunks = [PolicyMicroBatch([sequences[i] for i in part], [old[i] for i in part],
                                               tokenizer.pad_token_id, total, cfg.eps_low, cfg.eps_high,
                                               temperature)
                              for part in micro_batches(chosen, cfg.micro_batch_episodes)]
                    stats = trainer.update(chunks, policy_loss)
                    rows.append({"run": ctx.run_name, "iteration": iteration, "update": len(rows),
                                 "loss": stats["loss"], "clip_fraction": stats["clip_fraction"],
                                 "approx_kl": stats["approx_kl"], "entropy": stats["entropy"],
                                 "grad_norm": stats["grad_norm"], "episodes": len(chosen), "tokens": total})
        with tempfile.TemporaryDirectory(dir=ctx.cache) as scratch:
            trainer.save(Path(scratch) / "checkpoint", Path(scratch) / "optimizer", tokenizer)
            writer.write_dir("checkpoint", Path(scratch) / "checkpoint")
            writer.write_dir("optimizer", Path(scratch) / "optimizer")
        writer.write_rows("metrics.parquet", rows, TRAIN_METRICS)
        writer.metrics["updates"] = len(rows)
        writer.metrics["episodes"] = len(sequences)
        if rows:
            last = rows[-1]
            writer.metrics.update({key: float(last[key]) for key in ("loss", "clip_fraction", "approx_kl",
                                                                       "entropy", "grad_norm")})
            writer.metrics["tokens"] = sum(r["tokens"] for r in rows)

    return commit_stage(ctx.store, "optimize", iteration, digest, [filtered, policy], force, body)
