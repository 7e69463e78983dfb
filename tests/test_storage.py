import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from dypo.schemas.tables import EVAL_METRICS
from dypo.schemas.validate import build_table
from dypo.stages.storage import RunStore, StorageError, normalize_uri


@pytest.fixture(params=["local", "file", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return RunStore(str(tmp_path / "run"))
    if request.param == "file":
        return RunStore(f"file://{tmp_path}/run")
    bucket = request.getfixturevalue("s3_bucket")
    return RunStore(f"s3://{bucket}/runs/r1")


def test_bytes_json_and_listing(store):
    stored = store.write_bytes("a/b.txt", b"hello")
    assert stored.size == 5 and len(stored.sha256) == 64
    store.write_json("a/c.json", {"x": 1})
    assert store.read_bytes("a/b.txt") == b"hello"
    assert store.read_json("a/c.json") == {"x": 1}
    assert store.list_files("a") == ["a/b.txt", "a/c.json"]
    assert store.exists("a/b.txt") and not store.exists("a/zzz")
    store.delete_prefix("a")
    assert store.list_files("a") == [] and not store.exists("a/b.txt")


def test_missing_object_names_its_uri(store):
    with pytest.raises(StorageError, match=r"/nothing\.json does not exist"):
        store.read_bytes("nothing.json")


def test_tables_are_validated_on_read(store):
    row = {"run": "r", "iteration": 0, "split": "heldout", "task_type": "all", "episodes": 1, "success_rate": 1.0,
           "mean_return": 1.0, "mean_turns": 2.0, "malformed_turn_rate": 0.0}
    store.write_table("t/m.parquet", build_table([row], EVAL_METRICS))
    assert store.read_table("t/m.parquet", EVAL_METRICS).to_pylist() == [row]


def test_directories_roundtrip(store, tmp_path):
    source = tmp_path / "ckpt"
    (source / "sub").mkdir(parents=True)
    (source / "model.safetensors").write_bytes(b"\x00" * 1000)
    (source / "sub" / "config.json").write_text("{}")
    checksums = store.upload_dir(source, "iter-000001/optimize/checkpoint")
    assert set(checksums) == {"model.safetensors", "sub/config.json"}
    local = store.local_dir("iter-000001/optimize/checkpoint", tmp_path / "cache", version="v1")
    assert (local / "model.safetensors").read_bytes() == b"\x00" * 1000
    assert (local / "sub" / "config.json").read_text() == "{}"


def test_s3_download_cache_follows_the_version(s3_bucket, tmp_path):
    store = RunStore(f"s3://{s3_bucket}/run")
    store.write_bytes("ck/w", b"one")
    assert (store.local_dir("ck", tmp_path, "v1") / "w").read_bytes() == b"one"
    store.write_bytes("ck/w", b"two")
    assert (store.local_dir("ck", tmp_path, "v1") / "w").read_bytes() == b"one"
    assert (store.local_dir("ck", tmp_path, "v2") / "w").read_bytes() == b"two"


def test_uri_normalisation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_uri("runs/x/") == f"file://{tmp_path}/runs/x"
    assert normalize_uri("s3://bucket/p/") == "s3://bucket/p"
    with pytest.raises(StorageError, match="names no bucket"):
        normalize_uri("s3:///p")
    with pytest.raises(StorageError, match="unsupported storage URI"):
        normalize_uri("gs://bucket/p")


def test_downloads_of_one_directory_at_once_all_get_it_whole(s3_bucket, tmp_path):
    """Shards in containers and ranks on one node share the cache: each download is placed whole or not at all."""
    store = RunStore(f"s3://{s3_bucket}/run")
    files = {f"ck/part-{i}": bytes([i]) * 50_000 for i in range(8)}
    for key, data in files.items():
        store.write_bytes(key, data)
    start = threading.Barrier(6)

    def download(_: int) -> dict[str, bytes]:
        start.wait()
        local = store.local_dir("ck", tmp_path / "cache", "v1")
        return {f"ck/{path.name}": path.read_bytes() for path in local.iterdir() if not path.name.startswith(".")}

    with ThreadPoolExecutor(6) as pool:
        assert all(seen == files for seen in pool.map(download, range(6)))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [store.local_dir("ck", tmp_path / "cache", "v1").name]


def test_an_unfinished_download_left_in_the_cache_is_named(s3_bucket, tmp_path):
    store = RunStore(f"s3://{s3_bucket}/run")
    store.write_bytes("ck/w", b"one")
    target = store.local_dir("ck", tmp_path, "v1")
    (target / ".complete").unlink()  # as a crash of an older version of the download left it
    with pytest.raises(StorageError, match="delete that directory"):
        store.local_dir("ck", tmp_path, "v1")
