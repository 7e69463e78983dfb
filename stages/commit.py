"""Manifest-last commits: how a stage makes its outputs visible exactly once, or not at all.

A stage writes every output under its own directory, then `manifest.json`. Readers only trust a stage whose
manifest exists, so a crash at any point before that leaves nothing visible; the next run wipes the leftovers and
starts clean. The manifest records the digest of everything the stage read, so rerunning it on unchanged inputs is
a no-op and any upstream change (or `--force`) makes it write anew.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from dypo import code_version
from dypo.schemas.manifest import MANIFEST_VERSION, Manifest, OutputFile
from dypo.schemas.tables import TableSpec
from dypo.schemas.validate import SchemaError, build_table
from dypo.stages.storage import RunStore, StoredObject


class StageNotComplete(RuntimeError):
    """A stage needs the outputs of another stage that has not committed."""


def rollout_stage_name(draw: int) -> str:
    """Draw 0 is the iteration's rollout; auxiliary resampling draws 1, 2, … live beside it."""
    return "rollout" if draw == 0 else f"rollout-aux-{draw:02d}"


def stage_dir(stage: str, iteration: int) -> str:
    return f"iter-{iteration:06d}/{stage}"


def manifest_key(stage: str, iteration: int) -> str:
    return f"{stage_dir(stage, iteration)}/manifest.json"


@dataclass(frozen=True)
class CommittedStage:
    """A committed stage as a reader sees it: its manifest plus the manifest's own checksum."""

    manifest: Manifest
    sha256: str
    key: str

    @property
    def directory(self) -> str:
        return self.key.rsplit("/", 1)[0]


def read_committed(store: RunStore, stage: str, iteration: int) -> CommittedStage | None:
    return read_manifest(store, manifest_key(stage, iteration))


def read_manifest(store: RunStore, key: str) -> CommittedStage | None:
    """The manifest stored at `key` (a stage's, or a shard's), or None when there is none."""
    if not store.exists(key):
        return None
    data = store.read_bytes(key)
    try:
        manifest = Manifest.model_validate_json(data)
    except ValidationError as error:
        raise SchemaError(f"{store.uri_of(key)}: not a valid manifest: {error}") from None
    if manifest.manifest_version.split(".")[0] != MANIFEST_VERSION.split(".")[0]:
        raise SchemaError(f"{store.uri_of(key)}: manifest version {manifest.manifest_version} is not readable by "
                          f"this dypo (reads {MANIFEST_VERSION.split('.')[0]}.x)")
    return CommittedStage(manifest, hashlib.sha256(data).hexdigest(), key)


def require_committed(store: RunStore, stage: str, iteration: int) -> CommittedStage:
    committed = read_committed(store, stage, iteration)
    if committed is None:
        raise StageNotComplete(
            f"stage '{stage}' of iteration {iteration} has not committed in {store.uri} (no "
            f"{manifest_key(stage, iteration)}); run it first: dypo stage {stage.split('-')[0]} --run {store.uri} "
            f"--iter {iteration}")
    return committed


def table_parts(outputs: list[OutputFile], name: str) -> list[str]:
    """The files holding table `name` (`turns.parquet`): the file itself, or a sharded stage's part files
    (`turns/part-00000.parquet`, …) in shard order."""
    stem = name.removesuffix(".parquet")
    return sorted(o.path for o in outputs
                  if o.path == name or (o.path.startswith(f"{stem}/part-") and o.path.endswith(".parquet")))


def read_table_parts(store: RunStore, directory: str, outputs: list[OutputFile], name: str,
                     spec: TableSpec) -> pa.Table:
    paths = table_parts(outputs, name)
    if not paths:
        raise SchemaError(f"{store.uri_of(directory)} records no {name} (neither the file nor its part files)")
    tables = [store.read_table(f"{directory}/{path}", spec) for path in paths]
    return pa.concat_tables(tables, promote_options="permissive")


