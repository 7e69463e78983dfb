"""`dypo`: train, rerun one stage, run one stage (the container entrypoint), show configs and environments."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs.")
app.add_typer(config_app, name="config")
envs_app = typer.Typer(no_args_is_help=True, help="Inspect environment families.")
app.add_typer(envs_app, name="envs")
console = Console()

# The environment variables stand in for the options under torchrun, whose own parser takes `--run` for an
# abbreviation of its `--run-path` (k8s/optimize-multinode).
RunOption = Annotated[str, typer.Option("--run", envvar="DYPO_RUN_URI",
                                        help="run URI: a local path, file://… or s3://bucket/prefix")]
IterOption = Annotated[int, typer.Option("--iter", envvar="DYPO_ITERATION", min=0, help="iteration (0 = warmstart)")]
DrawOption = Annotated[int, typer.Option("--draw", min=0, help="rollout draw (0 = main, ≥1 = auxiliary)")]
PresetOption = Annotated[list[str] | None, typer.Option(
    "--preset", help="algorithm preset applied on top of --config: dypo, grpo, dapo-style (or a YAML path)")]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", help="override one value, e.g. --set optimize.kl_coef=0.04 (repeatable, applied last)")]


def _use_local_prefect(run_uri: str, home: str | None) -> None:
    """Embedded Prefect: a temporary local server whose state lives inside the run directory (or `home`).

    Must run before Prefect is imported: Prefect reads these settings at import time. A configured Prefect API
    (PREFECT_API_URL) is left alone, so the same command drives a real server.
    """
    if os.environ.get("PREFECT_API_URL"):
        return
    from dypo.stages.context import cache_dir
    from dypo.stages.storage import RunStore

    store = RunStore(run_uri)
    default = Path(store.path(".prefect")) if store.is_local else cache_dir() / "prefect"
    os.environ.setdefault("PREFECT_HOME", str(Path(home) if home else default))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _fail(error: Exception) -> typer.Exit:
    console.print(f"[red]error:[/red] {error}", soft_wrap=True)  # URIs and paths stay copyable
    return typer.Exit(code=2)


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", help="YAML config, e.g. configs/tiny-cpu.yaml")],
    run: Annotated[str | None, typer.Option("--run", help="run URI (default runs/<run.name>)")] = None,
    preset: PresetOption = None,
    override: SetOption = None,
) -> None:
    """Warmstart, then on-policy DyPO iterations; rerun on the same --run to resume."""
    from dypo.stages.config import ConfigError, load_config
    from dypo.stages.context import create_run

    try:
        cfg = load_config(config, preset or [], override or [])
        run_uri = run or f"runs/{cfg.run.name}"
        ctx = create_run(run_uri, cfg)
    except ConfigError as error:
        raise _fail(error) from None
    _use_local_prefect(ctx.store.uri, ctx.config.prefect.home)
    from dypo.flows.train import train as train_flow

    evaluations = train_flow(ctx.store.uri)
    _print_results(ctx.store.uri, ctx.config.tracking.mlflow_uri or "", evaluations)


def _print_results(run_uri: str, mlflow_uri: str, evaluations: list) -> None:
    table = Table(title="held-out evaluation (greedy)")
    for column in ("iteration", "success rate", "mean return", "champion moved"):
        table.add_column(column)
    for summary in evaluations:
        table.add_row(str(summary.iteration), f"{summary.metrics['success_rate']:.3f}",
                      f"{summary.metrics['mean_return']:.3f}", summary.details.get("champion_moved", ""))
    console.print(table)
    console.print(f"run: [bold]{run_uri}[/bold]  (Parquet under iter-*/; evaluation in iter-*/evaluate/)")
    console.print(f"MLflow: {mlflow_uri}   →  mlflow ui --backend-store-uri {mlflow_uri}")
    first, last = evaluations[0].metrics["success_rate"], evaluations[-1].metrics["success_rate"]
    console.print(f"held-out success: warmstart {first:.3f} → final {last:.3f}")
    promoted = [e for e in evaluations if e.details.get("champion_moved") == "True"]
    console.print(f"registry alias 'champion': iteration {promoted[-1].iteration} of this run "
                  f"({promoted[-1].metrics['success_rate']:.3f})" if promoted else
                  "registry alias 'champion': unchanged, an earlier run's model is at least as good")
    console.print(f"final evaluation success rate: {last:.3f}")


@app.command()
def rerun(
    run: RunOption,
    iteration: IterOption,
    stage: Annotated[str, typer.Option("--stage", help="warmstart|rollout|filter|optimize|publish|evaluate")],
    draw: DrawOption = 0,
) -> None:
    """Rewrite one stage of one past iteration through the Prefect `rerun_stage` flow."""
    from dypo.stages.context import open_run

    try:
        ctx = open_run(run)
    except ValueError as error:
        raise _fail(error) from None
    _use_local_prefect(ctx.store.uri, ctx.config.prefect.home)
    from dypo.flows.train import rerun_stage

    rerun_stage(ctx.store.uri, stage, iteration, draw=draw)


@app.command("stage")
def stage_command(
    name: Annotated[str, typer.Argument(help="warmstart|rollout|filter|optimize|publish|evaluate")],
    run: RunOption,
    iteration: IterOption,
    draw: DrawOption = 0,
    force: Annotated[bool, typer.Option("--force", help="rewrite even when committed with the same inputs")] = False,
    shard: Annotated[str | None, typer.Option(
        "--shard", help="i/N: play shard i (from 0) of N of rollout or evaluate; the stage commits when all N have")
    ] = None,
) -> None:
    """Run one stage in this process, without Prefect (what each container runs)."""
    from dypo.stages.commit import StageNotComplete
    from dypo.stages.registry import run_stage
    from dypo.stages.shards import Shard

    try:
        run_stage(run, name, iteration, draw=draw, force=force, shard=Shard.parse(shard) if shard else None)
    except (StageNotComplete, ValueError) as error:
        raise _fail(error) from None


@config_app.command("show")
def config_show(
    config: Annotated[Path | None, typer.Option("--config", help="a YAML config file")] = None,
    run: Annotated[str | None, typer.Option("--run", help="show the config frozen into this run")] = None,
    preset: PresetOption = None,
    override: SetOption = None,
) -> None:
    """Print the resolved config (all defaults filled in) as YAML."""
    from dypo.stages.config import ConfigError, load_config
    from dypo.stages.context import open_run, resolve_config

    try:
        if run:
            resolved = open_run(run).config
        elif config:
            resolved = resolve_config(load_config(config, preset or [], override or []))
        else:
            raise ConfigError("pass --config FILE or --run URI")
    except ConfigError as error:
        raise _fail(error) from None
    typer.echo(yaml.safe_dump(resolved.model_dump(mode="json"), sort_keys=False), nl=False)



@envs_app.command("list")
def envs_list(
    config: Annotated[Path | None, typer.Option(
        "--config", help="judge availability with this config's env section (data paths, servers)")] = None,
) -> None:
    """Every registered environment family: whether it can run here, and how to enable it if not."""
    from dypo.stages.config import ConfigError, EnvConfig, load_config
    from dypo.stages.environments import Status
    from dypo.stages.environments.families import FAMILIES, family_availability, family_class

    try:
        env = load_config(config).env if config else EnvConfig()
    except ConfigError as error:
        raise _fail(error) from None
    table = Table(title="environment families (select one with env.family)")
    table.add_column("family", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for column in ("game", "detail", "to enable"):
        table.add_column(column, overflow="fold")
    for name in FAMILIES:
        found = family_availability(name, env)
        description = family_class(name).description if found.status != Status.NOT_INSTALLED else ""
        colour = "green" if found.status == Status.AVAILABLE else "yellow"
        table.add_row(name, f"[{colour}]{found.status}[/{colour}]", description, found.detail, found.enable)
    console.print(table)


if __name__ == "__main__":
    app()
