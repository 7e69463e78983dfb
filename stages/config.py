"""The run configuration: one YAML file, validated by pydantic.

Every stage reads only its own section plus `run`; the input digest of a stage covers exactly the sections it
reads (see `manifest.input_digest`), so changing, say, the evaluation budget does not invalidate rollouts.
Unknown keys are errors, reported with their dotted path and the closest valid key, because a silently ignored
typo in an RL config costs a GPU-day.
"""

from __future__ import annotations

import difflib
import importlib.metadata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(Section):
    name: str = "tiny-cpu"
    seed: int = 0
    iterations: int = Field(3, ge=0, description="DyPO iterations after warmstart")
    presets: list[str] = Field(default_factory=list, description="presets applied on top of the config file")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE overrides applied last")


class TwxOptions(Section):
    """TextWorldExpress game generation parameters (the `twx-*` families).

    None leaves a parameter to the family: twx-coin plays 4 rooms with doors and no distractors (small enough for
    the tiny default policy), the other games TextWorldExpress's own defaults. Setting a parameter the chosen game
    does not have (rooms in twx-sorting, say) is an error, not silently ignored.
    """

    num_locations: int | None = Field(None, ge=1, description="rooms (coin, cookingworld, twc, mapreader)")
    include_doors: bool | None = Field(None, description="doors between rooms (coin, cookingworld, twc, mapreader)")
    num_distractor_items: int | None = Field(None, ge=0, description="items no task needs (coin, cookingworld)")


AlfworldTaskType = Literal[
    "pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place",
]


class AlfworldOptions(Section):
    """ALFWorld (the `alfworld` and `alfworld-generated` families); splits train, heldout, unseen.

    Generated games depend only on `generation_seed` (and the pinned alfworld version), not on the counts: raising a
    count adds games, it never changes those already made.
    """

    data_dir: str | None = Field(None, description="the official games (the directory alfworld-download fills); "
                                 "None = $ALFWORLD_DATA")
    task_types: list[AlfworldTaskType] = Field(
        default_factory=lambda: list(AlfworldTaskType.__args__), min_length=1, description="ALFWorld task types played")
    generation_seed: int = Field(0, ge=0, description="which set of generated games (alfworld-generated)")
    train_games_per_type: int = Field(500, ge=1, description="generated train games per task type")
    heldout_games_per_type: int = Field(24, ge=1, description="generated games per task type in the training rooms")
    unseen_games_per_type: int = Field(24, ge=1, description="generated games per task type in unseen rooms")
    games_dir: str | None = Field(None, description="cache of generated games; None = under DYPO_CACHE_DIR")
    show_admissible_commands: bool = Field(False, description="append the admissible commands to every observation")

    @model_validator(mode="after")
    def _distinct_task_types(self) -> AlfworldOptions:
        if len(set(self.task_types)) != len(self.task_types):
            raise ValueError(f"task_types lists a type twice: {self.task_types}")
        return self


class TextWorldOptions(Section):
    """TextWorld's generated games (the `textworld-coin`, `-treasure` and `-cooking` families).

    A game is a pure function of its family's difficulty settings, its split and its index: raising a game count
    adds games, changing a difficulty setting plays (and caches) another set of games.
    """

    coin_level: int = Field(5, ge=1, le=300, description="textworld-coin: 1-100 a chain of `level` rooms; 101-200 "
                            "adds a dead end beside each room; 201-300 adds distractor rooms at random")
    treasure_level: int = Field(5, ge=1, le=30, description="textworld-treasure: 1-10 five open rooms; 11-20 ten "
                                "rooms with closed doors and containers; 21-30 twenty rooms with locked ones")
    cooking_recipe: int = Field(1, ge=1, le=5, description="textworld-cooking: ingredients in the recipe")
    cooking_take: int = Field(1, ge=0, le=5, description="ingredients to find (the rest start in the inventory)")
    cooking_rooms: Literal[1, 6, 9, 12] = Field(1, description="rooms of the house")
    cooking_open: bool = Field(True, description="containers and doors start closed")
    cooking_cook: bool = Field(False, description="ingredients must be cooked (roast, fry or grill)")
    cooking_cut: bool = Field(False, description="ingredients must be cut (slice, dice or chop)")
    cooking_drop: bool = Field(False, description="the inventory holds only so much")
    cooking_heldout_foods: Literal["unseen", "seen"] = Field(
        "unseen", description="heldout cooking games use foods and preparations never trained on (TextWorld's test "
        "distribution) or the training ones")
    train_games: int = Field(1000, ge=1, le=1_000_000, description="games in the train split")
    heldout_games: int = Field(100, ge=1, le=1_000_000, description="games in the heldout split")
    games_dir: str | None = Field(None, description="cache of generated games; None = under DYPO_CACHE_DIR")
    show_admissible_commands: bool = Field(False, description="append the admissible commands to every observation")

    @model_validator(mode="after")
    def _playable(self) -> TextWorldOptions:
        if self.cooking_take > self.cooking_recipe:
            raise ValueError(f"cooking_take ({self.cooking_take}) cannot exceed cooking_recipe "
                             f"({self.cooking_recipe}): only recipe ingredients are fetched")
        quest_length, distractors = (self.coin_level - 1) % 100 + 1, (self.coin_level - 1) // 100
        if quest_length * (distractors + 1) > 100:
            raise ValueError(f"coin_level {self.coin_level} needs {quest_length * (distractors + 1)} rooms; "
                             "TextWorld 1.7 games hold at most 100 (use a level whose last two digits are <= 33)")
        return self


