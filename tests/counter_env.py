"""A test-only environment family whose games fail on purpose, for the worker-pool tests.

The game: count up to 3 by sending "up" ("down" counts down, "wait" does nothing); reaching 3 wins. A task's type
says how its engine misbehaves, so a test injects a fault by choosing the task, and the fault happens for real
inside the worker process:

- "ok": plays normally;
- "crash": the worker kills itself (SIGKILL) at the second step, as a segfaulting engine would;
- "raise": the engine raises at the second step;
- "hang": the engine sleeps at the second step, as a deadlocked engine would;
- "hang_reset": the engine sleeps in reset.

Opening a session fails as the environment variable OPEN_FAULT says ("raise", "refuse": a ValueError, "hang");
it is set by a test before the pool starts its workers, which inherit it.

Every session starts a child process (a `sleep`) standing in for an engine's server process (TWX's JVM), so the
tests can check that a killed worker takes its children with it. The action "report" answers with facts about
the worker process (its pid, its engine child's pid, whether torch is imported).

The pool tests register this family under the name below in `families.FAMILIES`; it is not a real family.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from dypo.stages.environments.protocol import (
    TRAIN,
    Availability,
    EnvFamily,
    ExpertTurn,
    GameSession,
    Status,
    StepResult,
    format_prompt,
)
from dypo.stages.trajectory import Task

NAME = "test-counter"
GOAL = 3
OPEN_FAULT = "COUNTER_ENV_OPEN_FAULT"


def task(fault: str, index: int = 0) -> Task:
    """The `index`-th task whose engine shows `fault`."""
    return Task(task_id=f"{NAME}/{TRAIN}/{fault}-{index}", family=NAME, task_type=fault, split=TRAIN, seed=index)


class CounterSession:
    def __init__(self) -> None:
        fault = os.environ.get(OPEN_FAULT, "")
        if fault == "raise":
            raise RuntimeError("the counter engine failed to start")
        if fault == "refuse":
            raise ValueError("the counter engine refuses this config")
        if fault == "hang":
            time.sleep(3600)
        self.engine = subprocess.Popen(["sleep", "3600"])
        self.task: Task | None = None
        self.count = 0
        self.steps = 0

    def reset(self, task: Task) -> str:
        if task.task_type == "hang_reset":
            time.sleep(3600)
        self.task, self.count, self.steps = task, 0, 0
        return f"Count to {GOAL}. The counter is at 0."

    def step(self, action: str) -> StepResult:
        assert self.task is not None
        self.steps += 1
        if action == "report":
            facts = f"pid={os.getpid()} engine={self.engine.pid} torch={'torch' in sys.modules}"
            return StepResult(facts, 0.0, False, False, self.count / GOAL)
        if self.steps == 2:
            fault = self.task.task_type
            if fault == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            if fault == "raise":
                raise RuntimeError("the counter engine threw")
            if fault == "hang":
                time.sleep(3600)
        before = self.count
        self.count += {"up": 1, "down": -1}.get(action, 0)
        won = self.count >= GOAL
        return StepResult(f"The counter is at {self.count}.", (self.count - before) / GOAL, won, won,
                          self.count / GOAL)

    def admissible_commands(self) -> list[str]:
        return ["down", "up", "wait"]

    def close(self) -> None:
        self.engine.kill()
        self.engine.wait()


class CounterFamily(EnvFamily):
    name = NAME
    description = "test-only counting game with injectable faults"
    default_system_prompt = format_prompt("Count up to three.")
    has_expert = True
    noop_action = "wait"

    @classmethod
    def availability(cls, env: object) -> Availability:
        return Availability(Status.NEEDS_DATA, "a test family with no data", "nothing to enable")

    def task_count(self, split: str) -> int:
        return 1000

    def make_tasks(self, split: str, count: int, start: int = 0) -> list[Task]:
        self.check_split(split, count, start)
        return [task("ok", index) for index in range(start, start + count)]

    def open_session(self) -> GameSession:
        return CounterSession()

    def expert_turns(self, task: Task, session: GameSession) -> list[ExpertTurn]:
        observation = session.reset(task)
        turns = []
        for count in range(GOAL):
            turns.append(ExpertTurn(observation, f"The counter is at {count}, below {GOAL}.", "up"))
            observation = session.step("up").observation
        return turns
