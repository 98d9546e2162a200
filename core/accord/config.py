"""Validated run configs: YAML files under ``configs/<plugin>/`` checked by pydantic models.

A run config names the plugin and task that runs it; the task's registered config model (a
:class:`RunConfig` subclass, ``extra="forbid"``) validates the whole file::

    plugin: core
    task: pretrain
    run_dir: runs/core-pretrain
    trainer:
      max_steps: 200
      lr: 0.001

Overrides on the command line use dotted keys (``trainer.lr=3e-4``); values are parsed as YAML.
Every problem is reported as one line naming the file, the dotted key, and what was expected (with
the closest valid key for a typo). The fully resolved config is written to
``<run_dir>/config.yaml``.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from accord.errors import UserError
from accord.utils.files import write_text_atomically

__all__ = [
    "ConfigError",
    "StrictModel",
    "RunConfig",
    "TrainerConfig",
    "ParameterFreeze",
    "BenchmarkConfig",
    "ExistingPath",
    "load_config",
    "read_yaml",
    "apply_overrides",
    "validate_config",
    "save_resolved",
    "resolved_yaml",
]


class ConfigError(UserError, ValueError):
    """A config could not be read or validated; ``lines`` holds one message per problem.

    Also a ``ValueError``, which callers caught before :class:`~accord.errors.UserError` existed.
    """

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        super().__init__("\n".join(lines))


class StrictModel(BaseModel):
    """Base for every accord config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


#: Validation context key: ``False`` accepts paths that do not exist here (a stored run config
#: read back on another machine, see :func:`accord.runs.load_run`).
CHECK_PATHS = "check_paths"


def _must_exist(path: Path, info: ValidationInfo) -> Path:
    if (info.context or {}).get(CHECK_PATHS, True) and not Path(os.path.expanduser(path)).exists():
        raise ValueError(f"path does not exist: {path}")
    return Path(os.path.expanduser(path))


#: A path that must exist when the config is validated (data roots, checkpoints).
ExistingPath = Annotated[Path, AfterValidator(_must_exist)]


class ParameterFreeze(StrictModel):
    """Parameters kept fixed at the start of training (DINO's ``freeze_last_layer``)."""

    pattern: str = Field(
        description="regular expression searched in the names of model.named_parameters(), e.g. 'last_layer'"
    )
    steps: int = Field(ge=1, description="first optimizer steps during which the matching parameters are not updated")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        return _valid_regex(pattern)


def _valid_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


