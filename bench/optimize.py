"""The optimize stage's loss step, packed, against TRL's GRPO loss, on the same batch and the same model.

The batches are real token sequences: episodes the warm-started tiny-cpu policy (common.py) plays on
TextWorldExpress coin with the config's sampling and rules, one sequence per episode with observations masked and
group-relative advantages from their returns (see `batches` for the "early" and "mixed" batch). `log pi_old` is
the policy's own log-prob plus seeded noise (sigma 0.3), so ratios spread and clip as in a later PPO epoch and
the loss depends on the log-probs each side computes: the two losses and entropy means must agree, which checks
that both compute the same objective.

Both sides run one update's gradient accumulation over the whole batch with the same number of token slots per
forward pass (`optimize.micro_batch_tokens`, or `--token-budget`):
- packed (ours), as the optimize stage runs it: `packed_micro_batches` (rows as wide as the longest episode, as
  many rows per pass as fit the slots), `packed_token_logprobs` with entropy, `dypo_loss` normalised by the
  batch's loss tokens, backward.
- TRL: a `GRPOTrainer` (trl 1.16) around the same model, `loss_type="dapo"` (the token-level mean over the batch,
  as ours), the same clip range and temperature, no KL; the batch in the layout its
  `_generate_and_score_completions` produces (prompt = the first turn's context, left-padded; completion = the
  rest of the episode, right-padded, with `tool_mask` 0 on observation tokens, TRL's multi-turn masking), cut
  into micro-batches of as many episodes as fit the same slots, then `trainer.compute_loss(model, inputs)` and
  backward per micro-batch. That is TRL's whole loss path: its fused, chunked LM head for log-probs and
  entropies (no full logits), its clipped surrogate and its metrics. Not measured on either side: generation,
  rewards, the optimizer step.

Throughput is real (non-padding) tokens of the batch per second of loss step; both sides score the same tokens.
Peak memory: torch's CPU allocations go through malloc, where tracemalloc does not see them, so each variant runs
in a fresh process that reads its resident set from /proc: after setup (model, trainer, batch tensors) it returns
free heap to the OS, notes its RSS, resets the kernel's high-water mark (/proc/self/clear_refs) and runs the first
loss step; the step's peak is the high-water mark minus that RSS. This counts everything the step allocates
(activations, logits, attention masks, gradients) and nothing that imports or setup left behind. Without --quick
the variants alternate over two rounds, so a change in the machine's load falls on both.

    .venv/bin/python -m bench.optimize [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import PROJECT, load_note, use_threads, warm_policy
from dypo.stages.conversation import expert_sequence
from dypo.stages.dypo_loss import dypo_loss, group_advantages, token_logprobs
from dypo.stages.environments import EnvPool, get_family
from dypo.stages.episodes import episode_return, episode_rules, system_prompt
from dypo.stages.generation import play_episodes
from dypo.stages.packing import packed_micro_batches, packed_token_logprobs
from dypo.stages.policy import load_policy
from dypo.stages.sequences import TrainingSequence, TurnTokens, episode_sequence
from dypo.stages.trajectory import EpisodeSpec

EPS_LOW, EPS_HIGH = 0.2, 0.28
OLD_LOGPROB_NOISE = 0.3
VARIANTS = ("packed", "trl")


# --- the batch (parent process) ----------------------------------------------------------------------------------


def batches(tasks: int, group_size: int, seed: int) -> dict[str, dict]:
    """The two batches, as JSON data: sequences with group advantages and noisy old log-probs.

    early: the warm policy's own episodes. Nearly all run the full max_turns, so lengths hardly vary and packing
      has little padding to remove: this measures what packing costs when it cannot help.
    mixed: the same groups with half of each group's episodes replaced by the family's expert playing the same
      task (real winning games, 2-8 turns, tokenized exactly as a rollout would be). This is the length spread of
      a group that has started to win, the kind of group DyPO's filter keeps.
    """
    policy = warm_policy(seed)
    config = policy.config
    family = get_family(config.env)
    task_list = family.make_tasks("train", tasks, start=700)
    specs = [EpisodeSpec(task, f"g{index}", f"g{index}-e{member}")
             for index, task in enumerate(task_list) for member in range(group_size)]
    batch_episodes = min(config.rollout.batch_episodes, len(specs))
    with EnvPool(config.env, batch_episodes) as pool:
        records = play_episodes(policy.model, policy.tokenizer, specs, pool, config.rollout.sampling,
                                episode_rules(config), batch_episodes, seed)
        experts = pool.expert_episodes(task_list)
    played = [(episode_sequence([TurnTokens(t.context_token_ids, t.generated_token_ids) for t in record.turns]),
               episode_return(record, config.rollout), record.won) for record in records]
    expert_played = [(expert_sequence(policy.tokenizer, system_prompt(config.env), turns), 1.0, True)
                     for turns in experts]
    mixed = [expert_played[index // group_size] if index % group_size < group_size // 2 else episode
             for index, episode in enumerate(played)]
    group_ids = [spec.group_id for spec in specs]
    temperature = config.rollout.sampling.temperature or 1.0
    return {name: _batch_data(policy, episodes, group_ids, temperature, seed)
            for name, episodes in (("early", played), ("mixed", mixed))}


def _batch_data(policy, episodes: list[tuple[tuple[list[int], list[int]], float, bool]], group_ids: list[str],
                temperature: float, seed: int) -> dict:
    advantages = group_advantages([ret for _, ret, _ in episodes], group_ids, std_normalize=True, eps=1e-6)
    generator = torch.Generator().manual_seed(seed)
    sequences, old = [], []
    with torch.no_grad():
        for ((ids, loss_mask), _, _), advantage in zip(episodes, advantages, strict=True):
            sequences.append({"input_ids": ids, "loss_mask": loss_mask, "advantage": advantage})
            tensor = torch.tensor([ids])
            logp, _ = token_logprobs(policy.model, tensor, torch.ones_like(tensor), temperature=temperature)
            old.append((logp[0] + OLD_LOGPROB_NOISE * torch.randn(len(ids), generator=generator)).tolist())
    return {"policy": str(policy.directory), "temperature": temperature, "won": sum(won for _, _, won in episodes),
            "micro_batch_tokens": policy.config.optimize.micro_batch_tokens,
            "sequences": sequences, "old_logprobs": old}


# --- the two loss steps (child process) --------------------------------------------------------------------------


def packed_step(model: torch.nn.Module, sequences: list[TrainingSequence], old: list[torch.Tensor],
                token_budget: int, pad_id: int, temperature: float) -> dict[str, float]:
    """The optimize stage's update: forward passes of at most `token_budget` packed slots
    (`packed_micro_batches`), gradients accumulated, each pass's loss normalised by the batch's loss tokens."""
    total = sum(seq.num_loss_tokens for seq in sequences)
    passes = packed_micro_batches(sequences, list(range(len(sequences))), token_budget, pad_id)
    loss_sum = entropy_sum = 0.0
    for members, packed in passes:
        logp, entropy = packed_token_logprobs(model, packed, temperature, with_entropy=True)
        loss, _ = dypo_loss(logp, packed.place([old[i] for i in members]), packed.advantages, packed.loss_mask,
                            EPS_LOW, EPS_HIGH, total)
        loss.backward()
        loss_sum += loss.item()
        entropy_sum += (entropy * packed.loss_mask).sum().item()
    return {"loss": loss_sum, "entropy": entropy_sum / total, "passes": len(passes),
            "slots": sum(packed.input_ids.numel() for _, packed in passes)}


def trl_passes(sequences: list[TrainingSequence], old: list[torch.Tensor], pad_id: int,
               token_budget: int) -> list[dict[str, torch.Tensor]]:
    """The batch as GRPOTrainer's generation step lays it out (prompt left-padded, completion right-padded, both
    to the batch's longest), cut into micro-batches of as many episodes as fit `token_budget` padded tokens, so
    neither side's forward pass holds more token slots than the other's. Every micro-batch carries the batch's
    loss-token count, so with one accumulation step per generation its loss is its share of the batch mean."""
    from trl.trainer.utils import pad

    prompts, completions, tool_masks, old_completion = [], [], [], []
    for seq, logp in zip(sequences, old, strict=True):
        start = seq.loss_mask.index(1)  # the prompt is the first turn's context: everything before the first turn
        prompts.append(torch.tensor(seq.input_ids[:start]))
        completions.append(torch.tensor(seq.input_ids[start:]))
        tool_masks.append(torch.tensor(seq.loss_mask[start:]))
        old_completion.append(logp[start:])
    tool_mask = pad(tool_masks, padding_value=0, padding_side="right")
    batch = {
        "prompt_ids": pad(prompts, padding_value=pad_id, padding_side="left"),
        "prompt_mask": pad([torch.ones_like(ids) for ids in prompts], padding_value=0, padding_side="left"),
        "completion_ids": pad(completions, padding_value=pad_id, padding_side="right"),
        "completion_mask": pad([torch.ones_like(ids) for ids in completions], padding_value=0, padding_side="right"),
        "tool_mask": tool_mask,
        "advantages": torch.tensor([seq.advantage for seq in sequences]),
        "old_per_token_logps": pad(old_completion, padding_value=0.0, padding_side="right"),
    }
    width = batch["prompt_ids"].shape[1] + batch["completion_ids"].shape[1]
    per_pass = max(1, token_budget // width)
    return [{**{key: value[start:start + per_pass] for key, value in batch.items()},
             "num_items_in_batch": tool_mask.sum()} for start in range(0, len(sequences), per_pass)]


def trl_trainer(model: torch.nn.Module, tokenizer, temperature: float, batch_size: int, scratch: Path):
    """A GRPOTrainer around `model` whose loss is configured like ours; it patches the model's forward with its
    fused LM head. `current_gradient_accumulation_steps` is what Trainer's loop sets before each step."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(output_dir=str(scratch), use_cpu=True, bf16=False, report_to="none", loss_type="dapo",
                      beta=0.0, epsilon=EPS_LOW, epsilon_high=EPS_HIGH, temperature=temperature,
                      per_device_train_batch_size=batch_size, num_generations=batch_size, disable_dropout=True)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["unused"] * batch_size}),
                          processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    return trainer


