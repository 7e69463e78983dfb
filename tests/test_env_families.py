"""The family registry and `dypo envs list`."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from dypo import cli
from dypo.stages.config import Config, ConfigError, EnvConfig, parse_config
from dypo.stages.context import check_task_budget
from dypo.stages.environments import Status
from dypo.stages.environments.families import FAMILIES, configurable_families, family_availability, family_class
from dypo.stages.environments.protocol import EnvFamily


def test_every_registered_family_is_configurable_and_importable() -> None:
    assert sorted(configurable_families()) == sorted(FAMILIES)
    for name in FAMILIES:
        family = family_class(name)
        assert issubclass(family, EnvFamily) and family.name == name and family.description
    with pytest.raises(ValueError, match=r"unknown env\.family 'nope'; known families: .*twx-coin"):
        family_class("nope")


def test_a_family_whose_module_does_not_import_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FAMILIES, "missing", "no_such_env_module:Family")
    found = family_availability("missing", EnvConfig())
    assert found.status == Status.NOT_INSTALLED and "cannot import no_such_env_module" in found.detail


def test_a_run_needs_an_available_family_with_valid_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FAMILIES, "test-counter", "counter_env:CounterFamily")
    needs_data = Config().model_copy(update={"env": EnvConfig().model_copy(update={"family": "test-counter"})})
    with pytest.raises(ConfigError, match=r"env\.family test-counter is not usable here \(needs data\): a test "
                                          "family with no data; to enable it: nothing to enable"):
        check_task_budget(needs_data)
    foreign_option = parse_config({"env": {"family": "twx-sorting", "twx": {"num_locations": 3}}})
    with pytest.raises(ConfigError, match=r"invalid env section: env\.twx\.num_locations does not apply"):
        check_task_budget(foreign_option)
    check_task_budget(parse_config({"env": {"family": "twx-sorting"}}))


def _envs_list(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, dict[str, str]]:
    """Run `dypo envs list`; return its exit code and each table row's text (wrapped lines joined) by family."""
    monkeypatch.setattr(cli, "console", Console(width=250, no_color=True))
    result = CliRunner().invoke(cli.app, ["envs", "list", *args])
    if result.exit_code != 0:
        return result.exit_code, {"output": result.output}
    rows: dict[str, str] = {}
    name = ""
    for line in result.output.splitlines():
        if line.startswith("│"):
            name = line.split("│")[1].strip() or name  # a blank first cell continues the row above
            rows[name] = rows.get(name, "") + line
    return result.exit_code, rows


def test_envs_list_shows_every_family_with_its_status_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FAMILIES, "missing", "no_such_env_module:Family")
    monkeypatch.setitem(FAMILIES, "test-counter", "counter_env:CounterFamily")
    code, rows = _envs_list(monkeypatch)
    assert code == 0
    assert set(rows) == set(FAMILIES)
    for name in FAMILIES:
        if name.startswith("twx-"):
            assert "│ available " in rows[name] and "textworld-express 1.1" in rows[name]
    assert "│ not installed " in rows["missing"] and "cannot import no_such_env_module" in rows["missing"]
    assert "│ needs data " in rows["test-counter"] and "nothing to enable" in rows["test-counter"]


def test_envs_list_reads_a_config_and_reports_a_bad_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "env.yaml"
    config.write_text("env:\n  family: twx-sorting\n")
    code, rows = _envs_list(monkeypatch, "--config", str(config))
    assert code == 0 and "│ available " in rows["twx-sorting"]
    config.write_text("env:\n  famly: twx-sorting\n")
    code, rows = _envs_list(monkeypatch, "--config", str(config))
    assert code == 2 and "unknown key 'env.famly': did you mean 'env.family'?" in rows["output"]