ScienceWorldTask = Literal[
    "boil", "change-the-state-of-matter-of", "chemistry-mix", "chemistry-mix-paint-secondary-color",
    "chemistry-mix-paint-tertiary-color", "find-animal", "find-living-thing", "find-non-living-thing", "find-plant",
    "freeze", "grow-fruit", "grow-plant", "identify-life-stages-1", "identify-life-stages-2",
    "inclined-plane-determine-angle", "inclined-plane-friction-named-surfaces",
    "inclined-plane-friction-unnamed-surfaces", "lifespan-longest-lived", "lifespan-longest-lived-then-shortest-lived",
    "lifespan-shortest-lived", "measure-melting-point-known-substance", "measure-melting-point-unknown-substance",
    "melt", "mendelian-genetics-known-plant", "mendelian-genetics-unknown-plant", "power-component",
    "power-component-renewable-vs-nonrenewable-energy", "test-conductivity",
    "test-conductivity-of-unknown-substances", "use-thermometer",
]
ScienceWorldSimplification = Literal[
    "easy", "teleportAction", "selfWateringFlowerPots", "openContainers", "openDoors", "noElectricalAction"]


class ScienceWorldOptions(Section):
    """ScienceWorld (the `scienceworld` family); splits train, heldout (its dev variations) and test."""

    task_names: list[ScienceWorldTask] = Field(
        default_factory=lambda: list(ScienceWorldTask.__args__), min_length=1, description="tasks played")
    simplifications: list[ScienceWorldSimplification] = Field(
        default_factory=list, description="ScienceWorld's simplifications; `easy` = all of them")

    @model_validator(mode="after")
    def _distinct(self) -> ScienceWorldOptions:
        for name, values in (("task_names", self.task_names), ("simplifications", self.simplifications)):
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists an entry twice: {values}")
        return self


class WebShopOptions(Section):
    """WebShop (the `webshop` family), played over HTTP against a WebShop server the user runs.

    Goals are WebShop's shuffled goal list, split as WebShop's own baselines split it: the first `test_goals`
    are the test split, the next `heldout_goals` the heldout split, the rest up to `goal_count` train.
    """

    url: str = Field("http://127.0.0.1:3000", description="base URL of the WebShop server (web_agent_site.app)")
    goal_count: int = Field(12087, ge=3, description="goals the server holds (12087 with the full data)")
    test_goals: int = Field(500, ge=1)
    heldout_goals: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _splits_fit(self) -> WebShopOptions:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if self.test_goals + self.heldout_goals >= self.goal_count:
            raise ValueError(f"test_goals + heldout_goals ({self.test_goals + self.heldout_goals}) must be less than "
                             f"goal_count ({self.goal_count}), leaving goals to train on")
        return self


