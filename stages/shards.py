"""Fan-out stages (DESIGN.md §3 "Shards"): N jobs each commit their own part; the stage commits once all have.

Shard i of N writes its tables as part files (`turns/part-0000i.parquet`) and then its shard manifest
(`shards/0000i-of-0000N.json`, the shard's own commit). Right after, it looks for all N shard manifests with its
own input digest; the shard that finds them all concludes the stage (stage-wide outputs such as evaluation
metrics) and writes the stage manifest, which lists every part file. So no coordinator is needed, and a stage whose
last shard died between its two commits is finished by rerunning any one shard.

Two shards can finish together and both conclude. That is safe because concluding is a pure function of the shard
manifests and their tables: the manifest's time, host and timings are taken from the shards, so both write the
same bytes, and the stage-wide side effects (registry aliases) are idempotent.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa

from dypo import code_version
from dypo.schemas.manifest import Manifest
from dypo.schemas.tables import TableSpec
from dypo.stages.commit import (
    CommittedStage,
    StageOutcome,
    StageWriter,
    manifest_key,
    read_manifest,
    read_table_parts,
    stage_dir,
    write_manifest,
    writer_manifest,
)
from dypo.stages.storage import RunStore


@dataclass(frozen=True)
class Shard:
    """Shard `index` (from 0) of `count`, as in `dypo stage rollout --shard 1/4`."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count} does not exist: write i/N with 0 <= i < N, "
                             "e.g. 0/4 for the first of four shards")

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match is None:
            raise ValueError(f"shard {text!r} is not i/N, e.g. 0/4 for the first of four shards")
        return cls(int(match[1]), int(match[2]))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def manifest_name(self) -> str:
        return f"shards/{self.index:05d}-of-{self.count:05d}.json"

    def part(self, name: str) -> str:
        """Where this shard writes table `name`: `turns.parquet` -> `turns/part-00002.parquet`."""
        if not name.endswith(".parquet"):
            raise ValueError(f"a shard writes tables only (part files), not {name!r}")
        return f"{name.removesuffix('.parquet')}/part-{self.index:05d}.parquet"

    def batches(self, total: int) -> range:
        """This shard's contiguous run of `total` batches; together the shards cover each batch once, in order."""
        return range(self.index * total // self.count, (self.index + 1) * total // self.count)


@dataclass
class ShardWriter(StageWriter):
    """A stage writer whose tables go to this shard's part files."""

    shard: Shard = field(kw_only=True)

    def place(self, name: str) -> str:
        return self.shard.part(name)


@dataclass(frozen=True)
class ShardParts:
    """What concluding a stage sees: every shard's manifest, and their tables read as one."""

    store: RunStore
    directory: str
    manifests: list[Manifest]

    def table(self, name: str, spec: TableSpec) -> pa.Table:
        outputs = [output for manifest in self.manifests for output in manifest.outputs]
        return read_table_parts(self.store, self.directory, outputs, name, spec)

    def total(self, metric: str) -> float:
        return sum(manifest.metrics[metric] for manifest in self.manifests)


def _delete(store: RunStore, key: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # a sibling shard removed it first
        store.fs.delete_file(store.path(key))


def commit_shard(
    store: RunStore,
    stage: str,
    iteration: int,
    digest: str,
    inputs: list[CommittedStage],
    force: bool,
    shard: Shard,
    body: Callable[[StageWriter], object],
    conclude: Callable[[StageWriter, ShardParts], None],
) -> StageOutcome:
    """Run `body` as one shard of the stage, then commit the stage if every shard has committed its part.

    A stage committed with this digest makes every shard a no-op, as for unsharded stages. A shard committed with
    this digest is not played again unless forced; either way the stage commits as soon as all parts are in.
    """
    existing = read_manifest(store, manifest_key(stage, iteration))
    if existing is not None and existing.manifest.input_digest == digest and not force:
        return StageOutcome(existing, skipped=True)
    if existing is not None:  # this shard's part is about to change: the stage is no longer committed
        _delete(store, manifest_key(stage, iteration))
    directory = stage_dir(stage, iteration)
    own_key = f"{directory}/{shard.manifest_name}"
    own = read_manifest(store, own_key)
    played = own is None or own.manifest.input_digest != digest or force
    if played:
        if own is not None:
            _delete(store, own_key)
        writer = ShardWriter(store, directory, shard=shard)
        started = time.perf_counter()
        body(writer)
        writer.details["shard"] = str(shard)
        own = write_manifest(store, own_key, writer_manifest(writer, stage, iteration, digest, inputs,
                                                             time.perf_counter() - started))
    committed = _commit_if_complete(store, stage, iteration, digest, inputs, shard.count, conclude)
    return StageOutcome(committed, skipped=not played and committed is None, shard=own)


def _commit_if_complete(store: RunStore, stage: str, iteration: int, digest: str, inputs: list[CommittedStage],
                        count: int, conclude: Callable[[StageWriter, ShardParts], None]) -> CommittedStage | None:
    directory = stage_dir(stage, iteration)
    parts = [read_manifest(store, f"{directory}/{Shard(i, count).manifest_name}") for i in range(count)]
    manifests = [part.manifest for part in parts if part is not None and part.manifest.input_digest == digest]
    if len(manifests) < count:
        return None
    writer = StageWriter(store, directory)
    conclude(writer, ShardParts(store, directory, manifests))
    seconds = [manifest.timings["seconds"] for manifest in manifests]
    manifest = Manifest(
        stage=stage,
        iteration=iteration,
        run=store.uri,
        input_digest=digest,
        inputs={c.key: c.sha256 for c in inputs},
        schema_versions={k: v for m in manifests for k, v in m.schema_versions.items()} | writer.schema_versions,
        outputs=[output for m in manifests for output in m.outputs] + writer.outputs,
        metrics=writer.metrics,
        details={**writer.details, "shards": str(count)},
        timings={"seconds": max(seconds), "shard_seconds": sum(seconds)},
        code_version=code_version(),
        host=",".join(sorted({m.host for m in manifests})),
        created_at=max(m.created_at for m in manifests),
    )
    return write_manifest(store, manifest_key(stage, iteration), manifest)