def trl_step(trainer, model: torch.nn.Module, passes: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    loss_sum = entropy_sum = 0.0
    for inputs in passes:
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        loss_sum += loss.item()
        # TRL logs each micro-batch's masked mean entropy; weight it back into the batch mean
        entropy_sum += trainer._metrics["train"]["entropy"][-1] * inputs["tool_mask"].sum()
    total = passes[0]["num_items_in_batch"]
    return {"loss": loss_sum, "entropy": float(entropy_sum / total), "passes": len(passes),
            "slots": sum(p["prompt_ids"].numel() + p["completion_ids"].numel() for p in passes)}


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def run_variant(variant: str, batch_file: Path, token_budget: int, repeats: int) -> dict[str, float]:
    data = json.loads(batch_file.read_text())
    model, tokenizer = load_policy(Path(data["policy"]))
    model.train()
    sequences = [TrainingSequence(**seq) for seq in data["sequences"]]
    old = [torch.tensor(values) for values in data["old_logprobs"]]
    temperature = data["temperature"]
    with tempfile.TemporaryDirectory() as scratch:
        if variant == "packed":
            def step() -> dict[str, float]:
                return packed_step(model, sequences, old, token_budget, tokenizer.pad_token_id, temperature)
        else:
            trainer = trl_trainer(model, tokenizer, temperature, len(sequences), Path(scratch))
            passes = trl_passes(sequences, old, tokenizer.pad_token_id, token_budget)

            def step() -> dict[str, float]:
                return trl_step(trainer, model, passes)

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        started = time.perf_counter()
        result = step()
        seconds = [time.perf_counter() - started]
        peak = _status_kib("VmHWM") - before
        for _ in range(repeats - 1):
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - started)
    tokens = sum(len(seq.input_ids) for seq in sequences)
    # the first step also pays one-time costs (allocator growth, kernel selection); time the others when there are
    timed = seconds[1:] or seconds
    return {**result, "tokens": tokens, "seconds": statistics.median(timed), "peak_mib": peak / 1024}


