"""Stage `optimize`: one DyPO update of the policy on the filtered batch (DESIGN.md §1).

Each accepted episode is one token sequence with its loss mask (generated tokens only) and its group-relative
advantage from the filter. `logp_old` is recomputed here with the weights that played the rollout, before any
update; with the default of one update per iteration the ratio is exactly 1 and the clipped loss reduces to
minus the mean advantage (per episode by default, `optimize.loss_aggregation`), whose gradient is the policy
gradient. The new weights and AdamW's state are written for the next iteration.

Under a distributed launch (torchrun, as k8s/optimize-multinode runs it) every rank runs this same stage on the
whole batch: each scores its share of pi_old and takes its share of every update's micro-batches (the trainer
pools the gradients), and rank 0 alone writes the outputs and commits.
"""

from __future__ import annotations

import itertools
import random
import tempfile
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch

from dypo.schemas.tables import BATCH, TRAIN_METRICS, TURNS
from dypo.stages.commit import (
    CommittedStage,
    StageOutcome,
    StageWriter,
    commit_stage,
    committed_as_asked,
    input_digest,
    read_stage_table,
    require_committed,
)
from dypo.stages.context import RunContext
from dypo.stages.dypo_loss import aggregation_weights, dypo_loss
from dypo.stages.packing import PackedBatch, packed_micro_batches, packed_token_logprobs
from dypo.stages.policy import load_policy
from dypo.stages.sequences import TrainingSequence, TurnTokens, episode_sequence, turn_samples
from dypo.stages.trainer import DeepSpeedTrainer, launch_rank, rank_share, sum_over_ranks


@dataclass(frozen=True)
class PolicyMicroBatch:
    """One packed forward pass of an update, with pi_old (and pi_ref) laid out like its tokens."""

    packed: PackedBatch
    logp_old: torch.Tensor  # log pi_old of every packed token (the weights that played the rollout)
    logp_ref: torch.Tensor | None  # log pi_ref (the frozen warmstart), only with a KL term
    kl_coef: float
    num_tokens_total: int  # loss tokens of the whole update (token-level mean over the batch)
    eps_low: float
    eps_high: float
    temperature: float  # the rollout's sampling temperature: pi = softmax(logits / T)


def policy_loss(engine: torch.nn.Module, batch: PolicyMicroBatch) -> tuple[torch.Tensor, dict[str, float]]:
    packed = batch.packed
    logp, entropy = packed_token_logprobs(engine, packed, batch.temperature, with_entropy=True)
    loss, stats = dypo_loss(logp, batch.logp_old, packed.advantages, packed.loss_mask, batch.eps_low,
                            batch.eps_high, batch.num_tokens_total, logp_ref=batch.logp_ref, kl_coef=batch.kl_coef)
    stats["entropy"] = (entropy * packed.loss_mask).sum().item() / batch.num_tokens_total
    return loss, stats


@torch.no_grad()
def sequence_logprobs(model: torch.nn.Module, sequences: list[TrainingSequence], pad_id: int, token_budget: int,
                      temperature: float) -> list[torch.Tensor]:
    """log pi of every token of every sequence under a fixed model: pi_old (the weights that played the rollout,
    before any update) or pi_ref (the frozen warmstart policy of the KL ablation).

    Each rank scores every world-size-th micro-batch into one flat buffer of all sequences' tokens; summed over
    ranks, every rank holds all the log-probs."""
    model.eval()
    rank, world = rank_share()
    starts = [0, *itertools.accumulate(len(sequence.input_ids) for sequence in sequences)]
    flat = torch.zeros(starts[-1])
    micro_batches = packed_micro_batches(sequences, list(range(len(sequences))), token_budget, pad_id)
    for members, packed in micro_batches[rank::world]:
        logp, _ = packed_token_logprobs(model, packed, temperature)
        for index, values in zip(members, packed.unpack(logp), strict=True):
            flat[starts[index]:starts[index + 1]] = values
    sum_over_ranks(flat)
    return [flat[start:end] for start, end in itertools.pairwise(starts)]


