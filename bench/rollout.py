"""Rollout throughput: the batched engine against a sequential per-episode `model.generate` loop.

Both play the same TextWorldExpress coin tasks (the tiny-cpu config's env, its sampling and episode rules) with
the same briefly warm-started checkpoint (see common.py for why not an untrained one), and both count generated
tokens over wall time including the game steps:

- batched: `play_episodes`, all episodes of a batch generating together with one KV cache kept across turns;
- sequential: one episode at a time, each turn a `model.generate` call on the whole history re-encoded (HF's
  cache lives only within the call), stopping at the `</action>` token, as a straightforward agent loop does.

The batched engine runs before and after the sequential loop and its two rates are averaged, so a change in the
machine's load during the run falls on both sides. The two loops sample differently, so their episodes differ;
the per-turn and per-episode token counts are printed to show the workloads match.

The work each side does is printed too (positions the model ran its layers on, per generated token): the
sequential loop re-encodes the history every turn, and that saved work is a ceiling on the speedup wherever both
sides run at the hardware's arithmetic limit, as on a CPU (see docs/benchmarks.md). `--widen 4 --layers 8` plays
the same episodes with a 25M-parameter copy of the policy, to see the ratio at a size where layers, not per-op
overhead, dominate.

    .venv/bin/python -m bench.rollout [--quick] [--threads N] [--widen FACTOR --layers N]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from bench.common import load_note, use_threads, warm_policy, widened
from dypo.stages.config import SamplingConfig
from dypo.stages.conversation import observation_ids, prompt_ids
from dypo.stages.environments import EnvPool, GameSession, get_family
from dypo.stages.episodes import episode_rules
from dypo.stages.generation import (
    INVALID_ACTION_OBSERVATION,
    INVALID_FORMAT_OBSERVATION,
    EpisodeRules,
    bounded_observation,
    play_episodes,
)
from dypo.stages.policy import stop_token_ids
from dypo.stages.trajectory import EpisodeSpec
from dypo.stages.turn_format import MalformedReason, parse_turn


@dataclass(frozen=True)
class Played:
    episodes: int
    turns: int
    generated_tokens: int
    malformed_turns: int
    fed_tokens: int  # positions the model ran its layers on: prompts and observations fed, and decode steps
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds

    def describe(self) -> str:
        return (f"{self.generated_tokens} tokens in {self.seconds:.1f} s = {self.tokens_per_s:.1f} tokens/s; "
                f"{self.turns / self.episodes:.2f} turns/episode, {self.generated_tokens / self.turns:.1f} "
                f"tokens/turn, {self.malformed_turns / self.turns:.0%} malformed, "
                f"{self.fed_tokens / self.generated_tokens:.1f} positions fed per generated token")


def batched(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, specs: list[EpisodeSpec], pool: EnvPool,
            sampling: SamplingConfig, rules: EpisodeRules, batch_episodes: int, seed: int) -> Played:
    started = time.perf_counter()
    records = play_episodes(model, tokenizer, specs, pool, sampling, rules, batch_episodes, seed)
    seconds = time.perf_counter() - started
    turns = [turn for record in records for turn in record.turns]
    generated = sum(len(t.generated_token_ids) for t in turns)
    # a turn's last token is fed with the next turn's context (so an episode's very last token never is);
    # a group's shared prompt counts once per episode here, although the engine encodes it once per batch
    fed = sum(len(t.context_token_ids) for t in turns) + generated - len(records)
    return Played(len(records), len(turns), generated, sum(t.malformed for t in turns), fed, seconds)


@torch.inference_mode()
def sequential(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, specs: list[EpisodeSpec],
               session: GameSession, sampling: SamplingConfig, rules: EpisodeRules, seed: int) -> Played:
    """The per-episode baseline, under the same rules as the engine: malformed turns send nothing (or the
    no-op) and the model reads the same feedback; episodes end when the game does, after max_turns turns, or
    when the next turn could overflow max_context_tokens."""
    torch.manual_seed(seed)
    stops = stop_token_ids(tokenizer)
    sample = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p} \
        if sampling.temperature > 0 else {"do_sample": False}
    started = time.perf_counter()
    turns = generated = malformed = fed = 0
    for spec in specs:
        observation, _ = bounded_observation(session.reset(spec.task), rules.max_observation_chars)
        context = prompt_ids(tokenizer, rules.system_prompt, observation)
        for _ in range(rules.max_turns):
            if len(context) + sampling.max_new_tokens > rules.max_context_tokens:
                break
            input_ids = torch.tensor([context])
            output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=sampling.max_new_tokens, eos_token_id=stops,
                                    pad_token_id=tokenizer.pad_token_id, **sample)
            tokens = output[0, len(context):].tolist()
            turns, generated = turns + 1, generated + len(tokens)
            fed += len(context) + len(tokens) - 1  # the whole history again, then one step per new token but the last
            text = tokenizer.decode(tokens, skip_special_tokens=False)
            admissible = session.admissible_commands() if rules.check_admissible else None
            parsed = parse_turn(text, budget_exhausted=tokens[-1] not in stops, admissible=admissible)
            malformed += parsed.malformed
            if not parsed.malformed:
                result = session.step(parsed.action)
                feedback, done = result.observation, result.done
            else:
                feedback = (INVALID_ACTION_OBSERVATION if parsed.reason == MalformedReason.NOT_ADMISSIBLE
                            else INVALID_FORMAT_OBSERVATION)
                done = False
                if rules.noop_action is not None:
                    result = session.step(rules.noop_action)
                    feedback, done = f"{feedback}\n{result.observation}", result.done
            if done:
                break
            observation, _ = bounded_observation(feedback, rules.max_observation_chars)
            context = context + tokens + observation_ids(tokenizer, observation)
    return Played(len(specs), turns, generated, malformed, fed, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer episodes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (see common.use_threads)")
    parser.add_argument("--widen", type=int, default=1, metavar="FACTOR",
                        help="play with the warm policy widened FACTOR times (same episodes, see common.widened)")
    parser.add_argument("--layers", type=int, default=None, help="with --widen: layers of the widened policy")
    args = parser.parse_args()
    use_threads(args.threads)
    hf_logging.set_verbosity_error()  # generate() warns about generation-config defaults on every call
    tasks, group_size = (4, 2) if args.quick else (8, 4)
    policy = warm_policy(args.seed)
    config = policy.config
    rules = episode_rules(config)
    sampling = config.rollout.sampling
    batch_episodes = min(config.rollout.batch_episodes, tasks * group_size)
    specs = [EpisodeSpec(task, f"g{index}", f"g{index}-e{member}")
             for index, task in enumerate(get_family(config.env).make_tasks("train", tasks, start=500))
             for member in range(group_size)]
    print(f"{len(specs)} episodes of {config.env.family} ({tasks} tasks x {group_size}), policy {policy.directory}, "
          f"sampling T={sampling.temperature} top_p={sampling.top_p} max_new_tokens={sampling.max_new_tokens}, "
          f"max_turns={rules.max_turns}, batch_episodes={batch_episodes}", flush=True)
    model, tokenizer = policy.model, policy.tokenizer
    if args.widen > 1 or args.layers is not None:
        model = widened(model, args.widen, args.layers or model.config.num_hidden_layers)
    print(f"policy of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
    with EnvPool(config.env, batch_episodes) as pool:
        pool.sessions(batch_episodes)  # start every game worker (a JVM each) before the clocks run
        # warm-up: every game worker's JVM plays an episode (the sequential loop's worker then has too) and the
        # allocator grows to a full batch once, as it does on a rollout stage's first batch of many
        batched(model, tokenizer, specs[:batch_episodes], pool, sampling, rules, batch_episodes, args.seed)
        before = batched(model, tokenizer, specs, pool, sampling, rules, batch_episodes, args.seed)
        print(f"batched engine (1st run):  {before.describe()}", flush=True)
        one_by_one = sequential(model, tokenizer, specs, pool.sessions(1)[0], sampling, rules, args.seed)
        print(f"sequential generate loop:  {one_by_one.describe()}", flush=True)
        after = batched(model, tokenizer, specs, pool, sampling, rules, batch_episodes, args.seed)
        print(f"batched engine (2nd run):  {after.describe()}", flush=True)
    speedup = (before.tokens_per_s + after.tokens_per_s) / 2 / one_by_one.tokens_per_s
    work = (one_by_one.fed_tokens / one_by_one.generated_tokens) / (after.fed_tokens / after.generated_tokens)
    print(f"work the KV cache saves: the sequential loop feeds {work:.1f}x the positions per generated token")
    print(f"{load_note()}; torch threads {torch.get_num_threads()}")
    print(f"rollout_speedup: {speedup:.2f}")


if __name__ == "__main__":
    main()
