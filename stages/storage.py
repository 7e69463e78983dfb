"""One object-storage interface for local paths, `file://` and `s3://` URIs, built on `pyarrow.fs`.

Stages only ever talk to each other through a `RunStore`, so the same stage code runs against a laptop directory
and an S3 bucket. S3 endpoints other than AWS (MinIO, a loopback test server) come from the standard
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` variables; credentials from the usual AWS variables.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dypo.schemas.tables import TableSpec
from dypo.schemas.validate import conform


class StorageError(RuntimeError):
    """An object that should be there is not, or a URI that cannot be used."""


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    options: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc or parsed.path
        options["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**options)


def normalize_uri(uri: str) -> str:
    """Local paths become absolute `file://` URIs; S3 URIs lose trailing slashes."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"S3 URI {uri!r} names no bucket; use s3://BUCKET/prefix")
        return uri.rstrip("/")
    if parsed.scheme == "file":
        return "file://" + str(Path(parsed.path).resolve())
    if parsed.scheme == "":
        return "file://" + str(Path(uri).expanduser().resolve())
    raise StorageError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://")


class StoredObject(NamedTuple):
    sha256: str
    size: int


class RunStore:
    """Everything of one run, addressed by keys relative to the run URI (e.g. `iter-000001/rollout/x.parquet`)."""

    def __init__(self, uri: str) -> None:
        self.uri = normalize_uri(uri)
        parsed = urlparse(self.uri)
        if parsed.scheme == "s3":
            self.fs: pafs.FileSystem = _s3_filesystem()
            self.root = f"{parsed.netloc}{parsed.path}".rstrip("/")
        else:
            self.fs = pafs.LocalFileSystem()
            self.root = parsed.path
        self.is_local = parsed.scheme == "file"

    def path(self, key: str) -> str:
        return f"{self.root}/{key}".rstrip("/")

    def uri_of(self, key: str) -> str:
        return f"{self.uri}/{key}"

    # --- bytes -------------------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        return self.fs.get_file_info(self.path(key)).type != pafs.FileType.NotFound

    def write_bytes(self, key: str, data: bytes) -> StoredObject:
        """Write an object; its checksum and size go into manifests."""
        path = self.path(key)
        if self.is_local:
            self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)
        return StoredObject(hashlib.sha256(data).hexdigest(), len(data))

    def read_bytes(self, key: str) -> bytes:
        try:
            with self.fs.open_input_stream(self.path(key)) as stream:
                return stream.read()
        except FileNotFoundError:
            raise StorageError(f"{self.uri_of(key)} does not exist") from None

    def write_json(self, key: str, value: Any) -> StoredObject:
        return self.write_bytes(key, json.dumps(value, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def list_files(self, prefix: str) -> list[str]:
        """Keys of all files under `prefix`, sorted."""
        selector = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        base = len(self.root) + 1
        return sorted(i.path[base:] for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File)

    def delete_prefix(self, prefix: str) -> None:
        if self.exists(prefix):
            self.fs.delete_dir(self.path(prefix))

    # --- tables ------------------------------------------------------------------------------------------

    def write_table(self, key: str, table: pa.Table) -> StoredObject:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        return self.write_bytes(key, buffer.getvalue())

    def read_table(self, key: str, spec: TableSpec) -> pa.Table:
        """Read a Parquet table and validate it against `spec` (the one read path for artifacts)."""
        data = self.read_bytes(key)
        return conform(pq.read_table(pa.BufferReader(data)), spec, self.uri_of(key))

    # --- directories (checkpoints) ----------------------------------------------------------------------

    def upload_dir(self, local_dir: Path, key: str) -> dict[str, StoredObject]:
        """Copy a local directory under `key`; returns relative file name -> what was stored."""
        checksums = {}
        for file in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            relative = file.relative_to(local_dir).as_posix()
            checksums[relative] = self.write_bytes(f"{key}/{relative}", file.read_bytes())
        return checksums

    def local_dir(self, key: str, cache_root: Path, version: str) -> Path:
        """A local directory holding the objects under `key`: the directory itself for local runs, otherwise a
        download into `cache_root`, reused while `version` (the sha of the manifest that committed it) holds.

        Processes sharing the cache (shards in containers, ranks on one node) may download the same directory at
        once: each downloads into its own scratch directory and renames it into place, and the first rename wins.
        """
        if self.is_local:
            return Path(self.path(key))
        target = cache_root / hashlib.sha256(f"{self.uri_of(key)}@{version}".encode()).hexdigest()[:16]
        done = target / ".complete"
        if done.exists():
            return target
        prefix_len = len(key) + 1
        files = self.list_files(key)
        if not files:
            raise StorageError(f"{self.uri_of(key)} holds no files")
        cache_root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".{target.name}-"))
        try:
            for file_key in files:
                destination = scratch / file_key[prefix_len:]
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(self.read_bytes(file_key))
            (scratch / done.name).touch()
            try:
                scratch.rename(target)
            except OSError as error:  # ENOTEMPTY / EEXIST: another process renamed its copy into place first
                if not done.exists():
                    raise StorageError(f"cannot place the download of {self.uri_of(key)} at {target} ({error}): "
                                       "delete that directory, an unfinished download, and rerun") from error
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return target
