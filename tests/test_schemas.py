import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dypo.schemas.tables import BATCH, EVAL_METRICS, NAME_KEY, VERSION_KEY
from dypo.schemas.validate import SchemaError, build_table, conform
from dypo.stages.storage import RunStore


def metric_row(**overrides):
    row = {"run": "r", "iteration": 1, "split": "heldout", "task_type": "all", "episodes": 4, "success_rate": 0.5,
           "mean_return": 0.4, "mean_turns": 3.0, "malformed_turn_rate": 0.0}
    return {**row, **overrides}


def test_roundtrip_through_parquet_keeps_name_and_version(tmp_path):
    store = RunStore(str(tmp_path))
    store.write_table("m.parquet", build_table([metric_row()], EVAL_METRICS))
    table = store.read_table("m.parquet", EVAL_METRICS)
    assert table.schema.metadata[NAME_KEY] == b"eval_metrics"
    assert table.schema.metadata[VERSION_KEY] == b"1.1"
    assert table.to_pylist() == [metric_row()]


def _write(tmp_path, table):
    pq.write_table(table, tmp_path / "x.parquet")
    return RunStore(str(tmp_path))


def test_missing_column_is_named_with_the_file(tmp_path):
    table = build_table([metric_row()], EVAL_METRICS).drop_columns(["mean_turns"])
    store = _write(tmp_path, table)
    with pytest.raises(SchemaError, match=r"x\.parquet: column 'mean_turns' is missing"):
        store.read_table("x.parquet", EVAL_METRICS)


def test_wrong_type_is_named(tmp_path):
    table = build_table([metric_row()], EVAL_METRICS)
    index = table.schema.get_field_index("episodes")
    table = table.set_column(index, pa.field("episodes", pa.string()), pa.array(["4"]))
    store = _write(tmp_path, table)
    with pytest.raises(SchemaError, match="column 'episodes' has type string, expected int32"):
        store.read_table("x.parquet", EVAL_METRICS)


def test_unknown_major_version_is_rejected(tmp_path):
    table = build_table([metric_row()], EVAL_METRICS)
    table = table.replace_schema_metadata({NAME_KEY: b"eval_metrics", VERSION_KEY: b"2.0"})
    store = _write(tmp_path, table)
    with pytest.raises(SchemaError, match=r"schema version 2\.0 is not readable"):
        store.read_table("x.parquet", EVAL_METRICS)


def test_newer_minor_with_extra_column_is_read(tmp_path):
    table = build_table([metric_row()], EVAL_METRICS).append_column("new_metric", pa.array([1.0]))
    table = table.replace_schema_metadata({NAME_KEY: b"eval_metrics", VERSION_KEY: b"1.7"})
    store = _write(tmp_path, table)
    assert store.read_table("x.parquet", EVAL_METRICS).column("new_metric").to_pylist() == [1.0]


def test_foreign_parquet_and_other_table_are_rejected(tmp_path):
    store = _write(tmp_path, pa.table({"a": [1]}))
    with pytest.raises(SchemaError, match="not written by dypo"):
        store.read_table("x.parquet", EVAL_METRICS)
    store = _write(tmp_path, build_table([metric_row()], EVAL_METRICS))
    with pytest.raises(SchemaError, match="holds a 'eval_metrics' table, expected 'batch'"):
        store.read_table("x.parquet", BATCH)


def test_nulls_in_required_column_are_rejected():
    table = build_table([metric_row()], EVAL_METRICS)
    index = table.schema.get_field_index("run")
    table = table.set_column(index, pa.field("run", pa.string()), pa.array([None], pa.string()))
    with pytest.raises(SchemaError, match="column 'run' has null values"):
        conform(table, EVAL_METRICS, "t")
