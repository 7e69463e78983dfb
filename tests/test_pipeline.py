"""The whole pipeline end to end on a micro config: real games, real model, DeepSpeed, Prefect, MLflow.

One local run is trained once per module and then resumed, partly killed and rerun; the same flow also runs
with its run on S3 (a loopback S3-protocol server).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterId
from safetensors.torch import load_file
from typer.testing import CliRunner

from dypo.cli import app
from dypo.schemas.tables import BATCH, EPISODES, EVAL_METRICS, TRAIN_METRICS, TURNS
from dypo.stages.commit import read_committed
from dypo.stages.config import parse_config
from dypo.stages.context import create_run, open_run
from dypo.stages.optimize import load_sequences, sampling_logprob_gap, sequence_logprobs
from dypo.stages.policy import load_policy
from dypo.stages.registry import run_stage

MICRO = {
    "run": {"name": "micro", "iterations": 1},
    "env": {"max_turns": 4, "twx": {"num_locations": 2}},
    "model": {"vocab_size": 400, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
              "intermediate_size": 64, "tokenizer_corpus_tasks": 16},
    "warmstart": {"expert_tasks": 16, "steps": 40, "batch_size": 8, "learning_rate": 5e-3},
    "rollout": {"groups": 2, "group_size": 3, "batch_episodes": 6, "sampling": {"max_new_tokens": 20}},
    # a target no single draw can reach, so every iteration exercises auxiliary resampling
    # keeps the barely trained policy's malformed episodes, so groups differ in return and optimize updates
    "filter": {"target_groups": 4, "max_extra_draws": 1, "max_malformed_fraction": 1.0},
    "optimize": {"micro_batch_tokens": 300},
    "evaluate": {"tasks": 4, "max_new_tokens": 20},
}
STAGES_OF_ITERATION = ["rollout", "rollout-aux-01", "filter", "optimize", "publish", "evaluate"]
PROJECT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def micro_config(tmp: Path, **tracking):
    return parse_config({**MICRO, "tracking": {"mlflow_uri": f"sqlite:///{tmp}/mlflow.db", **tracking}})


def manifests(run_uri: str) -> dict[tuple[str, int], str]:
    store = open_run(run_uri).store
    found = {}
    for iteration, stages in [(0, ["warmstart", "publish", "evaluate"]), (1, STAGES_OF_ITERATION)]:
        for stage in stages:
            committed = read_committed(store, stage, iteration)
            assert committed is not None, f"{stage} of iteration {iteration} did not commit"
            found[(stage, iteration)] = committed.sha256
    return found


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, prefect_harness):
    from dypo.flows.train import train

    tmp = tmp_path_factory.mktemp("local")
    os.environ["DYPO_CACHE_DIR"] = str(tmp / "cache")
    ctx = create_run(str(tmp / "run"), micro_config(tmp))
    evaluations = train(ctx.store.uri)
    return ctx.store.uri, evaluations


def test_local_run_commits_every_stage_with_valid_artifacts(local_run):
    run_uri, evaluations = local_run
    manifests(run_uri)
    store = open_run(run_uri).store
    turns = store.read_table("iter-000001/rollout/turns.parquet", TURNS).to_pylist()
    episodes = store.read_table("iter-000001/rollout/episodes.parquet", EPISODES).to_pylist()
    assert len(episodes) == 6 and {e["split"] for e in episodes} == {"train"}
    assert all(t["observation"] and t["generated_token_ids"] and t["context_token_ids"] for t in turns)
    assert {t["episode_id"] for t in turns} == {e["episode_id"] for e in episodes}
    for e in episodes:
        own = [t for t in turns if t["episode_id"] == e["episode_id"]]
        assert e["malformed_turns"] == sum(t["malformed"] for t in own)
        assert e["format_error_turns"] == sum(t["malformed"] and t["malformed_reason"] != "not_admissible" for t in own)
    batch = store.read_table("iter-000001/filter/batch.parquet", BATCH).to_pylist()
    auxiliary = store.read_table("iter-000001/rollout-aux-01/episodes.parquet", EPISODES).to_pylist()
    assert {e["task_id"] for e in auxiliary}.isdisjoint(e["task_id"] for e in episodes), "fresh tasks expected"
    assert {b["episode_id"] for b in batch} == {e["episode_id"] for e in episodes + auxiliary}
    assert read_committed(store, "filter", 1).manifest.metrics["draws"] == 2
    assert all(b["reason"] for b in batch)
    assert all((b["advantage"] is not None) == b["accepted"] for b in batch)
    [update] = store.read_table("iter-000001/optimize/metrics.parquet", TRAIN_METRICS).to_pylist()
    assert update["samples"] == sum(b["accepted"] for b in batch) > 0
    assert store.exists("iter-000001/optimize/checkpoint/model.safetensors")
    assert store.exists("iter-000001/optimize/optimizer/optimizer.safetensors")
    metrics = store.read_table("iter-000001/evaluate/metrics.parquet", EVAL_METRICS).to_pylist()
    held_out = store.read_table("iter-000001/evaluate/episodes.parquet", EPISODES).to_pylist()
    assert {e["split"] for e in held_out} == {"heldout"} and len(held_out) == 4
    overall = next(m for m in metrics if m["task_type"] == "all")
    assert {m["split"] for m in metrics} == {"heldout"}
    assert overall["success_rate"] == sum(e["success"] for e in held_out) / 4
    assert [e.iteration for e in evaluations] == [0, 1]


def test_mlflow_has_metrics_params_tags_and_registry(local_run):
    run_uri, evaluations = local_run
    config = open_run(run_uri).config
    client = MlflowClient(config.tracking.mlflow_uri)
    experiment = client.get_experiment_by_name("dypo")
    [run] = client.search_runs([experiment.experiment_id], f"tags.`dypo.run_uri` = '{run_uri}'")
    assert run.data.params["rollout.group_size"] == "3"
    history = client.get_metric_history(run.info.run_id, "evaluate/success_rate")
    assert sorted(m.step for m in history) == [0, 1]
    for key in ("rollout/generated_tokens_per_s", "filter/accepted_groups", "optimize/updates", "time/rollout_s"):
        assert key in run.data.metrics, key
    assert run.data.tags["parquet.iter-000001.rollout.turns"].endswith("iter-000001/rollout/turns.parquet")
    versions = client.search_model_versions("name = 'dypo-tiny'")
    assert len(versions) == 2
    candidate = client.get_model_version_by_alias("dypo-tiny", "candidate")
    assert candidate.source.endswith("iter-000001/optimize/checkpoint")
    champion = str(client.get_model_version_by_alias("dypo-tiny", "champion").version)
    assert champion == ("2" if evaluations[1].details["champion_moved"] == "True" else "1")


def test_rerunning_the_flow_skips_every_committed_stage(local_run, prefect_harness):
    from dypo.flows.train import train

    run_uri, _ = local_run
    before = manifests(run_uri)
    train(run_uri)
    assert manifests(run_uri) == before


def test_cli_stage_without_force_skips_and_with_force_rewrites(local_run):
    run_uri, _ = local_run
    before = manifests(run_uri)
    result = CliRunner().invoke(app, ["stage", "filter", "--run", run_uri, "--iter", "1"])
    assert result.exit_code == 0, result.output
    assert manifests(run_uri) == before
    result = CliRunner().invoke(app, ["stage", "filter", "--run", run_uri, "--iter", "1", "--force"])
    assert result.exit_code == 0, result.output
    after = manifests(run_uri)
    assert after[("filter", 1)] != before[("filter", 1)]
    assert {k: v for k, v in after.items() if k != ("filter", 1)} == {
        k: v for k, v in before.items() if k != ("filter", 1)}


def test_stage_killed_before_its_manifest_leaves_nothing_visible_and_reruns_cleanly(local_run):
    run_uri, _ = local_run
    store = open_run(run_uri).store
    killer = (
        "import os, signal, sys\n"
        "from dypo.stages.storage import RunStore\n"
        "write = RunStore.write_bytes\n"
        "def dying(self, key, data):\n"
        "    if key.endswith('evaluate/manifest.json'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return write(self, key, data)\n"
        "RunStore.write_bytes = dying\n"
        "from dypo.stages.registry import run_stage\n"
        "run_stage(sys.argv[1], 'evaluate', 1, force=True)\n"
    )
    killed = subprocess.run([sys.executable, "-c", killer, run_uri], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert store.exists("iter-000001/evaluate/episodes.parquet"), "the stage should have died after its outputs"
    assert read_committed(store, "evaluate", 1) is None
    result = CliRunner().invoke(app, ["stage", "publish", "--run", run_uri, "--iter", "1"])
    assert result.exit_code == 0
    result = CliRunner().invoke(app, ["stage", "evaluate", "--run", run_uri, "--iter", "1"])
    assert result.exit_code == 0, result.output
    assert read_committed(store, "evaluate", 1) is not None
    assert store.list_files("iter-000001/evaluate") == [f"iter-000001/evaluate/{name}" for name in (
        "episodes.parquet", "manifest.json", "metrics.parquet", "turns.parquet")]


def test_a_stage_of_an_uncommitted_iteration_is_refused(local_run):
    run_uri, _ = local_run
    result = CliRunner().invoke(app, ["stage", "optimize", "--run", run_uri, "--iter", "5"])
    assert result.exit_code == 2
    assert "stage 'filter' of iteration 5 has not committed" in result.output


def test_dypo_rerun_rewrites_one_stage_through_the_rerun_flow(local_run, prefect_harness):
    run_uri, _ = local_run
    before = manifests(run_uri)
    result = CliRunner().invoke(app, ["rerun", "--run", run_uri, "--iter", "0", "--stage", "evaluate"])
    assert result.exit_code == 0, result.output
    with get_client(sync_client=True) as client:
        flow = client.read_flow_by_name("dypo-rerun-stage")
        runs = client.read_flow_runs(flow_filter=FlowFilter(id=FlowFilterId(any_=[flow.id])))
    assert [run.state.is_completed() for run in runs] == [True]
    after = manifests(run_uri)
    assert after[("evaluate", 0)] != before[("evaluate", 0)]
    assert after[("warmstart", 0)] == before[("warmstart", 0)]


def test_the_same_flow_runs_with_its_run_on_s3(s3_bucket, tmp_path, prefect_harness):
    from dypo.flows.train import train

    two_iterations = micro_config(tmp_path).model_copy(update={"run": parse_config(
        {"run": {**MICRO["run"], "iterations": 2}}).run})
    ctx = create_run(f"s3://{s3_bucket}/runs/micro", two_iterations)
    evaluations = train(ctx.store.uri)
    assert [e.iteration for e in evaluations] == [0, 1, 2]
    manifests(ctx.store.uri)
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]}
    for key in ("runs/micro/run.json", "runs/micro/iter-000001/rollout/turns.parquet",
                "runs/micro/iter-000001/optimize/checkpoint/model.safetensors",
                "runs/micro/iter-000001/evaluate/metrics.parquet"):
        assert key in keys
    candidate = MlflowClient(ctx.config.tracking.mlflow_uri).get_model_version_by_alias("dypo-tiny", "candidate")
    assert candidate.source == f"s3://{s3_bucket}/runs/micro/iter-000002/optimize/checkpoint"
    assert "runs/micro/iter-000002/optimize/optimizer/optimizer.safetensors" in keys


def test_optimize_scores_exactly_what_the_rollout_sampled(local_run):
    """logp_old recomputed by the optimize stage equals the sampler's recorded log-probs (on-policy check), and
    the audit metric does flag a mismatch: scoring at the wrong temperature."""
    run_uri, _ = local_run
    ctx = open_run(run_uri)
    optimized = read_committed(ctx.store, "optimize", 1).manifest
    assert optimized.metrics["sampling_logprob_gap"] < 1e-4
    filtered = read_committed(ctx.store, "filter", 1)
    batch = ctx.store.read_table(f"{filtered.directory}/batch.parquet", BATCH)
    sequences, sampled = load_sequences(ctx, batch, filtered.manifest.details["draw_stages"].split(","))
    model, tokenizer = load_policy(ctx.checkpoint_dir(0))
    wrong = sequence_logprobs(model, sequences, tokenizer.pad_token_id, 4096, temperature=1.0)
    assert sampling_logprob_gap(sequences, wrong, sampled) > 0.01


def test_ablation_switches_run_through_rollout_filter_and_optimize(local_run, tmp_path):
    """GRPO's KL to a frozen reference, per-turn samples over a history window, no-op after malformed turns, the
    shaped return and DAPO's token-level loss, on a run forked from the local run's warmstart: every sample is
    still scored on-policy."""
    source = open_run(local_run[0]).store
    config = parse_config({**MICRO, "tracking": {"mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db"},
                           "rollout": {**MICRO["rollout"], "history_window": 2, "on_malformed": "noop",
                                       "reward": "shaped"},
                           "filter": {"target_groups": 2, "max_extra_draws": 0, "reject_zero_variance": False,
                                      "max_malformed_fraction": 1.0},
                           "optimize": {"micro_batch_tokens": 300, "kl_coef": 0.04, "sample_form": "per_turn",
                                        "loss_aggregation": "token_mean"}})
    ctx = create_run(str(tmp_path / "ablation"), config)
    for key in source.list_files("iter-000000/warmstart"):
        ctx.store.write_bytes(key, source.read_bytes(key))
    for stage in ("rollout", "filter", "optimize"):
        run_stage(ctx.store.uri, stage, 1)
    turns = ctx.store.read_table("iter-000001/rollout/turns.parquet", TURNS).to_pylist()
    assert all(t["context_reset"] for t in turns)
    batch = ctx.store.read_table("iter-000001/filter/batch.parquet", BATCH).to_pylist()
    accepted = {b["episode_id"] for b in batch if b["accepted"]}
    assert len(accepted) == 6, "without zero-variance rejection both groups are trained"
    optimized = read_committed(ctx.store, "optimize", 1).manifest
    [update] = ctx.store.read_table("iter-000001/optimize/metrics.parquet", TRAIN_METRICS).to_pylist()
    assert update["samples"] == sum(t["episode_id"] in accepted for t in turns)
    assert update["kl_ref"] is not None and abs(update["kl_ref"]) < 1e-6, "policy == reference before the update"
    assert optimized.metrics["sampling_logprob_gap"] < 1e-4


def test_the_alfworld_config_trains_on_generated_alfworld_games(tmp_path, prefect_harness):
    """`--config configs/alfworld-tiny.yaml` (the embedded default switched to offline-generated ALFWorld games),
    with micro budgets set on the command line, runs warmstart and a full iteration on ALFWorld's own engine."""
    budgets = {"run.iterations": 1, "env.max_turns": 4, "model.vocab_size": 400, "model.hidden_size": 32,
               "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1, "model.intermediate_size": 64,
               "model.tokenizer_corpus_tasks": 6, "warmstart.expert_tasks": 6, "warmstart.steps": 10,
               "warmstart.batch_size": 4, "rollout.groups": 1, "rollout.group_size": 2, "rollout.batch_episodes": 2,
               "rollout.sampling.max_new_tokens": 16, "filter.target_groups": 1, "filter.max_extra_draws": 0,
               "filter.reject_zero_variance": False, "filter.max_malformed_fraction": 1.0,
               "optimize.micro_batch_tokens": 2048, "evaluate.tasks": 2, "evaluate.max_new_tokens": 16,
               "evaluate.splits": '["heldout", "unseen"]',
               "tracking.mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    run = tmp_path / "run"
    arguments = ["train", "--config", str(PROJECT / "configs" / "alfworld-tiny.yaml"), "--run", str(run)]
    for key, value in budgets.items():
        arguments += ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    store = open_run(str(run)).store
    for iteration, stages in [(0, ["warmstart", "publish", "evaluate"]), (1, ["rollout", "filter", "optimize",
                                                                                "publish", "evaluate"])]:
        for stage in stages:
            assert read_committed(store, stage, iteration) is not None, f"{stage} of iteration {iteration}"
    episodes = store.read_table("iter-000001/rollout/episodes.parquet", EPISODES).to_pylist()
    assert len(episodes) == 2 and all(e["task_id"].startswith("alfworld-generated/train/") for e in episodes)
    held_out = store.read_table("iter-000001/evaluate/episodes.parquet", EPISODES).to_pylist()
    assert sorted(e["split"] for e in held_out) == ["heldout", "heldout", "unseen", "unseen"]
    metrics = store.read_table("iter-000001/evaluate/metrics.parquet", EVAL_METRICS).to_pylist()
    for split in ("heldout", "unseen"):
        overall = next(m for m in metrics if m["split"] == split and m["task_type"] == "all")
        assert overall["episodes"] == 2
        assert overall["success_rate"] == sum(e["success"] for e in held_out if e["split"] == split) / 2
        assert read_committed(store, "evaluate", 1).manifest.metrics[f"success_rate_{split}"] == overall["success_rate"]
    assert read_committed(store, "evaluate", 1).manifest.metrics["episodes"] == 2  # the gating split's
    played = episodes + held_out
    assert all(e["termination"] in {"won", "lost", "max_turns", "context_full"} for e in played), played


def test_optimize_on_two_ranks_takes_the_single_process_steps(local_run, tmp_path):
    """`torchrun` with two gloo ranks runs the optimize stage data-parallel: each rank scores and trains its share
    of the micro-batches, rank 0 alone commits, and the weights and statistics are the single process's. The last
    update holds one sequence, so rank 1 has no micro-batch of it and must still join the gradient reduction."""
    source = open_run(local_run[0]).store
    accepted = sum(row["accepted"] for row in source.read_table("iter-000001/filter/batch.parquet", BATCH).to_pylist())
    assert accepted >= 3, "the local run should train on several episodes"
    config = parse_config({**MICRO, "tracking": {"mlflow_uri": f"sqlite:///{tmp_path}/mlflow.db"},
                           "optimize": {**MICRO["optimize"], "mini_batch_size": accepted - 1}})
    runs = {}
    for name in ("single", "ranks"):
        ctx = create_run(str(tmp_path / name), config)
        for key in source.list_files("iter-000000") + source.list_files("iter-000001"):
            if "/optimize/" not in key and "/publish/" not in key and "/evaluate/" not in key:
                ctx.store.write_bytes(key, source.read_bytes(key))
        runs[name] = ctx
    run_stage(runs["single"].store.uri, "optimize", 1)
    # the local run's cache holds DeepSpeed's compiled comm op, so the ranks do not build it again
    env = {**os.environ, "DYPO_CACHE_DIR": str(Path(source.root).parent / "cache"), "OMP_NUM_THREADS": "1",
           "DYPO_RUN_URI": runs["ranks"].store.uri, "DYPO_ITERATION": "1"}  # as k8s/optimize-multinode passes them
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               "--no-python", str(Path(sys.executable).parent / "dypo"), "stage", "optimize"],
                              env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "rank 1: took part; rank 0 commits the stage" in launched.stderr
    metrics = {name: ctx.store.read_table("iter-000001/optimize/metrics.parquet", TRAIN_METRICS).to_pylist()
               for name, ctx in runs.items()}
    assert [row["samples"] for row in metrics["ranks"]] == [accepted - 1, 1]
    for single, ranked in zip(metrics["single"], metrics["ranks"], strict=True):
        for key in ("loss", "clip_fraction", "approx_kl", "entropy", "grad_norm", "tokens"):
            assert ranked[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key
    weights = {name: load_file(ctx.checkpoint_dir(1) / "model.safetensors") for name, ctx in runs.items()}
    moved = max((weights["single"][k] - load_file(runs["single"].checkpoint_dir(0) / "model.safetensors")[k])
                .abs().max().item() for k in weights["single"])
    assert moved > 1e-4, "the updates should move the weights"
    for key, value in weights["single"].items():
        assert torch.allclose(weights["ranks"][key], value, atol=1e-6), key
    committed = read_committed(runs["ranks"].store, "optimize", 1).manifest
    assert committed.metrics["samples"] == accepted and committed.metrics["updates"] == 2


def test_warmstart_refuses_a_distributed_launch_and_writes_nothing(tmp_path, monkeypatch):
    ctx = create_run(str(tmp_path / "run"), micro_config(tmp_path))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="without torchrun"):
        run_stage(ctx.store.uri, "warmstart", 0)
    assert ctx.store.list_files("iter-000000") == []
