"""Game sessions in worker processes, so a crashing or hanging game loses its episode, not the rollout (§5).

Every session the pool hands out is a proxy to its own worker process. The worker is started with the spawn
method (a fresh interpreter: no copy of the parent's model, threads or locks, and no torch import), opens one
session of the family and answers the proxy's requests over a pipe. The proxy bounds every answer by a time
limit (`env.reset_timeout_s`, `env.step_timeout_s`):

- no answer in time: the worker is killed with everything it started, and the call raises `EnvTimeout`;
- the worker died (a segfault, the OOM killer) or its game raised: the call raises `EnvError` with the reason.

Either way the session is broken from then on, and the pool's next `sessions()` call replaces it; the other
sessions, each in its own process, carry on. The rollout engine records the episode as lost (`env_timeout` /
`env_error`) and plays the rest of the batch.

A worker runs in its own process group, so killing the group also kills what the game engine started (TWX's JVM,
a ScienceWorld server) instead of leaving it orphaned; and Ctrl-C in a terminal reaches only the parent, which
then closes the pool. A worker whose parent vanishes sees its pipe close and exits after closing its game.
Workers start in waves of a few (see `_START_WAVE`) and are reused across batches until `close()`.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

from dypo.stages.config import EnvConfig
from dypo.stages.environments.families import family_class
from dypo.stages.environments.protocol import EnvError, EnvFamily, EnvTimeout, ExpertTurn, GameSession, StepResult
from dypo.stages.trajectory import Task

_SPAWN = multiprocessing.get_context("spawn")
# Starting a worker is a fresh interpreter and its imports (seconds on a loaded machine), then opening the game,
# which is allowed a reset's time limit on top of this.
_START_ALLOWANCE_S = 60.0
# Workers start in waves of this many: each start costs a second or two of CPU (an interpreter, a JVM for TWX), and
# 32 starting at once on 2 busy cores left the first ones past their allowance while the last still competed.
_START_WAVE = 8
_EXIT_TIMEOUT_S = 10.0  # a worker asked to close gets this long to close its game and exit before it is killed
# An expert episode is one call into the worker: it may take a reset plus this many steps' time limits.
_EXPERT_STEP_ALLOWANCE = 200


# --- The worker process ------------------------------------------------------------------------------------------


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _reset(family: EnvFamily, session: GameSession, task: Task) -> tuple[str, list[str] | None]:
    observation = session.reset(task)
    return observation, session.admissible_commands()


def _step(family: EnvFamily, session: GameSession, action: str) -> tuple[StepResult, list[str] | None]:
    result = session.step(action)
    return result, None if result.done else session.admissible_commands()


def _expert(family: EnvFamily, session: GameSession, task: Task) -> list[ExpertTurn]:
    return family.expert_turns(task, session)


_REQUESTS: dict[str, Callable[[EnvFamily, GameSession, Any], Any]] = {
    "reset": _reset, "step": _step, "expert": _expert,
}


def _serve(family_type: type[EnvFamily], env: EnvConfig, conn: Connection) -> None:
    """The worker's main: open one session, then answer requests until asked to close or the parent is gone.

    The first message says whether the game opened: ("ok", None), or ("failed", (text, whether the family
    refused the config)). Answers are ("ok", payload) or ("error", text); reset and step answers carry the
    admissible commands too, which saves the proxy a round trip per turn.
    """
    os.setpgrp()  # first, before the engine starts children: a kill of this group then reaches them too
    try:
        family = family_type(env)
        session = family.open_session()
    except Exception as error:
        conn.send(("failed", (_describe(error), isinstance(error, ValueError))))
        return
    conn.send(("ok", None))
    try:
        while True:
            try:
                request, argument = conn.recv()
            except EOFError:  # the parent is gone
                return
            if request == "close":
                return
            try:
                conn.send(("ok", _REQUESTS[request](family, session, argument)))
            except Exception as error:
                conn.send(("error", _describe(error)))
    finally:
        session.close()


# --- The proxy ---------------------------------------------------------------------------------------------------


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


class WorkerSession:
    """A GameSession whose game runs in a worker process; any failure breaks it, and the pool then replaces it.

    One thread at a time may use a session (the rollout engine gives each its own); a lock makes a second
    caller wait instead of interleaving messages.
    """

    def __init__(self, family_type: type[EnvFamily], env: EnvConfig) -> None:
        self.env = env
        self.broken = False
        self._conn, child = _SPAWN.Pipe()
        self._process = _SPAWN.Process(target=_serve, args=(family_type, env, child), daemon=True,
                                       name=f"dypo-env-{env.family}")
        self._process.start()
        child.close()  # the worker holds the other end; with ours closed, its death reads as EOF here
        self._lock = threading.Lock()
        self._task: Task | None = None
        self._admissible: list[str] | None = None
        self._grouped = False  # the worker has answered, so it runs in its own process group
        self._closed = False

    @property
    def pid(self) -> int:
        """The worker's process id (its process group id too)."""
        return self._process.pid

    def __repr__(self) -> str:
        return f"{self.env.family} worker (pid {self.pid})"

    def wait_started(self) -> None:
        """Wait until the worker's game is open (it has `env.reset_timeout_s` plus time to start Python).

        A game that refuses the config (a ValueError, e.g. TWX's room limit) raises ValueError, since every
        episode would fail the same way; any other failure raises EnvError.
        """
        with self._lock:
            status, payload = self._receive(_START_ALLOWANCE_S + self.env.reset_timeout_s, "start")
            if status == "failed":
                text, config_refused = payload
                self._stop()
                if config_refused:
                    raise ValueError(f"{self} could not start: {text}")
                raise EnvError(f"{self} could not start its game: {text}")

    def reset(self, task: Task) -> str:
        self._task = task
        observation, self._admissible = self._call("reset", task, self.env.reset_timeout_s, f"reset of {task.task_id}")
        return observation

    def step(self, action: str) -> StepResult:
        task = self._task.task_id if self._task else "no task"
        result, self._admissible = self._call("step", action, self.env.step_timeout_s, f"step {action!r} in {task}")
        return result

    def admissible_commands(self) -> list[str] | None:
        return self._admissible

    def expert_turns(self, task: Task) -> list[ExpertTurn]:
        """The family's expert episode of `task`, played inside the worker."""
        self._task, self._admissible = task, None
        limit = self.env.reset_timeout_s + _EXPERT_STEP_ALLOWANCE * self.env.step_timeout_s
        return self._call("expert", task, limit, f"expert episode of {task.task_id}")

    def _call(self, request: str, argument: Any, timeout: float, what: str) -> Any:
        with self._lock:
            if self.broken or self._closed:
                raise EnvError(f"{self} is {'closed' if self._closed else 'broken'}; get a fresh session from the pool")
            try:
                self._conn.send((request, argument))
            except OSError:
                raise self._died(what) from None
            return self._answer(timeout, what)

    def _receive(self, timeout: float, what: str) -> tuple[str, Any]:
        """The worker's next message; a worker that does not send one in time is killed, one that died reaped."""
        if not self._conn.poll(timeout):
            self._stop()
            raise EnvTimeout(f"{self} did not answer the {what} within {timeout:g} s; it was killed")
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            raise self._died(what) from None
        self._grouped = True
        return message

    def _answer(self, timeout: float, what: str) -> Any:
        status, payload = self._receive(timeout, what)
        if status == "error":
            self.broken = True
            raise EnvError(f"{self} failed during the {what}: {payload}")
        return payload

    def _died(self, what: str) -> EnvError:
        self._stop()
        return EnvError(f"{self} died during the {what} ({_exit_reason(self._process.exitcode)})")

    def _stop(self) -> None:
        """Kill the worker's process group (the worker and what it started), and reap the worker.

        The group outlives a worker that died while a child of its (a JVM) still runs, and its id cannot be
        reused while that child lives, so the group is signalled even after the worker is gone.
        """
        self.broken = True
        with contextlib.suppress(ProcessLookupError):
            if self._grouped or os.getpgid(self.pid) == self.pid:
                os.killpg(self.pid, signal.SIGKILL)
            else:  # killed before it made its own group, hence before it started anything
                os.kill(self.pid, signal.SIGKILL)
        self._process.join()

    def request_close(self) -> None:
        """Ask the worker to close its game and exit, without waiting (the pool closes its workers together)."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):  # the worker is already gone
                    self._conn.send(("close", None))

    def close(self) -> None:
        """Let the worker close its game and exit; then kill whatever of its group is left (all of it, if late)."""
        self.request_close()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._process.join(_EXIT_TIMEOUT_S)
            self._stop()
            self._conn.close()


# --- The pool -----------------------------------------------------------------------------------------------------


class EnvPool:
    """Up to `size` worker sessions of the configured family, started on first use and reused until close()."""

    def __init__(self, env: EnvConfig, size: int) -> None:
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        self.env = env
        self.size = size
        self._family_type = family_class(env.family)
        self._family_type(env)  # the family checks its options here, before any worker starts
        self._sessions: list[WorkerSession] = []
        self._closed = False

    def sessions(self, n: int) -> list[WorkerSession]:
        """`n` live sessions, the same ones call after call; broken ones are replaced, new ones start in waves."""
        if self._closed:
            raise RuntimeError("the pool is closed")
        if not 0 <= n <= self.size:
            raise ValueError(f"asked for {n} sessions from a pool of size {self.size}")
        missing = [index for index in range(n) if index >= len(self._sessions) or self._sessions[index].broken]
        for wave in range(0, len(missing), _START_WAVE):
            fresh, failures = [], []
            for index in missing[wave:wave + _START_WAVE]:
                session = WorkerSession(self._family_type, self.env)
                if index < len(self._sessions):
                    self._sessions[index].close()
                    self._sessions[index] = session
                else:
                    self._sessions.append(session)
                fresh.append(session)
            for session in fresh:
                try:
                    session.wait_started()
                except (ValueError, EnvError) as error:
                    failures.append(error)
            if failures:
                raise failures[0]
        return list(self._sessions[:n])

    def expert_episodes(self, tasks: Sequence[Task]) -> list[list[ExpertTurn]]:
        """The family's expert episode of every task, in task order, played in up to `size` workers at once."""
        if not tasks:
            return []
        sessions = self.sessions(min(self.size, len(tasks)))
        episodes: list[list[ExpertTurn]] = [[] for _ in tasks]

        def play(worker: int) -> None:
            for index in range(worker, len(tasks), len(sessions)):
                episodes[index] = sessions[worker].expert_turns(tasks[index])

        with ThreadPoolExecutor(len(sessions), thread_name_prefix="expert") as threads:
            list(threads.map(play, range(len(sessions))))
        return episodes

    def close(self) -> None:
        """Stop every worker and what it started; the workers shut down concurrently."""
        for session in self._sessions:
            session.request_close()
        for session in self._sessions:
            session.close()
        self._sessions.clear()
        self._closed = True

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