# --- the comparison (parent process) -----------------------------------------------------------------------------


def child(variant: str, batch_file: Path, token_budget: int, repeats: int, threads: int) -> dict[str, float]:
    command = [sys.executable, "-m", "bench.optimize", "--child", variant, "--batch", str(batch_file),
               "--token-budget", str(token_budget), "--repeats", str(repeats), "--threads", str(threads)]
    done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {variant} variant failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller batch, one round (< 1 min idle)")
    parser.add_argument("--token-budget", type=int, default=None,
                        help="token slots per forward pass on both sides; default: optimize.micro_batch_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see common.use_threads)")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    use_threads(args.threads)
    if args.child:
        print(json.dumps(run_variant(args.child, args.batch, args.token_budget, args.repeats)))
        return

    tasks, group_size = (2, 8) if args.quick else (6, 8)
    summaries = {name: compare(name, data, args) for name, data in batches(tasks, group_size, args.seed).items()}
    print(f"{load_note()}; torch threads {torch.get_num_threads()}")
    print(f"optimize_speedup_early: {summaries['early'][0]:.2f}")
    print(f"optimize_memory_ratio: {summaries['mixed'][1]:.2f}")
    print(f"optimize_speedup: {summaries['mixed'][0]:.2f}")


def compare(name: str, data: dict, args: argparse.Namespace) -> tuple[float, float]:
    """Run both variants on one batch, alternating over the rounds; (speedup, memory ratio) of packed over TRL."""
    rounds, repeats = (1, 2) if args.quick else (2, 3)
    lengths = [len(seq["input_ids"]) for seq in data["sequences"]]
    token_budget = args.token_budget or data["micro_batch_tokens"]
    print(f"{name} batch: {len(lengths)} episodes ({data['won']} won), {sum(lengths)} tokens, lengths "
          f"{min(lengths)}-{max(lengths)} (mean {statistics.mean(lengths):.0f}); token budget {token_budget}",
          flush=True)
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory() as scratch:
        batch_file = Path(scratch) / "batch.json"
        batch_file.write_text(json.dumps(data))
        for _ in range(rounds):
            for variant in VARIANTS:
                runs[variant].append(child(variant, batch_file, token_budget, repeats, args.threads))
    summary = {}
    for variant, results in runs.items():
        first = results[0]
        tokens_per_s = statistics.mean(r["tokens"] / r["seconds"] for r in results)
        peak = statistics.median(r["peak_mib"] for r in results)
        summary[variant] = (tokens_per_s, peak)
        print(f"  {variant:>6}: {tokens_per_s:6.0f} tokens/s, peak {peak:7.1f} MiB over the step; "
              f"{first['passes']:.0f} forward passes, {first['slots'] / first['tokens']:.2f} token slots per real "
              f"token, loss {first['loss']:.6f}, entropy {first['entropy']:.4f}", flush=True)
    ours, theirs = runs["packed"][0], runs["trl"][0]
    if abs(ours["loss"] - theirs["loss"]) > 1e-4 * max(1.0, abs(theirs["loss"])):
        raise SystemExit(f"the losses differ ({ours['loss']} vs {theirs['loss']}): the two sides do not compute the "
                         "same objective, so their speeds are not comparable")
    speedup = summary["packed"][0] / summary["trl"][0]
    memory = summary["packed"][1] / summary["trl"][1]
    print(f"  {name}: speedup {speedup:.2f}, memory ratio {memory:.2f}", flush=True)
    return speedup, memory


if __name__ == "__main__":
    main()