def load_sequences(ctx: RunContext, batch: pa.Table, draw_dirs: list[str],
                   ) -> tuple[list[TrainingSequence], list[float]]:
    """Accepted episodes as training samples, built from the exact token ids the rollout recorded, and each
    sample's summed sampling log-prob as the rollout engine recorded it (to audit against `logp_old`).

    `optimize.sample_form` decides the samples: one sequence per episode, or one per turn (DESIGN.md §1.3 and
    the verl-agent form); either way every loss token carries its episode's advantage.
    """
    cfg = ctx.config.optimize
    accepted = batch.filter(pc.field("accepted"))
    advantages = dict(zip(accepted.column("episode_id").to_pylist(), accepted.column("advantage").to_pylist(),
                          strict=True))
    turns_by_episode: dict[str, list[dict]] = defaultdict(list)
    for directory in draw_dirs:
        turns = read_stage_table(ctx.store, directory, "turns.parquet", TURNS)
        turns = turns.filter(pc.is_in(turns.column("episode_id"), pa.array(list(advantages), pa.string())))
        columns = ["episode_id", "turn_index", "context_token_ids", "generated_token_ids", "context_reset",
                   "sampling_logprob"]
        for row in turns.select(columns).to_pylist():
            turns_by_episode[row["episode_id"]].append(row)
    missing = set(advantages) - set(turns_by_episode)
    if missing:
        raise ValueError(f"batch.parquet accepts episodes with no turns in {draw_dirs}: {sorted(missing)[:3]}")
    sequences, sampling_logprobs = [], []
    for episode_id in sorted(advantages):
        rows = sorted(turns_by_episode[episode_id], key=lambda r: r["turn_index"])
        turns = [TurnTokens(r["context_token_ids"], r["generated_token_ids"], bool(r["context_reset"]))
                 for r in rows]
        if cfg.sample_form == "trajectory":
            ids, mask = episode_sequence(turns, cfg.mask_observations)
            sequences.append(TrainingSequence(ids, mask, advantages[episode_id]))
            sampling_logprobs.append(sum(r["sampling_logprob"] for r in rows))
        else:
            for (ids, mask), row in zip(turn_samples(turns), rows, strict=True):
                sequences.append(TrainingSequence(ids, mask, advantages[episode_id]))
                sampling_logprobs.append(row["sampling_logprob"])
    return sequences, sampling_logprobs


def reference_logprobs(ctx: RunContext, sequences: list[TrainingSequence], token_budget: int,
                       temperature: float) -> list[torch.Tensor]:
    """log pi_ref of every token under the frozen warmstart policy (the KL ablation).

    The reference is loaded, scored once and dropped before any update, so it never shares memory with the
    policy being trained; with kl_coef = 0 (DyPO) this function is never called and no reference is loaded.
    """
    reference, tokenizer = load_policy(ctx.checkpoint_dir(0))
    try:
        return sequence_logprobs(reference, sequences, tokenizer.pad_token_id, token_budget, temperature)
    finally:
        del reference


def sampling_logprob_gap(sequences: list[TrainingSequence], old: list[torch.Tensor],
                         sampling_logprobs: list[float]) -> float:
    """Mean per-token |log pi_old - log p_sampler| over generated tokens: ~0 when the rollout was on-policy.

    A gap means the optimize stage scores different tokens or a different distribution than the sampler drew
    from (wrong checkpoint, re-tokenization, a temperature mismatch, or a numerically different engine).
    """
    gaps = [abs(float(logp[torch.tensor(seq.loss_mask, dtype=torch.bool)].sum()) - sampled)
            for seq, logp, sampled in zip(sequences, old, sampling_logprobs, strict=True)]
    return sum(gaps) / sum(seq.num_loss_tokens for seq in sequences)


@dataclass(frozen=True)
class PolicyUpdate:
    """What one optimize stage's training did, for its metrics."""

    rows: list[dict]  # one per optimizer step (train_metrics)
    samples: int
    sampling_logprob_gap: float | None  # None when observations carry loss (the sampler never drew them)


