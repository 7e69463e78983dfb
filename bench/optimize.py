"""The optimize stage's loss step, packed, against TRL's GRPO loss, on the same batch and the same model.

The batch is real: episodes the briefly warm-started tiny-cpu policy (common.py) plays on TextWorldExpress coin
with the config's sampling and rules, as one sequence per episode with observations masked and group-relative
advantages from their returns. `log pi_old` is the policy's own log-prob plus seeded noise (sigma 0.3) on every
token, so ratios spread and clip as in a later PPO epoch, and the loss depends on the log-probs each side
computes; the two losses and entropy means must agree, which checks that both compute the same objective.

- packed (ours): `pack_sequences` into rows of `--token-budget` tokens, `packed_token_logprobs` with entropy,
  `dypo_loss`, backward.
- TRL: a `GRPOTrainer` (trl 1.16) built around the same model, `loss_type="dapo"` (the token-level mean over the
  batch, as ours), the same clip range and temperature, no KL; the batch in the layout its
  `_generate_and_score_completions` produces (prompt = the first turn's context, left-padded; completion = the
  rest of the episode, right-padded, with `tool_mask` 0 on observation tokens, TRL's multi-turn masking) and
  then `trainer.compute_loss(model, inputs)` and backward. That is TRL's whole loss path: its fused, chunked
  LM head for log-probs and entropies (no full logits), its clipped surrogate and its metrics. Not measured on
  either side: generation, rewards and the optimizer step.

Throughput is real (non-padding) tokens of the batch per second of loss step; both sides score the same tokens.
Peak memory: torch's CPU allocations go through malloc, where tracemalloc does not see them, so each variant runs
in a fresh process that reads its resident set from /proc: after setup (model, trainer, batch tensors) it returns
free heap to the OS, notes its RSS, resets the kernel's high-water mark (/proc/self/clear_refs) and runs the first
loss step; the step's peak is the high-water mark minus that RSS. This counts everything the step allocates
(activations, logits, attention masks, gradients) and nothing that imports or setup left behind. Variants
alternate over `--rounds`, so a change in the machine's load falls on both.

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
from dypo.stages.dypo_loss import dypo_loss, group_advantages, token_logprobs
from dypo.stages.environments import EnvPool, get_family
from dypo.stages.episodes import episode_return, episode_rules
from dypo.stages.generation import play_episodes
from dypo.stages.packing import pack_sequences, packed_token_logprobs
from dypo.stages.policy import load_policy
from dypo.stages.sequences import TrainingSequence, TurnTokens, episode_sequence
from dypo.stages.trajectory import EpisodeSpec

EPS_LOW, EPS_HIGH = 0.2, 0.28
OLD_LOGPROB_NOISE = 0.3
VARIANTS = ("packed", "trl")


# --- the batch (parent process) ----------------------------------------------------------------------------------


def rollout_batch(tasks: int, group_size: int, seed: int) -> dict:
    """Episodes of the warm policy as training sequences with advantages and noisy old log-probs, as JSON data."""
    policy = warm_policy(seed)
    config = policy.config
    specs = [EpisodeSpec(task, f"g{index}", f"g{index}-e{member}")
             for index, task in enumerate(get_family(config.env).make_tasks("train", tasks, start=700))
             for member in range(group_size)]
    batch_episodes = min(config.rollout.batch_episodes, len(specs))
    with EnvPool(config.env, batch_episodes) as pool:
        records = play_episodes(policy.model, policy.tokenizer, specs, pool, config.rollout.sampling,
                                episode_rules(config), batch_episodes, seed)
    advantages = group_advantages([episode_return(r, config.rollout) for r in records],
                                  [r.spec.group_id for r in records], std_normalize=True, eps=1e-6)
    sequences = [TrainingSequence(*episode_sequence([TurnTokens(t.context_token_ids, t.generated_token_ids)
                                                     for t in record.turns]), advantage)
                 for record, advantage in zip(records, advantages, strict=True)]
    temperature = config.rollout.sampling.temperature or 1.0
    generator = torch.Generator().manual_seed(seed)
    old = []
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq.input_ids])
            logp, _ = token_logprobs(policy.model, ids, torch.ones_like(ids), temperature=temperature)
            old.append((logp[0] + OLD_LOGPROB_NOISE * torch.randn(len(seq.input_ids), generator=generator)).tolist())
    return {"policy": str(policy.directory), "temperature": temperature, "won": sum(r.won for r in records),
            "sequences": [{"input_ids": s.input_ids, "loss_mask": s.loss_mask, "advantage": s.advantage}
                          for s in sequences], "old_logprobs": old}


# --- the two loss steps (child process) --------------------------------------------------------------------------


def packed_step(model: torch.nn.Module, sequences: list[TrainingSequence], old: list[torch.Tensor],
                token_budget: int, pad_id: int, temperature: float) -> dict[str, float]:
    packed = pack_sequences(sequences, token_budget, pad_id)
    total = packed.num_loss_tokens
    logp, entropy = packed_token_logprobs(model, packed, temperature, with_entropy=True)
    loss, _ = dypo_loss(logp, packed.place(old), packed.advantages, packed.loss_mask, EPS_LOW, EPS_HIGH, total)
    loss.backward()
    return {"loss": loss.item(), "entropy": (entropy * packed.loss_mask).sum().item() / total,
            "rows": packed.input_ids.shape[0], "width": packed.input_ids.shape[1]}


def trl_inputs(sequences: list[TrainingSequence], old: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """The batch as GRPOTrainer's generation step lays it out: prompt left-padded, completion right-padded."""
    from trl.trainer.utils import pad

    prompts, completions, tool_masks, old_completion = [], [], [], []
    for seq, logp in zip(sequences, old, strict=True):
        start = seq.loss_mask.index(1)  # the prompt is the first turn's context: everything before the first turn
        prompts.append(torch.tensor(seq.input_ids[:start]))
        completions.append(torch.tensor(seq.input_ids[start:]))
        tool_masks.append(torch.tensor(seq.loss_mask[start:]))
        old_completion.append(logp[start:])
    ones = [torch.ones_like(ids) for ids in prompts], [torch.ones_like(ids) for ids in completions]
    tool_mask = pad(tool_masks, padding_value=0, padding_side="right")
    return {
        "prompt_ids": pad(prompts, padding_value=pad_id, padding_side="left"),
        "prompt_mask": pad(ones[0], padding_value=0, padding_side="left"),
        "completion_ids": pad(completions, padding_value=pad_id, padding_side="right"),
        "completion_mask": pad(ones[1], padding_value=0, padding_side="right"),
        "tool_mask": tool_mask,
        "advantages": torch.tensor([seq.advantage for seq in sequences]),
        "old_per_token_logps": pad(old_completion, padding_value=0.0, padding_side="right"),
        "num_items_in_batch": tool_mask.sum(),
    }


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
            inputs = trl_inputs(sequences, old, tokenizer.pad_token_id)

            def step() -> dict[str, float]:
                loss = trainer.compute_loss(model, inputs)
                loss.backward()
                return {"loss": loss.item(), "entropy": trainer._metrics["train"]["entropy"][-1],
                        "rows": inputs["prompt_ids"].shape[0],
                        "width": inputs["prompt_ids"].shape[1] + inputs["completion_ids"].shape[1]}

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
                        help="tokens per packed row; default: the longest episode of the batch")
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

    tasks, group_size, rounds, repeats = (2, 8, 1, 2) if args.quick else (6, 8, 2, 3)
    data = rollout_batch(tasks, group_size, args.seed)
    lengths = [len(seq["input_ids"]) for seq in data["sequences"]]
    token_budget = args.token_budget or max(lengths)
    print(f"batch: {len(lengths)} episodes ({data['won']} won), {sum(lengths)} tokens, lengths {min(lengths)}-"
          f"{max(lengths)} (mean {statistics.mean(lengths):.0f}); token budget {token_budget}", flush=True)
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
        slots = first["rows"] * first["width"] / first["tokens"]
        print(f"{variant:>6}: {tokens_per_s:8.0f} tokens/s, peak {peak:7.1f} MiB over the step; "
              f"[{first['rows']:.0f} x {first['width']:.0f}] tensors ({slots:.2f} slots per real token), "
              f"loss {first['loss']:.6f}, entropy {first['entropy']:.4f}", flush=True)
    ours, theirs = runs["packed"][0], runs["trl"][0]
    if abs(ours["loss"] - theirs["loss"]) > 1e-4 * max(1.0, abs(theirs["loss"])):
        raise SystemExit(f"the losses differ ({ours['loss']} vs {theirs['loss']}): the two sides do not compute the "
                         "same objective, so their speeds are not comparable")
    print(f"{load_note()}; torch threads {torch.get_num_threads()}")
    print(f"optimize_memory_ratio: {summary['packed'][1] / summary['trl'][1]:.2f}")
    print(f"optimize_speedup: {summary['packed'][0] / summary['trl'][0]:.2f}")


if __name__ == "__main__":
    main()
