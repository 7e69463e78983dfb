"""The single validation path every Parquet reader goes through.

A stage that trusts a file it did not write must fail loudly and early, naming the file and the field, instead
of training on a silently misaligned column three stages later.
"""

from __future__ import annotations

import pyarrow as pa

from dypo.schemas.tables import NAME_KEY, VERSION_KEY, TableSpec


class SchemaError(ValueError):
    """An artifact that does not match the schema its reader expects."""


def conform(table: pa.Table, spec: TableSpec, source: str) -> pa.Table:
    """Check `table` (read from `source`) against `spec` and return it in the spec's column order.

    Accepted: the same major version, any minor; extra columns (added by a newer minor) are kept. Rejected: a
    different schema name, an unknown major version, a missing column, a column of another type.
    """
    metadata = table.schema.metadata or {}
    name = metadata.get(NAME_KEY, b"").decode()
    version = metadata.get(VERSION_KEY, b"").decode()
    if not version:
        raise SchemaError(f"{source}: no '{VERSION_KEY.decode()}' in the Parquet metadata; it was not written by "
                          f"dypo as a '{spec.name}' table. Regenerate it with the stage that owns it.")
    if name != spec.name:
        raise SchemaError(f"{source}: holds a '{name}' table, expected '{spec.name}'")
    major = version.split(".")[0]
    if major != str(spec.major):
        raise SchemaError(f"{source}: '{spec.name}' schema version {version} is not readable by this version of "
                          f"dypo (reads major {spec.major}); use a dypo release that reads {major}.x or rerun "
                          "the producing stage with --force")
    for field in spec.schema:
        if field.name not in table.column_names:
            raise SchemaError(f"{source}: column '{field.name}' is missing (schema '{spec.name}' {spec.version})")
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise SchemaError(f"{source}: column '{field.name}' has type {actual}, expected {field.type} "
                              f"(schema '{spec.name}' {spec.version})")
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"{source}: column '{field.name}' has null values but must not")
    extra = [c for c in table.column_names if c not in spec.schema.names]
    return table.select(spec.schema.names + extra)


def build_table(rows: list[dict], spec: TableSpec) -> pa.Table:
    """Rows → a table carrying the spec's name and version (writers use this, readers `conform`)."""
    return pa.Table.from_pylist(rows, schema=spec.with_metadata())