def read_stage_table(store: RunStore, directory: str, name: str, spec: TableSpec) -> pa.Table:
    """Table `name` of the stage committed in `directory`, whole or from its shards' parts, as its manifest lists.

    The manifest, not a directory listing, says which files count: leftovers of a crashed or superseded attempt
    are never read.
    """
    committed = read_manifest(store, f"{directory}/manifest.json")
    if committed is None:
        raise StageNotComplete(f"{store.uri_of(directory)} has not committed (no manifest.json)")
    return read_table_parts(store, directory, committed.manifest.outputs, name, spec)


def input_digest(stage: str, config: dict[str, Any], inputs: list[CommittedStage], extra: dict[str, Any]) -> str:
    payload = {
        "stage": stage,
        "config": config,
        "inputs": {c.key: c.sha256 for c in inputs},
        "extra": extra,
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class StageWriter:
    """Handed to a stage body: writes outputs under the stage directory and remembers them for the manifest."""

    store: RunStore
    directory: str
    outputs: list[OutputFile] = field(default_factory=list)
    schema_versions: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)

    def _record(self, name: str, stored: StoredObject) -> None:
        self.outputs.append(OutputFile(path=name, bytes=stored.size, sha256=stored.sha256))

    def place(self, name: str) -> str:
        """Where output `name` goes inside the stage directory (a shard's writer puts tables into part files)."""
        return name

    def write_rows(self, name: str, rows: list[dict], spec: TableSpec) -> pa.Table:
        table = build_table(rows, spec)
        path = self.place(name)
        self._record(path, self.store.write_table(f"{self.directory}/{path}", table))
        self.schema_versions[spec.name] = spec.version
        return table

    def write_dir(self, name: str, local_dir: Path) -> None:
        path = self.place(name)
        for relative, stored in self.store.upload_dir(local_dir, f"{self.directory}/{path}").items():
            self._record(f"{path}/{relative}", stored)


@dataclass(frozen=True)
class StageOutcome:
    """What running a stage (or one shard of it) left behind.

    `committed` is None after a shard whose siblings have not all committed yet (`shard` is that shard's own
    manifest), and on the ranks other than 0 of a distributed stage, which take part but never commit.
    """

    committed: CommittedStage | None
    skipped: bool
    shard: CommittedStage | None = None


def committed_as_asked(store: RunStore, stage: str, iteration: int, digest: str,
                       force: bool) -> CommittedStage | None:
    """The stage's commit if it was made with `digest` and no rewrite is forced: then running it is a no-op."""
    existing = read_committed(store, stage, iteration)
    if existing is not None and existing.manifest.input_digest == digest and not force:
        return existing
    return None


def commit_stage(
    store: RunStore,
    stage: str,
    iteration: int,
    digest: str,
    inputs: list[CommittedStage],
    force: bool,
    body: Callable[[StageWriter], None],
) -> StageOutcome:
    """Run `body` unless the stage already committed with this digest; write the manifest last."""
    existing = committed_as_asked(store, stage, iteration, digest, force)
    if existing is not None:
        return StageOutcome(existing, skipped=True)
    directory = stage_dir(stage, iteration)
    store.delete_prefix(directory)
    writer = StageWriter(store, directory)
    started = time.perf_counter()
    body(writer)
    manifest = writer_manifest(writer, stage, iteration, digest, inputs, time.perf_counter() - started)
    return StageOutcome(write_manifest(store, manifest_key(stage, iteration), manifest), skipped=False)


def writer_manifest(writer: StageWriter, stage: str, iteration: int, digest: str, inputs: list[CommittedStage],
                    seconds: float) -> Manifest:
    """The manifest of what `writer` wrote, made here and now."""
    return Manifest(
        stage=stage,
        iteration=iteration,
        run=writer.store.uri,
        input_digest=digest,
        inputs={c.key: c.sha256 for c in inputs},
        schema_versions=writer.schema_versions,
        outputs=writer.outputs,
        metrics=writer.metrics,
        details=writer.details,
        timings={"seconds": seconds},
        code_version=code_version(),
        host=socket.gethostname(),
        created_at=datetime.now(UTC),
    )


def write_manifest(store: RunStore, key: str, manifest: Manifest) -> CommittedStage:
    stored = store.write_bytes(key, manifest.model_dump_json(indent=2).encode())
    return CommittedStage(manifest, stored.sha256, key)