class TrainerConfig(StrictModel):
    """Options of :class:`accord.training.Trainer`, shared by every plugin's training tasks."""

    max_steps: int = Field(100, ge=1, description="optimizer steps to run")
    batch_size: int = Field(32, ge=1, description="global batch size (split across ranks)")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(0.0, ge=0, description="final lr of the cosine schedule")
    weight_decay: float = Field(
        0.0, ge=0, description="weight decay (decoupled for adamw); the start value when weight_decay_end is set"
    )
    weight_decay_end: float | None = Field(
        None, ge=0, description="weight decay at the last step, reached by a cosine from weight_decay (None: constant)"
    )
    weight_decay_exempt_1d: bool = Field(
        False, description="no weight decay for biases and 1-D parameters such as norm scales (DINO, timm)"
    )
    sgd_momentum: float = Field(0.9, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    warmup_start_factor: float = Field(
        0.0, ge=0, lt=1, description="the warm-up rises linearly from lr x this factor to lr (mmcv's warmup_ratio; "
        "the rotated-DETR configs use 1/3)"
    )
    schedule: Literal["cosine", "constant", "step"] = "cosine"
    lr_drop_steps: list[int] = Field(
        [], description="schedule step: optimizer steps after which the lr is multiplied by lr_drop_factor "
        "(torch's MultiStepLR milestones, in steps)"
    )
    lr_drop_factor: float = Field(0.1, gt=0, le=1, description="schedule step: factor applied at each lr_drop_steps")
    grad_clip_norm: float | None = Field(None, gt=0, description="largest gradient norm (None: no clipping)")
    grad_clip_mode: Literal["global", "per_tensor"] = Field(
        "global",
        description="global: one norm over all gradients; per_tensor: each parameter's gradient on its own (DINO)",
    )
    freeze_parameters: ParameterFreeze | None = Field(
        None, description="parameters not updated during the first steps, e.g. DINO's prototypes (None: none)"
    )
    lr_multipliers: dict[str, float] = Field(
        default_factory=dict,
        description="regular expression searched in parameter names -> factor on the learning rate of the matching "
        "parameters (first matching pattern wins), e.g. {'^head\\.': 10} for a 10x head lr",
    )
    precision: Literal["fp32", "bf16"] = "fp32"
    ema_momentum: float | None = Field(
        None, ge=0, le=1, description="start momentum of the EMA teacher (None: no teacher update)"
    )
    ema_momentum_end: float = Field(1.0, ge=0, le=1, description="momentum at the last step (cosine)")
    checkpoint_every: int = Field(50, ge=1)
    validate_every: int | None = Field(
        None, ge=1, description="steps between validations (and after the last step) when the task validates; "
        "None: with every checkpoint"
    )
    keep_last: int = Field(3, ge=1)
    resume: Literal["auto", "never"] | Path = "auto"
    deterministic: bool = Field(
        False, description="torch.use_deterministic_algorithms (ops without a deterministic kernel raise); CPU reruns "
        "are bit-exact without it"
    )
    num_workers: int = Field(0, ge=0)
    log_every: int = Field(10, ge=1)
    tensorboard: bool = False
    backend: Literal["auto", "gloo", "nccl"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _no_second_seed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "seed" in data:
            raise ValueError(
                "trainer.seed was removed: set the run's top-level 'seed', the one seed that drives model init, "
                "data order, augmentation and workers"
            )
        return data

    @field_validator("lr_multipliers")
    @classmethod
    def _multipliers_are_positive_with_valid_patterns(cls, multipliers: dict[str, float]) -> dict[str, float]:
        for pattern, factor in multipliers.items():
            try:
                _valid_regex(pattern)
            except ValueError as exc:
                raise ValueError(f"{pattern!r}: {exc}") from None
            if not factor > 0:
                raise ValueError(f"{pattern!r}: the learning-rate multiplier must be > 0, got {factor}")
        return multipliers

    @model_validator(mode="after")
    def _schedule_is_consistent(self) -> "TrainerConfig":
        if self.schedule == "cosine" and self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be smaller than max_steps ({self.max_steps}) "
                "for the cosine schedule"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.lr_drop_steps and self.schedule != "step":
            raise ValueError(f"lr_drop_steps is set but schedule is {self.schedule!r}; use schedule: step")
        if sorted(set(self.lr_drop_steps)) != self.lr_drop_steps or any(s < 1 for s in self.lr_drop_steps):
            raise ValueError(f"lr_drop_steps {self.lr_drop_steps} must be increasing positive step counts")
        return self
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: cuda:LOCAL_RANK when CUDA is available, else cpu"
    )


class RunConfig(StrictModel):
    """Fields every run config has; tasks subclass it and add their own sections.

    ``seed`` is the run's only seed: :func:`accord.runs.run_task` seeds every generator from it
    before the task starts (model initialisation, augmentation) and the trainer derives the data
    order and worker seeds from it, so runs that differ in ``seed`` differ in all of them.
    """

    plugin: str
    task: str
    run_dir: Path = Path("runs/default")
    seed: int = Field(0, description="the run's one seed: model init, data order, augmentation and workers")


class BenchmarkConfig(RunConfig):
    """Base of every plugin's ``benchmark`` task config (``accord benchmark PLUGIN``)."""

    task: str = "benchmark"
    data: ExistingPath | None = Field(None, description="dataset root; None: generate sample data")
    quick: bool = Field(False, description="a few-minute version for demos and CI")
    seeds: list[int] = Field(
        [0, 1, 2], min_length=1, description="seeds of the compared runs (quick: the first two unless seeds is given)"
    )
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads while the benchmark runs (None: torch's default); 1 is "
        "often faster on a machine other jobs share and gives stable speed ratios"
    )

    def run_seeds(self) -> list[int]:
        """``seeds``; under ``quick`` only the first two of the default ones (given seeds are all run)."""
        return self.seeds[:2] if self.quick and "seeds" not in self.model_fields_set else self.seeds


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: config file not found"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}".replace("\n", " ")]) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level, got {type(data).__name__}"])
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "<cli>") -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError([f"{source}: override {item!r} must look like key.sub=value"])
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"{source}: override {key!r}: {part!r} is not a section"])
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The nested model class that owns the key at ``loc`` (for typo suggestions)."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if fields is None or part not in fields:
            return None
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if current is None:
            return None
    return current