def update_policy(ctx: RunContext, iteration: int, filtered: CommittedStage, policy: CommittedStage,
                  reference: CommittedStage | None, out_dir: Path) -> PolicyUpdate:
    """The iteration's DyPO updates on the filtered batch, starting from `policy` (the commit of the weights that
    played the rollout); rank 0 saves the new weights and AdamW's state under `out_dir` (checkpoint/,
    optimizer/). Every rank of a distributed launch runs this on the whole batch."""
    cfg = ctx.config.optimize
    batch = ctx.store.read_table(f"{filtered.directory}/batch.parquet", BATCH)
    sequences, sampling_logprobs = load_sequences(ctx, batch, filtered.manifest.details["draw_stages"].split(","))
    temperature = ctx.config.rollout.sampling.temperature or 1.0  # a greedy rollout has no temperature
    model, tokenizer = load_policy(ctx.local_copy(policy, "checkpoint"))
    trainer = DeepSpeedTrainer(model, learning_rate=cfg.learning_rate, zero_stage=cfg.zero_stage,
                               max_grad_norm=cfg.max_grad_norm, extensions_dir=ctx.cache / "torch_extensions")
    if iteration > 1:  # AdamW's moments travel from the previous optimize stage
        trainer.load_optimizer(ctx.local_copy(policy, "optimizer"))
    rows, gap = [], None
    if sequences:
        old = sequence_logprobs(trainer.model, sequences, tokenizer.pad_token_id, cfg.micro_batch_tokens,
                                temperature)
        ref = None if reference is None else reference_logprobs(ctx, sequences, cfg.micro_batch_tokens,
                                                                temperature)
        if cfg.mask_observations:  # otherwise loss tokens include observations, which the sampler never drew
            gap = sampling_logprob_gap(sequences, old, sampling_logprobs)
        rng = random.Random(ctx.config.run.seed * 7919 + iteration)
        indices = list(range(len(sequences)))
        mini = cfg.mini_batch_size or len(sequences)
        for _ in range(cfg.ppo_epochs):
            rng.shuffle(indices)
            for start in range(0, len(indices), mini):
                chosen = indices[start:start + mini]
                loss_tokens = [sequences[i].num_loss_tokens for i in chosen]
                total = sum(loss_tokens)
                weights = aggregation_weights(loss_tokens, cfg.loss_aggregation)
                weighted = list(sequences)
                for i, weight in zip(chosen, weights, strict=True):
                    weighted[i] = replace(sequences[i], advantage=sequences[i].advantage * weight)
                chunks = [PolicyMicroBatch(packed, packed.place([old[i] for i in part]),
                                           None if ref is None else packed.place([ref[i] for i in part]),
                                           cfg.kl_coef, total, cfg.eps_low, cfg.eps_high, temperature)
                          for part, packed in packed_micro_batches(weighted, chosen, cfg.micro_batch_tokens,
                                                                   tokenizer.pad_token_id)]
                stats = trainer.update(chunks, policy_loss)
                rows.append({"run": ctx.run_name, "iteration": iteration, "update": len(rows),
                             "loss": stats["loss"], "clip_fraction": stats["clip_fraction"],
                             "approx_kl": stats["approx_kl"], "entropy": stats["entropy"],
                             "grad_norm": stats["grad_norm"], "kl_ref": stats.get("kl_ref"),
                             "samples": len(chosen), "tokens": total})
    trainer.save(out_dir / "checkpoint", out_dir / "optimizer", tokenizer)
    return PolicyUpdate(rows, len(sequences), gap)


def optimize(ctx: RunContext, iteration: int, force: bool = False) -> StageOutcome:
    if iteration < 1:
        raise ValueError(f"optimize runs in iterations >= 1, got {iteration}")
    cfg = ctx.config.optimize
    filtered = require_committed(ctx.store, "filter", iteration)
    policy, _ = ctx.checkpoint(iteration - 1)
    reference = ctx.checkpoint(0)[0] if cfg.kl_coef > 0 else None
    inputs = [filtered, policy] if reference is None or reference == policy else [filtered, policy, reference]
    digest = input_digest("optimize", ctx.config.section("run", "rollout", "optimize"), inputs,
                          {"iteration": iteration})

    if launch_rank() != 0:  # a follower: trains its share beside rank 0, which writes and commits
        existing = committed_as_asked(ctx.store, "optimize", iteration, digest, force)
        if existing is not None:
            return StageOutcome(existing, skipped=True)  # rank 0 skips too: it read the same manifest
        with tempfile.TemporaryDirectory(dir=ctx.cache) as scratch:
            update_policy(ctx, iteration, filtered, policy, reference, Path(scratch))
        return StageOutcome(None, skipped=False)

    def body(writer: StageWriter) -> None:
        with tempfile.TemporaryDirectory(dir=ctx.cache) as scratch:
            update = update_policy(ctx, iteration, filtered, policy, reference, Path(scratch))
            writer.write_dir("checkpoint", Path(scratch) / "checkpoint")
            writer.write_dir("optimizer", Path(scratch) / "optimizer")
        writer.write_rows("metrics.parquet", update.rows, TRAIN_METRICS)
        if update.sampling_logprob_gap is not None:
            writer.metrics["sampling_logprob_gap"] = update.sampling_logprob_gap
        writer.metrics["updates"] = len(update.rows)
        writer.metrics["samples"] = update.samples
        if update.rows:
            last = update.rows[-1]
            writer.metrics.update({key: float(last[key]) for key in ("loss", "clip_fraction", "approx_kl",
                                                                       "entropy", "grad_norm", "kl_ref")
                                   if last[key] is not None})
            writer.metrics["tokens"] = sum(r["tokens"] for r in update.rows)

    return commit_stage(ctx.store, "optimize", iteration, digest, inputs, force, body)
