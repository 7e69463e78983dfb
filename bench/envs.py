"""Environment throughput, and the share of rollout wall time the environment takes.

1. Steps per second of every available env family under random admissible play, side by side: a session in this
   process (no worker: the engine's own speed), one worker process, two worker processes driven by one thread
   each (as the rollout engine drives them). The gap between the first two is the pool's price per step.
2. On the default config (configs/tiny-cpu.yaml), the share of `play_episodes` wall time spent inside env calls
   (reset and step, overlapping calls counted once) versus everything else, which is generation. The policy has
   the default shape, untrained, with turns made to cost what trained turns cost (see `rollout_env_share`).

Run: `.venv/bin/python -m bench.envs [--quick]`; the last line is `env_step_share: 0.xx`.

The env workers are spawned processes that re-import this script as their main module, so everything that
imports torch is imported inside the functions below, never at the top: the workers stay free of it.
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from dypo.stages.config import EnvConfig
from dypo.stages.environments import EnvPool, GameSession, Status, StepResult, get_family
from dypo.stages.environments.families import FAMILIES, family_availability
from dypo.stages.trajectory import Task

EPISODE_STEPS = 20  # a random episode is cut here, as max_turns would cut it
T = TypeVar("T")


def random_play(session: GameSession, tasks: Sequence[Task], noop: str, seconds: float, seed: int) -> int:
    """Random admissible play through `tasks` (cycling) for `seconds`; returns the number of steps taken.

    A game that lists no admissible commands gets its no-op command."""
    rng = random.Random(seed)
    steps, deadline, index = 0, time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline:
        session.reset(tasks[index % len(tasks)])
        index += 1
        for _ in range(EPISODE_STEPS):
            commands = session.admissible_commands() or [noop]
            steps += 1
            if session.step(rng.choice(commands)).done:
                break
    return steps


def measure(sessions: Sequence[GameSession], tasks: Sequence[Task], noop: str, seconds: float) -> float:
    """Steps/s of random play in all `sessions` at once, one thread each (as the rollout engine drives them).

    The time includes the resets between episodes, as a rollout's does."""
    counts = [0] * len(sessions)
    started = time.perf_counter()

    def run(index: int) -> None:
        counts[index] = random_play(sessions[index], tasks, noop, seconds, seed=index)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(sessions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def family_throughput(env: EnvConfig, seconds: float) -> dict[str, float]:
    """Steps/s in this process, in one worker and in two workers, each after a warm-up of half the measuring
    time (a JVM compiles the game's code as it goes)."""
    family = get_family(env)
    tasks = family.make_tasks("train", 50)
    session = family.open_session()
    try:
        measure([session], tasks, family.noop_action, seconds / 2)
        in_process = measure([session], tasks, family.noop_action, seconds)
    finally:
        session.close()
    with EnvPool(env, 2) as pool:
        started = time.perf_counter()
        workers = pool.sessions(2)
        start_s = time.perf_counter() - started
        measure(workers, tasks, family.noop_action, seconds / 2)
        one = measure(workers[:1], tasks, family.noop_action, seconds)
        two = measure(workers, tasks, family.noop_action, seconds)
    return {"in_process": in_process, "one": one, "two": two, "start_s": start_s}


class TimedSession:
    """A session that records the wall-clock interval of every reset and step it forwards."""

    def __init__(self, session: GameSession, intervals: list[tuple[float, float]]) -> None:
        self.session, self.intervals = session, intervals

    def _timed(self, call: Callable[..., T], *args: object) -> T:
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.intervals.append((started, time.perf_counter()))

    def reset(self, task: Task) -> str:
        return self._timed(self.session.reset, task)

    def step(self, action: str) -> StepResult:
        return self._timed(self.session.step, action)

    def admissible_commands(self) -> list[str] | None:
        return self.session.admissible_commands()

    def close(self) -> None:
        self.session.close()


class TimedPool:
    """The rollout engine's view of an EnvPool, with every env call timed."""

    def __init__(self, pool: EnvPool) -> None:
        self.pool = pool
        self.intervals: list[tuple[float, float]] = []

    def sessions(self, n: int) -> list[TimedSession]:
        return [TimedSession(session, self.intervals) for session in self.pool.sessions(n)]


def covered(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of the intervals (calls of concurrent sessions overlap)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def rollout_env_share(batch_episodes: int, groups: int, expert_tasks: int) -> dict[str, float]:
    """Play `groups` groups of the default config; time the env calls against the rest of the wall time.

    The policy has the default shape, randomly initialised, with a tokenizer trained on expert games as the
    warmstart trains it. Two settings make its turns cost what a trained policy's turns cost, because an
    untrained policy would otherwise never reach the game (every turn malformed, nothing sent): each turn
    generates as many tokens as an expert turn has on average, and each (malformed) turn sends the family's
    no-op command to the game, so every turn is one game step, as a well-formed turn would be.
    """
    from dataclasses import replace
    from statistics import mean

    from bench.common import CONFIG
    from dypo.stages.config import load_config
    from dypo.stages.conversation import turn_ids
    from dypo.stages.episodes import episode_rules, system_prompt
    from dypo.stages.generation import play_episodes
    from dypo.stages.policy import build_model, train_tokenizer
    from dypo.stages.trajectory import EpisodeSpec
    from dypo.stages.warmstart import corpus

    config = load_config(CONFIG)
    family = get_family(config.env)
    tasks = family.make_tasks("train", groups, start=expert_tasks)
    specs = [EpisodeSpec(task, task.task_id, f"{task.task_id}-e{k}")
             for task in tasks for k in range(config.rollout.group_size)]
    with EnvPool(config.env, min(batch_episodes, len(specs))) as pool:
        games = pool.expert_episodes(family.make_tasks("train", expert_tasks))
        tokenizer = train_tokenizer(corpus(system_prompt(config.env), games), config.model.vocab_size)
        model = build_model(tokenizer, config.model, seed=0)
        turn_tokens = round(mean(len(turn_ids(tokenizer, turn.think, turn.action)) for turns in games
                                 for turn in turns))
        sampling = config.rollout.sampling.model_copy(update={"max_new_tokens": turn_tokens})
        rules = replace(episode_rules(config), noop_action=family.noop_action)
        timed = TimedPool(pool)
        pool.sessions(pool.size)  # started before the clock: a rollout stage starts them once for all its batches
        started = time.perf_counter()
        records = play_episodes(model, tokenizer, specs, timed, sampling, rules, batch_episodes, seed=0)
        wall = time.perf_counter() - started
    env_s = covered(timed.intervals)
    return {"episodes": len(records), "turns": sum(len(record.turns) for record in records), "wall_s": wall,
            "env_calls": len(timed.intervals), "env_s": env_s, "other_s": wall - env_s, "share": env_s / wall,
            "turn_tokens": turn_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short measurements, smaller rollout (under a minute)")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else 5.0
    from bench.common import load_note  # imports torch, so not at the top (see above)

    print(load_note())

    print(f"{'family':18} {'in-process':>12} {'1 worker':>12} {'2 workers':>12} {'1w/in-proc':>11} "
          f"{'2w/1w':>7} {'start 2w':>9}   (random admissible steps/s)")
    for name in FAMILIES:
        env = EnvConfig(family=name)
        if family_availability(name, env).status != Status.AVAILABLE:
            print(f"{name:18} skipped: {family_availability(name, env).status}")
            continue
        rates = family_throughput(env, seconds)
        print(f"{name:18} {rates['in_process']:12.0f} {rates['one']:12.0f} {rates['two']:12.0f} "
              f"{rates['one'] / rates['in_process']:11.2f} {rates['two'] / rates['one']:7.2f} "
              f"{rates['start_s']:8.1f}s")

    batch, groups, expert_tasks = (8, 2, 50) if args.quick else (32, 8, 200)
    result = rollout_env_share(batch, groups, expert_tasks)
    print(f"\nrollout on configs/tiny-cpu.yaml: batch {batch}, {result['episodes']} episodes, {result['turns']} "
          f"turns of {result['turn_tokens']} generated tokens, {result['env_calls']} env calls; {load_note()}")
    print(f"wall {result['wall_s']:.2f} s = env calls {result['env_s']:.2f} s + generation and the rest "
          f"{result['other_s']:.2f} s")
    print(f"env_step_share: {result['share']:.2f}")


if __name__ == "__main__":
    main()