class EnvConfig(Section):
    """Which game family to play and how; train and held-out tasks come from disjoint game folds.

    Options shared by every family sit here; each family's own options sit in its sub-section (`twx`, …).
    """

    family: Literal[
        "twx-coin", "twx-cookingworld", "twx-twc", "twx-mapreader", "twx-sorting", "twx-arithmetic",
        "alfworld", "alfworld-generated", "textworld-coin", "textworld-treasure", "textworld-cooking", "scienceworld",
        "webshop",
    ] = "twx-coin"
    max_turns: int = Field(10, ge=1)
    max_observation_chars: int = Field(400, ge=16, description="observations are truncated to this length")
    system_prompt: str | None = Field(None, description="None = the family's default prompt (recorded in run.json)")
    reset_timeout_s: float = Field(120.0, gt=0, description="a reset slower than this loses its episode")
    step_timeout_s: float = Field(30.0, gt=0, description="a step slower than this loses its episode")
    twx: TwxOptions = TwxOptions()
    alfworld: AlfworldOptions = AlfworldOptions()
    textworld: TextWorldOptions = TextWorldOptions()
    scienceworld: ScienceWorldOptions = ScienceWorldOptions()
    webshop: WebShopOptions = WebShopOptions()


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
    reward: Literal["success", "score", "shaped"] = Field(
        "success", description="episode return: task success 0/1, the env's score, or success + shaping_weight*score")
    shaping_weight: float = Field(0.5, ge=0, description="weight of the env's score in the `shaped` return")
    malformed_penalty: float = Field(0.0, ge=0, description=(
        "subtracted from the return per malformed turn; above 0, a group in which every episode fails still has "
        "a spread of returns, which std normalisation scales up to a full advantage and zero-variance rejection "
        "no longer catches"))
    check_admissible: bool = Field(
        True, description="an action outside the env's admissible commands (when it lists them) is malformed")
    on_malformed: Literal["skip", "noop"] = Field(
        "skip", description="after a malformed turn the env receives nothing, or its no-op command (e.g. look)")
    history_window: int | None = Field(
        None, ge=1, description="None = the whole episode in context (one KV cache across turns); K = the prompt "
        "and the last K turns, re-encoded each turn (needs optimize.sample_form: per_turn)")
    max_context_tokens: int = Field(
        2048, ge=64, description="an episode whose context would exceed this ends with termination context_full")


class FilterConfig(Section):
    """Rejection sampling (DESIGN.md §1.4) and the auxiliary-resampling budget."""

    target_groups: int = Field(4, ge=1, description="accepted groups wanted per iteration")
    max_extra_draws: int = Field(2, ge=0, description="auxiliary rollouts allowed when the batch is short")
    reject_zero_variance: bool = Field(True, description="drop groups whose returns are all equal (no signal)")
    max_malformed_fraction: float = Field(
        0.5, ge=0, le=1, description="reject an episode whose share of turns that break the turn format (tags, "
        "token budget) is above this; inadmissible commands do not count: the update must see them fail")
    max_episode_tokens: int = Field(4096, ge=1)
    keep_partial_last_draw: bool = True
    std_normalize: bool = Field(True, description="divide group-centred returns by the group's std")
    advantage_eps: float = Field(1e-6, gt=0)


class OptimizeConfig(Section):
    learning_rate: float = Field(2e-4, gt=0)
    eps_low: float = Field(0.2, ge=0)
    eps_high: float = Field(0.2, ge=0, description="> eps_low is DAPO's clip-higher")
    ppo_epochs: int = Field(1, ge=1)
    mini_batch_size: int | None = Field(
        None, ge=1, description="samples (episodes, or turns with sample_form per_turn) per update; None = all")
    micro_batch_tokens: int = Field(
        4096, ge=64, description="token budget of one packed forward pass (gradient accumulation over passes)")
    max_grad_norm: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2] = 2
    sample_form: Literal["trajectory", "per_turn"] = Field(
        "trajectory", description="one sequence per episode, or one sample per turn with its context as prompt")
    mask_observations: bool = Field(True, description="observation tokens carry no loss (off only as an ablation)")
    loss_aggregation: Literal["token_mean", "sample_mean"] = Field(
        "sample_mean", description="token_mean: every generated token of an update weighs the same (DAPO); "
        "sample_mean: every sample weighs the same (GRPO), so long losing episodes cannot outweigh short wins")
    kl_coef: float = Field(
        0.0, ge=0, description="KL penalty to the frozen warmstart policy; 0 = none and no reference in memory")