def _format_errors(exc: ValidationError, model: type[BaseModel], source: str) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            owner = _model_at(model, loc)
            valid = list(owner.model_fields) if owner is not None else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?)" if close else ""
            lines.append(f"{source}: unknown key {key!r}{hint}; valid keys here: {', '.join(valid)}")
        elif err["type"] == "missing":
            lines.append(f"{source}: missing required key {key!r}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            where = f"{key}: " if key else ""
            # A model-level check gets the whole section as input: its message names the keys instead.
            got = "" if isinstance(err.get("input"), dict) else f" (got {err.get('input')!r})"
            lines.append(f"{source}: {where}{msg}{got}")
    return lines


def _with_section_defaults(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """Overlay ``data`` on the values a task's defaults set in its sections.

    A task may default a section to e.g. ``TrainerConfig(max_steps=200)``; a file that sets only
    ``trainer.lr`` must keep ``max_steps=200``, not fall back to the class default.
    """
    merged = dict(data)
    for name, field in model.model_fields.items():
        default, given = field.default, data.get(name)
        if isinstance(default, BaseModel) and isinstance(given, dict):
            base = default.model_dump(exclude_unset=True)
            merged[name] = _with_section_defaults(type(default), {**base, **given})
    return merged


def validate_config(model: type[BaseModel], data: dict[str, Any], source: str, check_paths: bool = True) -> Any:
    """Validate ``data`` against ``model``; raise :class:`ConfigError` with one line per problem.

    Args:
        check_paths: require :data:`ExistingPath` fields to exist (``False`` for a stored config
            read back where its data may be absent).
    """
    try:
        return model.model_validate(_with_section_defaults(model, data), context={CHECK_PATHS: check_paths})
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, model, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config against its task's registered model.

    Args:
        path: the YAML file.
        overrides: dotted ``key=value`` strings.

    Returns:
        An instance of the task's config model.

    Raises:
        ConfigError: unreadable file, unknown plugin/task, or validation problems.
    """
    from accord.plugins import get_host
    from accord.registry import ComponentNotFoundError, PluginNotInstalledError

    data = apply_overrides(read_yaml(path), overrides or [], source=str(path))
    missing = [k for k in ("plugin", "task") if not data.get(k)]
    if missing:
        raise ConfigError([f"{path}: missing required key {k!r}" for k in missing])
    host = get_host()
    try:
        host.require_plugin(str(data["plugin"]))
        task = host.tasks.get(f"{data['plugin']}.{data['task']}")
        # A method that a plugin runs as a task of its own (``task: pretrain, method: gemini`` ->
        # ``gemini_pretrain``): the config is that task's, and the resolved one names it.
        method_task = task.extra.get("methods", {}).get(data.get("method"))
        if method_task is not None:
            data = {key: value for key, value in data.items() if key != "method"} | {"task": method_task}
            task = host.tasks.get(f"{data['plugin']}.{method_task}")
    except (PluginNotInstalledError, ComponentNotFoundError) as exc:
        raise ConfigError([f"{path}: {exc}"]) from None
    return validate_config(task.extra["config"], data, str(path))


def resolved_yaml(config: BaseModel) -> str:
    """The fully resolved config as the YAML text :func:`save_resolved` writes."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def save_resolved(config: BaseModel, run_dir: Path) -> Path:
    """Write the fully resolved config to ``run_dir/config.yaml`` (atomically) and return its path."""
    return write_text_atomically(run_dir / "config.yaml", resolved_yaml(config))
