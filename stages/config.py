"""The run configuration: one YAML file, validated by pydantic.

Every stage reads only its own section plus `run`; the input digest of a stage covers exactly the sections it
reads (see `manifest.input_digest`), so changing, say, the evaluation budget does not invalidate rollouts.
Unknown keys are errors, reported with their dotted path and the closest valid key, because a silently ignored
typo in an RL config costs a GPU-day.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(Section):
    name: str = "tiny-cpu"
    seed: int = 0
    iterations: int = Field(3, ge=0, description="DyPO iterations after warmstart")


class EnvConfig(Section):
    """Which game family to play and how hard; train and held-out tasks come from disjoint game folds."""

    family: Literal["twx-coin"] = "twx-coin"
    num_locations: int = Field(4, ge=1)
    include_doors: bool = True
    num_distractor_items: int = Field(0, ge=0)
    max_turns: int = Field(10, ge=1)
    max_observation_chars: int = Field(400, ge=16, description="observations are truncated to this length")


class ModelConfig(Section):
    """Shape of the locally built Qwen2-architecture policy (used only when warmstart builds it)."""

    vocab_size: int = Field(1024, ge=300, description="upper bound: BPE stops early on repetitive game text")
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 2048
    tokenizer_corpus_tasks: int = Field(200, ge=1, description="expert games whose text trains the tokenizer")


class WarmstartConfig(Section):
    """Supervised fine-tuning on expert trajectories before RL."""

    expert_tasks: int = Field(400, ge=1)
    steps: int = Field(60, ge=0)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)


class SamplingConfig(Section):
    temperature: float = Field(0.7, ge=0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(48, ge=1, description="token budget of one turn")


class RolloutConfig(Section):
    groups: int = Field(8, ge=1, description="tasks per rollout draw; each is played group_size times")
    group_size: int = Field(8, ge=2)
    batch_episodes: int = Field(32, ge=1, description="episodes generated together in one batch")
    sampling: SamplingConfig = SamplingConfig()
    reward: Literal["success", "score"] = Field("success", description="episode return: task success 0/1 or env score")
    malformed_penalty: float = Field(0.1, ge=0, description="subtracted from the return per malformed turn")


class FilterConfig(Section):
    """Rejection sampling (DESIGN.md §1.4) and the auxiliary-resampling budget."""

    target_groups: int = Field(4, ge=1, description="accepted groups wanted per iteration")
    max_extra_draws: int = Field(2, ge=0, description="auxiliary rollouts allowed when the batch is short")
    max_malformed_fraction: float = Field(0.5, ge=0, le=1)
    max_episode_tokens: int = Field(4096, ge=1)
    keep_partial_last_draw: bool = True
    std_normalize: bool = Field(True, description="divide group-centred returns by the group's std")
    advantage_eps: float = Field(1e-6, gt=0)


class OptimizeConfig(Section):
    learning_rate: float = Field(2e-4, gt=0)
    eps_low: float = Field(0.2, ge=0)
    eps_high: float = Field(0.28, ge=0)
    ppo_epochs: int = Field(1, ge=1)
    mini_batch_episodes: int | None = Field(None, ge=1, description="None = the whole batch in one update")
    micro_batch_episodes: int = Field(8, ge=1, description="episodes per forward pass (gradient accumulation)")
    max_grad_norm: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2] = 2


class PublishConfig(Section):
    model_name: str = "dypo-tiny"


class EvaluateConfig(Section):
    tasks: int = Field(32, ge=1)
    batch_episodes: int = Field(32, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    min_improvement: float = Field(0.0, description="champion moves when candidate >= champion + this")


class TrackingConfig(Section):
    """Where MLflow lives. None = a SQLite database under the local state directory (embedded default)."""

    mlflow_uri: str | None = None
    experiment: str = "dypo"


class PrefectConfig(Section):
    home: str | None = Field(None, description="PREFECT_HOME; None = .prefect inside a local run directory")


class Config(Section):
    run: RunConfig = RunConfig()
    env: EnvConfig = EnvConfig()
    model: ModelConfig = ModelConfig()
    warmstart: WarmstartConfig = WarmstartConfig()
    rollout: RolloutConfig = RolloutConfig()
    filter: FilterConfig = FilterConfig()
    optimize: OptimizeConfig = OptimizeConfig()
    publish: PublishConfig = PublishConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    prefect: PrefectConfig = PrefectConfig()

    @model_validator(mode="after")
    def _batch_fits_groups(self) -> Config:
        if self.filter.target_groups > self.rollout.groups * (1 + self.filter.max_extra_draws):
            raise ValueError(
                f"filter.target_groups={self.filter.target_groups} can never be reached with rollout.groups="
                f"{self.rollout.groups} and filter.max_extra_draws={self.filter.max_extra_draws}; "
                "lower target_groups or raise one of the others"
            )
        return self

    def section(self, *names: str) -> dict[str, Any]:
        """The named sections as plain data, for digests and logging."""
        return {name: getattr(self, name).model_dump(mode="json") for name in names}


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and how to fix it."""


def _valid_keys(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """The field names allowed at a dotted path inside the config models."""
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _explain(error: ValidationError, source: str) -> ConfigError:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        path = tuple(item["loc"])
        dotted = ".".join(str(p) for p in path) or "<root>"
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(Config, path[:-1])
            close = difflib.get_close_matches(str(path[-1]), valid, n=1)
            hint = f"did you mean '{'.'.join([*map(str, path[:-1]), close[0]])}'?" if close else (
                f"valid keys here: {', '.join(valid)}")
            lines.append(f"  - unknown key '{dotted}': {hint}")
        else:
            lines.append(f"  - {dotted}: {item['msg']} (got {item.get('input')!r})")
    return ConfigError("\n".join(lines))


def parse_config(data: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(data or {})
    except ValidationError as error:
        raise _explain(error, source) from None


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file such as "
                          "configs/tiny-cpu.yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return parse_config(data or {}, str(path))