class PublishConfig(Section):
    model_name: str = "dypo-tiny"


class EvaluateConfig(Section):
    splits: list[str] = Field(["heldout"], min_length=1, description=(
        "env splits played, `tasks` games each; the first gates the champion (e.g. [heldout, unseen] on ALFWorld: "
        "in-distribution and out-of-distribution rooms)"))
    tasks: int = Field(32, ge=1, description="games per split")
    batch_episodes: int = Field(32, ge=1)
    max_new_tokens: int = Field(48, ge=1)
    min_improvement: float = Field(0.0, description="champion moves when candidate >= champion + this")

    @field_validator("splits")
    @classmethod
    def _distinct_splits(cls, splits: list[str]) -> list[str]:
        if len(set(splits)) != len(splits):
            raise ValueError(f"evaluate.splits lists a split twice: {splits}")
        return splits


class TrackingConfig(Section):
    """Where MLflow lives. None = a SQLite database under the local state directory (embedded default)."""

    mlflow_uri: str | None = None
    experiment: str = "dypo"


class PrefectConfig(Section):
    home: str | None = Field(None, description="PREFECT_HOME; None = .prefect inside a local run directory")


class ShardsConfig(Section):
    """Jobs per fan-out stage (DESIGN.md §3 "Shards"); each plays a contiguous run of whole generation batches."""

    rollout: int = Field(1, ge=1)
    evaluate: int = Field(1, ge=1)


# `make images` tags dypo-<family>:<this package's version>; the launcher's defaults are those tags.
_IMAGE_TAG = importlib.metadata.version("dypo")


class ContainerImages(Section):
    """The image of each stage family (see images/README.md); on a CPU-only machine point all three at dypo-cpu."""

    cpu: str = f"dypo-cpu:{_IMAGE_TAG}"
    rollout_gpu: str = f"dypo-rollout-gpu:{_IMAGE_TAG}"
    train_gpu: str = f"dypo-train-gpu:{_IMAGE_TAG}"


class ContainerLaunchConfig(Section):
    engine: Literal["podman", "docker"] = "podman"
    images: ContainerImages = ContainerImages()
    extra_args: list[str] = Field(
        default_factory=list, description="added to every `run`, e.g. ['--device', 'nvidia.com/gpu=all']")
    pass_env: list[str] = Field(
        default_factory=list, description="host variables passed into every container (AWS_* and MLFLOW_* always are)")


class DeploymentLaunchConfig(Section):
    name: str = Field("dypo-stage/{stage}", description="FLOW/DEPLOYMENT of each stage; {stage} and {family} fill in")
    timeout_s: float | None = Field(None, gt=0, description="give up waiting for a stage's flow run; None = wait")

    @model_validator(mode="after")
    def _pattern_fills_in(self) -> DeploymentLaunchConfig:
        try:
            filled = self.name.format(stage="rollout", family="rollout_gpu")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"launch.deployment.name {self.name!r} may only use {{stage}} and {{family}} "
                             f"({error!r})") from None
        if filled.count("/") != 1:
            raise ValueError(f"launch.deployment.name {self.name!r} must read FLOW/DEPLOYMENT, "
                             "e.g. dypo-stage/{stage}")
        return self


class LaunchConfig(Section):
    """How the training flow runs each stage: in this process, one container each, or one Prefect deployment each
    (a Kubernetes job with its own image). No stage reads this section, so no digest covers it: the same stages
    commit the same outputs whichever launcher ran them."""

    launcher: Literal["local", "container", "deployment"] = "local"
    shards: ShardsConfig = ShardsConfig()
    container: ContainerLaunchConfig = ContainerLaunchConfig()
    deployment: DeploymentLaunchConfig = DeploymentLaunchConfig()


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
    launch: LaunchConfig = LaunchConfig()

    @model_validator(mode="after")
    def _shards_fit_batches(self) -> Config:
        check_sharding(self, "rollout", self.launch.shards.rollout)
        check_sharding(self, "evaluate", self.launch.shards.evaluate)
        return self

    @model_validator(mode="after")
    def _batch_fits_groups(self) -> Config:
        if self.rollout.history_window is not None and self.optimize.sample_form != "per_turn":
            raise ValueError("rollout.history_window re-encodes a window each turn, so an episode is no longer one "
                             "token sequence; set optimize.sample_form: per_turn, or drop the history window")
        if not self.optimize.mask_observations and self.optimize.sample_form != "trajectory":
            raise ValueError("optimize.mask_observations: false (the ablation) needs optimize.sample_form: trajectory")
        if self.rollout.max_context_tokens > self.model.max_position_embeddings:
            raise ValueError(f"rollout.max_context_tokens={self.rollout.max_context_tokens} exceeds "
                             f"model.max_position_embeddings={self.model.max_position_embeddings}")
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


