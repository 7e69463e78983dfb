"""The stage manifest: the commit record of one stage of one iteration (DESIGN.md §3)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_VERSION = "1.0"


class OutputFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="relative to the stage directory")
    bytes: int
    sha256: str


class Manifest(BaseModel):
    """Written last by a stage; its existence is what makes the stage's outputs visible to later stages."""

    model_config = ConfigDict(extra="forbid")

    manifest_version: str = MANIFEST_VERSION
    stage: str
    iteration: int
    run: str
    input_digest: str
    inputs: dict[str, str] = Field(default_factory=dict, description="input manifest path -> its sha256")
    schema_versions: dict[str, str] = Field(default_factory=dict)
    outputs: list[OutputFile] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict)
    details: dict[str, str] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    code_version: str
    host: str
    created_at: datetime
