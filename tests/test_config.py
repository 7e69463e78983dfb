from pathlib import Path

import pytest
from typer.testing import CliRunner

from dypo.cli import app
from dypo.stages.config import ConfigError, load_config, parse_config
from dypo.stages.context import create_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_embedded_default_loads():
    config = load_config(CONFIGS / "tiny-cpu.yaml")
    assert config.env.family == "twx-coin"
    assert config.rollout.group_size >= 2


def test_unknown_key_names_its_path_and_a_suggestion():
    with pytest.raises(ConfigError) as error:
        parse_config({"rollout": {"group_sise": 4}}, "c.yaml")
    assert "unknown key 'rollout.group_sise'" in str(error.value)
    assert "did you mean 'rollout.group_size'?" in str(error.value)


def test_unknown_nested_key_and_section():
    nested = r"unknown key 'rollout\.sampling\.temprature'.*rollout\.sampling\.temperature"
    with pytest.raises(ConfigError, match=nested):
        parse_config({"rollout": {"sampling": {"temprature": 1.0}}})
    with pytest.raises(ConfigError, match=r"unknown key 'optimise'.*did you mean 'optimize'"):
        parse_config({"optimise": {}})


def test_wrong_value_is_explained():
    with pytest.raises(ConfigError, match=r"rollout\.group_size: Input should be greater than or equal to 2"):
        parse_config({"rollout": {"group_size": 1}})