def check_sharding(config: Config, stage: str, shards: int) -> None:
    """Refuse a split of a fan-out stage that would not play exactly what one job plays.

    Shards split a stage at generation-batch boundaries, and every batch samples from its own seeded generator, so
    N shards together write the very episodes of the unsharded stage. Hence at most one shard per batch, and for a
    rollout, batches of whole groups (a group's episodes stay in one shard).
    """
    if stage == "rollout":
        episodes, batch = config.rollout.groups * config.rollout.group_size, config.rollout.batch_episodes
        counted = "rollout.groups x rollout.group_size"
    elif stage == "evaluate":
        episodes, batch, counted = config.evaluate.tasks, config.evaluate.batch_episodes, "evaluate.tasks"
    else:
        raise ValueError(f"stage {stage!r} runs as one job; only rollout and evaluate run in shards")
    batches = -(-episodes // batch)
    if shards > batches:
        raise ValueError(
            f"{shards} {stage} shards, but {stage} plays {episodes} episodes ({counted}) in batches of "
            f"{stage}.batch_episodes={batch}, i.e. {batches} batch(es), and each shard needs one: use at most "
            f"{batches} shards or lower {stage}.batch_episodes")
    if stage == "rollout" and shards > 1 and batch % config.rollout.group_size:
        raise ValueError(
            f"a sharded rollout keeps every group in one shard, so rollout.batch_episodes={batch} must be a multiple "
            f"of rollout.group_size={config.rollout.group_size}")


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


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{what} {path} is not valid YAML: {error}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping of sections, got {type(data).__name__}")
    return data or {}


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` on top of `base`, section by section (mappings merge, anything else replaces)."""
    merged = dict(base)
    for key, value in overlay.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def preset_path(config_path: Path, preset: str) -> Path:
    """A preset by name (`grpo` -> presets/grpo.yaml beside the config file, then configs/presets/), or a path."""
    if preset.endswith((".yaml", ".yml")):
        return Path(preset)
    for directory in (config_path.parent / "presets", Path("configs") / "presets"):
        if (directory / f"{preset}.yaml").is_file():
            return directory / f"{preset}.yaml"
    raise ConfigError(f"no preset {preset!r}: looked for {preset}.yaml in {config_path.parent / 'presets'} and "
                      "configs/presets (the shipped presets are dypo, grpo, dapo-style)")


def parse_override(override: str) -> dict[str, Any]:
    """`optimize.kl_coef=0.04` as the nested mapping it sets; the value is read as YAML (numbers, booleans, null)."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} is not KEY=VALUE, e.g. optimize.kl_coef=0.04")
    data: Any = yaml.safe_load(value) if value.strip() else None
    for part in reversed(key.strip().split(".")):
        data = {part: data}
    return data


def load_config(path: str | Path, presets: Sequence[str] = (), overrides: Sequence[str] = ()) -> Config:
    """Read and validate a YAML config file, then apply presets (in order) and KEY=VALUE overrides on top.

    A preset is a partial config naming one algorithm variant (configs/presets/grpo.yaml …), so an ablation is
    one flag away from any base config; what was applied is recorded in `run.presets` and `run.overrides`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file such as "
                          "configs/tiny-cpu.yaml")
    data = _read_yaml(path, "config file")
    sources = [str(path)]
    for preset in presets:
        found = preset_path(path, preset)
        data = _merge(data, _read_yaml(found, "preset"))
        sources.append(str(found))
    for override in overrides:
        data = _merge(data, parse_override(override))
        sources.append(override)
    run = dict(data.get("run") or {})
    run.update({"presets": list(presets), "overrides": list(overrides)})
    return parse_config({**data, "run": run}, " + ".join(sources))
