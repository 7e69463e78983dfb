"""Manifest-last commits: skip on same inputs, rewrite on change or --force, nothing visible after a crash."""

import pytest

from dypo.schemas.tables import EVAL_METRICS
from dypo.schemas.validate import SchemaError
from dypo.stages.commit import StageNotComplete, commit_stage, input_digest, read_committed, require_committed
from dypo.stages.storage import RunStore

ROW = {"run": "r", "iteration": 1, "task_type": "all", "episodes": 1, "success_rate": 1.0, "mean_return": 1.0,
       "mean_turns": 1.0, "malformed_turn_rate": 0.0}


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return RunStore(str(tmp_path / "run"))
    return RunStore(f"s3://{request.getfixturevalue('s3_bucket')}/run")


def counting_body(calls):
    def body(writer):
        calls.append(1)
        writer.write_rows("metrics.parquet", [ROW], EVAL_METRICS)
        writer.metrics["n"] = len(calls)
    return body


def test_same_digest_skips_and_force_or_new_digest_rewrites(store):
    calls = []
    digest = input_digest("evaluate", {"a": 1}, [], {})
    first = commit_stage(store, "evaluate", 1, digest, [], False, counting_body(calls))
    assert not first.skipped and len(calls) == 1
    again = commit_stage(store, "evaluate", 1, digest, [], False, counting_body(calls))
    assert again.skipped and len(calls) == 1 and again.committed.sha256 == first.committed.sha256
    forced = commit_stage(store, "evaluate", 1, digest, [], True, counting_body(calls))
    assert not forced.skipped and forced.committed.manifest.metrics["n"] == 2
    changed = input_digest("evaluate", {"a": 2}, [], {})
    assert changed != digest
    assert not commit_stage(store, "evaluate", 1, changed, [], False, counting_body(calls)).skipped


def test_manifest_records_outputs_and_inputs(store):
    upstream = commit_stage(store, "publish", 1, "d0", [], False, lambda w: None).committed
    outcome = commit_stage(store, "evaluate", 1, "d1", [upstream], False, counting_body([]))
    manifest = outcome.committed.manifest
    assert manifest.inputs == {"iter-000001/publish/manifest.json": upstream.sha256}
    assert [o.path for o in manifest.outputs] == ["metrics.parquet"]
    assert manifest.schema_versions == {"eval_metrics": EVAL_METRICS.version}
    assert manifest.outputs[0].bytes == len(store.read_bytes("iter-000001/evaluate/metrics.parquet"))


def test_crash_before_manifest_leaves_nothing_visible_and_rerun_is_clean(store):
    def crashing(writer):
        writer.write_rows("metrics.parquet", [ROW], EVAL_METRICS)
        store.write_bytes(f"{writer.directory}/leftover.tmp", b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        commit_stage(store, "evaluate", 2, "d", [], False, crashing)
    assert read_committed(store, "evaluate", 2) is None
    with pytest.raises(StageNotComplete, match="stage 'evaluate' of iteration 2 has not committed"):
        require_committed(store, "evaluate", 2)
    outcome = commit_stage(store, "evaluate", 2, "d", [], False, counting_body([]))
    assert not outcome.skipped
    assert store.list_files("iter-000002/evaluate") == ["iter-000002/evaluate/manifest.json",
                                                        "iter-000002/evaluate/metrics.parquet"]


def test_unreadable_manifest_is_rejected(store):
    store.write_bytes("iter-000001/evaluate/manifest.json", b'{"stage": "evaluate"}')
    with pytest.raises(SchemaError, match="not a valid manifest"):
        read_committed(store, "evaluate", 1)