def test_unreachable_batch_target_is_rejected():
    with pytest.raises(ConfigError, match="can never be reached"):
        parse_config({"rollout": {"groups": 2}, "filter": {"target_groups": 9, "max_extra_draws": 1}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_config_show_prints_resolved_config():
    result = CliRunner().invoke(app, ["config", "show", "--config", str(CONFIGS / "tiny-cpu.yaml")])
    assert result.exit_code == 0, result.output
    assert "group_size: 8" in result.output
    assert "mlflow_uri: sqlite:///" in result.output


def test_config_show_reports_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("evaluate:\n  taks: 3\n")
    result = CliRunner().invoke(app, ["config", "show", "--config", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2
    assert "evaluate.tasks" in result.output


def test_a_run_that_would_exhaust_the_games_is_refused_before_it_starts(tmp_path):
    config = parse_config({"run": {"iterations": 200}, "tracking": {"mlflow_uri": f"sqlite:///{tmp_path}/m.db"}})
    with pytest.raises(ConfigError, match=r"the run may need 5200 training games .* has 1000; lower one of these"):
        create_run(str(tmp_path / "run"), config)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"evaluate\.tasks=5000 exceeds the 1000 held-out games"):
        create_run(str(tmp_path / "run"), parse_config({"evaluate": {"tasks": 5000}}))


def test_resuming_with_another_config_is_refused(tmp_path):
    create_run(str(tmp_path / "run"), parse_config({"tracking": {"mlflow_uri": f"sqlite:///{tmp_path}/m.db"}}))
    changed = parse_config({"rollout": {"groups": 4}, "tracking": {"mlflow_uri": f"sqlite:///{tmp_path}/m.db"}})
    with pytest.raises(ConfigError, match=r"was started with a different config .*sections differ: rollout"):
        create_run(str(tmp_path / "run"), changed)


def test_stage_command_names_unknown_stages_and_missing_runs(tmp_path):
    missing = CliRunner().invoke(app, ["stage", "rollout", "--run", str(tmp_path / "nope"), "--iter", "1"])
    assert missing.exit_code == 2 and "is not a dypo run" in missing.output
    create_run(str(tmp_path / "run"), parse_config({"tracking": {"mlflow_uri": f"sqlite:///{tmp_path}/m.db"}}))
    unknown = CliRunner().invoke(app, ["stage", "rollouts", "--run", str(tmp_path / "run"), "--iter", "1"])
    assert unknown.exit_code == 2 and "unknown stage 'rollouts'" in unknown.output


def test_the_dypo_preset_is_the_default():
    assert load_config(CONFIGS / "tiny-cpu.yaml", ["dypo"]).model_copy(
        update={"run": load_config(CONFIGS / "tiny-cpu.yaml").run}) == load_config(CONFIGS / "tiny-cpu.yaml")


@pytest.mark.parametrize("preset", ["grpo", "dapo-style"])
def test_presets_change_only_algorithm_switches_and_are_recorded(preset):
    base, varied = load_config(CONFIGS / "tiny-cpu.yaml"), load_config(CONFIGS / "tiny-cpu.yaml", [preset])
    changed = {name for name in type(base).model_fields if getattr(base, name) != getattr(varied, name)}
    assert changed == {"run", "filter", "optimize"}
    assert varied.run.presets == [preset]


def test_grpo_has_a_kl_term_and_no_resampling_and_dapo_clips_higher():
    grpo = load_config(CONFIGS / "tiny-cpu.yaml", ["grpo"])
    assert grpo.optimize.kl_coef > 0 and grpo.filter.max_extra_draws == 0 and not grpo.filter.reject_zero_variance
    dapo = load_config(CONFIGS / "tiny-cpu.yaml", ["dapo-style"])
    assert dapo.optimize.eps_high > dapo.optimize.eps_low and dapo.filter.reject_zero_variance
    assert dapo.optimize.loss_aggregation == "token_mean" and grpo.optimize.loss_aggregation == "sample_mean"


def test_overrides_apply_last_with_yaml_values():
    config = load_config(CONFIGS / "tiny-cpu.yaml", ["grpo"], ["optimize.kl_coef=0.1", "filter.std_normalize=false"])
    assert config.optimize.kl_coef == 0.1 and config.filter.std_normalize is False
    assert config.run.overrides == ["optimize.kl_coef=0.1", "filter.std_normalize=false"]


def test_bad_presets_and_overrides_are_explained():
    with pytest.raises(ConfigError, match=r"no preset 'ppo'.*dypo, grpo, dapo-style"):
        load_config(CONFIGS / "tiny-cpu.yaml", ["ppo"])
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        load_config(CONFIGS / "tiny-cpu.yaml", [], ["optimize.kl_coef"])
    with pytest.raises(ConfigError, match=r"unknown key 'optimize\.kl_coeff'.*did you mean 'optimize\.kl_coef'"):
        load_config(CONFIGS / "tiny-cpu.yaml", [], ["optimize.kl_coeff=0.1"])


def test_history_window_needs_per_turn_samples():
    with pytest.raises(ConfigError, match=r"history_window.*per_turn"):
        parse_config({"rollout": {"history_window": 2}})
    assert parse_config({"rollout": {"history_window": 2}, "optimize": {"sample_form": "per_turn"}})


def test_config_show_applies_presets_from_the_cli():
    result = CliRunner().invoke(app, ["config", "show", "--config", str(CONFIGS / "tiny-cpu.yaml"),
                                      "--preset", "grpo", "--set", "optimize.kl_coef=0.2"])
    assert result.exit_code == 0, result.output
    assert "kl_coef: 0.2" in result.output and "- grpo" in result.output


def test_the_run_records_the_env_familys_prompt(tmp_path):
    from dypo.stages.environments.families import get_family

    config = load_config(CONFIGS / "tiny-cpu.yaml")
    assert config.env.system_prompt is None
    ctx = create_run(str(tmp_path / "run"), config.model_copy(update={"tracking": config.tracking.model_copy(
        update={"mlflow_uri": f"sqlite:///{tmp_path}/m.db"})}))
    recorded = ctx.store.read_json("run.json")["config"]["env"]["system_prompt"]
    assert recorded == get_family(config.env).default_system_prompt and "<action>" in recorded


def test_evaluation_splits_are_distinct_and_known_to_the_family(tmp_path):
    with pytest.raises(ConfigError, match="lists a split twice"):
        parse_config({"evaluate": {"splits": ["heldout", "heldout"]}})
    with pytest.raises(ConfigError, match="splits"):
        parse_config({"evaluate": {"splits": []}})
    from dypo.stages.environments import get_family

    family = get_family(parse_config({}).env)
    with pytest.raises(ValueError, match="has no split 'unseen'; its splits are train, heldout"):
        family.make_tasks("unseen", 2)
