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
    key = manifest_key(stage, iteration)
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

    def write_rows(self, name: str, rows: list[dict], spec: TableSpec) -> pa.Table:
        table = build_table(rows, spec)
        self._record(name, self.store.write_table(f"{self.directory}/{name}", table))
        self.schema_versions[spec.name] = spec.version
        return table

    def write_dir(self, name: str, local_dir: Path) -> None:
        for relative, stored in self.store.upload_dir(local_dir, f"{self.directory}/{name}").items():
            self._record(f"{name}/{relative}", stored)


@dataclass(frozen=True)
class StageOutcome:
    committed: CommittedStage
    skipped: bool


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
    existing = read_committed(store, stage, iteration)
    if existing is not None and existing.manifest.input_digest == digest and not force:
        return StageOutcome(existing, skipped=True)
    directory = stage_dir(stage, iteration)
    store.delete_prefix(directory)
    writer = StageWriter(store, directory)
    started = time.perf_counter()
    body(writer)
    manifest = Manifest(
        stage=stage,
        iteration=iteration,
        run=store.uri,
        input_digest=digest,
        inputs={c.key: c.sha256 for c in inputs},
        schema_versions=writer.schema_versions,
        outputs=writer.outputs,
        metrics=writer.metrics,
        details=writer.details,
        timings={"seconds": time.perf_counter() - started},
        code_version=code_version(),
        host=socket.gethostname(),
        created_at=datetime.now(UTC),
    )
    key = manifest_key(stage, iteration)
    stored = store.write_bytes(key, manifest.model_dump_json(indent=2).encode())
    return StageOutcome(CommittedStage(manifest, stored.sha256, key), skipped=False)
