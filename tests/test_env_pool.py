"""The worker pool: sessions in worker processes whose engines really crash, raise and hang.

The faults come from a test-only family (tests/counter_env.py) registered here; its engines misbehave inside the
worker processes, exactly where a real engine would. The TextWorldExpress side of the pool (JVMs left behind or
not) is tested in test_env_twx.py.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import counter_env
import pytest

from dypo.stages.config import EnvConfig, ModelConfig, SamplingConfig
from dypo.stages.environments import EnvError, EnvPool, EnvTimeout
from dypo.stages.environments import pool as pool_module
from dypo.stages.environments.families import FAMILIES
from dypo.stages.environments.pool import WorkerSession
from dypo.stages.generation import EpisodeRules, play_episodes
from dypo.stages.policy import build_model, train_tokenizer
from dypo.stages.trajectory import EpisodeSpec

TIMEOUT_S = 1.0
# A timed-out call returns once the worker's group is killed and reaped: well under this on a loaded machine.
TIMEOUT_TOLERANCE_S = 1.5


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def gone(*pids: int, within: float = 5.0) -> bool:
    """Whether all the processes end within a few seconds (a killed process dies when next scheduled)."""
    deadline = time.monotonic() + within
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def report(session: WorkerSession) -> dict[str, str]:
    """The worker's pid, its engine child's pid and whether it imported torch (the counter game's "report")."""
    return dict(fact.split("=") for fact in session.step("report").observation.split())


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> EnvConfig:
    """An env config selecting the counter family, with short time limits."""
    monkeypatch.setitem(FAMILIES, counter_env.NAME, "counter_env:CounterFamily")
    # EnvConfig.family accepts only the real families; model_copy(update=…) sets it without validation.
    env = EnvConfig(reset_timeout_s=TIMEOUT_S, step_timeout_s=TIMEOUT_S)
    return env.model_copy(update={"family": counter_env.NAME})


@pytest.fixture
def pool(counter: EnvConfig) -> Iterator[EnvPool]:
    with EnvPool(counter, size=2) as pool:
        yield pool


def play_to_win(session: WorkerSession, task_index: int = 0) -> None:
    session.reset(counter_env.task("ok", task_index))
    results = [session.step("up") for _ in range(counter_env.GOAL)]
    assert results[-1].won and results[-1].done and not any(r.done for r in results[:-1])


def test_sessions_are_reused_worker_processes_without_torch(pool: EnvPool) -> None:
    first = pool.sessions(2)
    assert pool.sessions(1) + pool.sessions(2)[1:] == first
    assert "torch" in sys.modules  # this process has it (the rollout engine imported above); workers must not
    for session in first:
        session.reset(counter_env.task("ok"))
        facts = report(session)
        assert facts["pid"] == str(session.pid) != str(os.getpid())
        assert facts["torch"] == "False"
        assert session.admissible_commands() == ["down", "up", "wait"]
    with pytest.raises(ValueError, match="pool of size 2"):
        pool.sessions(3)


def test_a_crashed_worker_loses_its_game_only_and_is_restarted(pool: EnvPool) -> None:
    crashing, healthy = pool.sessions(2)
    crashing.reset(counter_env.task("crash"))
    engine = int(report(crashing)["engine"])  # the report was step 1; step 2 crashes
    healthy.reset(counter_env.task("ok"))
    healthy.step("up")
    with pytest.raises(EnvError, match=r"died during the step 'up' in .*/crash-0 \(killed by SIGKILL\)"):
        crashing.step("up")
    assert crashing.broken and gone(crashing.pid, engine)
    assert [healthy.step("up").observation for _ in range(2)] == ["The counter is at 2.", "The counter is at 3."]
    replacement, same = pool.sessions(2)
    assert same is healthy and replacement is not crashing and replacement.pid != crashing.pid
    play_to_win(replacement)


def test_an_engine_exception_is_an_env_error_with_its_text(pool: EnvPool) -> None:
    (session,) = pool.sessions(1)
    session.reset(counter_env.task("raise"))
    session.step("up")
    with pytest.raises(EnvError, match="RuntimeError: the counter engine threw") as raised:
        session.step("up")
    assert raised.value.termination == "env_error" and session.broken
    with pytest.raises(EnvError, match="broken; get a fresh session"):
        session.step("up")
    (replacement,) = pool.sessions(1)
    assert replacement is not session
    play_to_win(replacement)


@pytest.mark.parametrize("fault", ["hang", "hang_reset"])
def test_a_hung_engine_times_out_and_its_worker_group_is_killed(pool: EnvPool, fault: str) -> None:
    hanging, healthy = pool.sessions(2)
    hanging.reset(counter_env.task("ok"))
    engine = int(report(hanging)["engine"])
    started = time.perf_counter()
    with pytest.raises(EnvTimeout, match=f"did not answer the .* within {TIMEOUT_S:g} s; it was killed") as raised:
        if fault == "hang":
            hanging.reset(counter_env.task("hang"))
            hanging.step("up")
            started = time.perf_counter()
            hanging.step("up")
        else:
            hanging.reset(counter_env.task("hang_reset"))
    waited = time.perf_counter() - started
    assert TIMEOUT_S <= waited < TIMEOUT_S + TIMEOUT_TOLERANCE_S
    assert raised.value.termination == "env_timeout" and isinstance(raised.value, EnvError)
    assert gone(hanging.pid, engine)  # the engine's child went down with the worker
    play_to_win(healthy)
    replacement = pool.sessions(2)[0]
    assert replacement is not hanging
    play_to_win(replacement)


def test_a_worker_killed_while_idle_fails_its_next_call(pool: EnvPool) -> None:
    """As after the OOM killer: nothing was asked of the worker when it died; the next request finds it gone."""
    (session,) = pool.sessions(1)
    session.reset(counter_env.task("ok"))
    engine = int(report(session)["engine"])
    os.kill(session.pid, signal.SIGKILL)
    with pytest.raises(EnvError, match=r"died during the step 'up' .*\(killed by SIGKILL\)"):
        session.step("up")
    assert gone(engine)
    play_to_win(pool.sessions(1)[0])


@pytest.mark.parametrize(("fault", "error", "message"), [
    ("raise", EnvError, "could not start its game: RuntimeError: the counter engine failed to start"),
    ("refuse", ValueError, "could not start: ValueError: the counter engine refuses this config"),
    ("hang", EnvTimeout, "did not answer the start within 1 s; it was killed"),
])
def test_a_worker_that_cannot_open_its_game_fails_sessions(counter: EnvConfig, monkeypatch: pytest.MonkeyPatch,
                                                             fault: str, error: type[Exception], message: str) -> None:
    monkeypatch.setenv(counter_env.OPEN_FAULT, fault)  # the workers inherit it
    allowance = pool_module._START_ALLOWANCE_S
    if fault == "hang":  # the start then gets just the reset's time limit
        monkeypatch.setattr(pool_module, "_START_ALLOWANCE_S", 0.0)
    with EnvPool(counter, size=2) as pool:
        with pytest.raises(error, match=message):
            pool.sessions(2)
        monkeypatch.delenv(counter_env.OPEN_FAULT)
        monkeypatch.setattr(pool_module, "_START_ALLOWANCE_S", allowance)
        for session in pool.sessions(2):  # both replaced by healthy workers
            play_to_win(session)


def test_close_stops_every_worker_and_its_children(counter: EnvConfig) -> None:
    pool = EnvPool(counter, size=2)
    sessions = pool.sessions(2)
    processes = []
    for session in sessions:
        session.reset(counter_env.task("ok"))
        processes += [session.pid, int(report(session)["engine"])]
    assert all(alive(pid) for pid in processes)
    pool.close()
    assert gone(*processes)
    with pytest.raises(RuntimeError, match="the pool is closed"):
        pool.sessions(1)
    with pytest.raises(EnvError, match="is closed; get a fresh session"):
        sessions[0].step("up")


def test_experts_play_inside_the_workers_in_task_order(pool: EnvPool, counter: EnvConfig) -> None:
    tasks = [counter_env.task("ok", index) for index in range(5)]
    episodes = pool.expert_episodes(tasks)
    assert [[turn.action for turn in turns] for turns in episodes] == [["up"] * counter_env.GOAL] * 5
    assert episodes[0][1].observation == "The counter is at 1."
    with pytest.raises(EnvError, match="RuntimeError: the counter engine threw"):
        pool.expert_episodes([counter_env.task("raise")])


def test_a_pool_refuses_a_bad_size(counter: EnvConfig) -> None:
    with pytest.raises(ValueError, match="pool size must be >= 1"):
        EnvPool(counter, size=0)


def test_a_batch_loses_exactly_its_crashed_and_hung_episodes(counter: EnvConfig) -> None:
    """The rollout engine over the pool: faults cost their own episodes; the rest of the batch plays on.

    The policy is an untrained tiny model, so its turns are malformed; the rules send the family's no-op after
    each, so every turn steps the game, and the faulty games fail at their second turn.
    """
    prompt = counter_env.CounterFamily.default_system_prompt
    tokenizer = train_tokenizer([prompt, "The counter is at 0."] * 20, vocab_size=300)
    model = build_model(tokenizer, ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                               intermediate_size=64), seed=0)
    rules = EpisodeRules(system_prompt=prompt, max_turns=3, max_observation_chars=200, max_context_tokens=1024,
                         noop_action=counter_env.CounterFamily.noop_action)
    sampling = SamplingConfig(max_new_tokens=4)
    specs = [EpisodeSpec(counter_env.task(fault, index), f"g{index}", f"e{index}")
             for index, fault in enumerate(["ok", "crash", "hang", "ok"])]
    with EnvPool(counter, size=4) as pool:
        before = [session.pid for session in pool.sessions(4)]
        started = time.perf_counter()
        records = play_episodes(model, tokenizer, specs, pool, sampling, rules, batch_episodes=4, seed=0)
        assert time.perf_counter() - started < TIMEOUT_S + 10  # the hang costs its time limit, not more
        assert [r.termination for r in records] == ["max_turns", "env_error", "env_timeout", "max_turns"]
        assert [len(r.turns) for r in records] == [3, 2, 2, 3]
        assert "killed by SIGKILL" in records[1].error and f"within {TIMEOUT_S:g} s" in records[2].error
        after = [session.pid for session in pool.sessions(4)]
        assert [old == new for old, new in zip(before, after, strict=True)] == [True, False, False, True]
        again = play_episodes(model, tokenizer, specs, pool, sampling, rules, batch_episodes=4, seed=0)
        assert [r.termination for r in again] == [r.termination for r in records]


def test_workers_start_in_waves(counter: EnvConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wave of workers is up before the next one starts, so a big pool's starts do not compete for the cores."""
    events: list[str] = []

    class Recorded(WorkerSession):
        def __init__(self, *args, **kwargs) -> None:
            events.append("start")
            super().__init__(*args, **kwargs)

        def wait_started(self) -> None:
            super().wait_started()
            events.append("up")

    monkeypatch.setattr(pool_module, "WorkerSession", Recorded)
    monkeypatch.setattr(pool_module, "_START_WAVE", 2)
    with EnvPool(counter, size=5) as pool:
        sessions = pool.sessions(5)
        assert len({session.pid for session in sessions}) == 5
        assert events == ["start", "start", "up", "up"] * 2 + ["start", "up"]
        os.kill(sessions[3].pid, signal.SIGKILL)
        sessions[3].broken = True
        events.clear()
        assert pool.sessions(5)[3].pid != sessions[3].pid and events == ["start", "up"]
