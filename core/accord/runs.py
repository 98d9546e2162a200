"""Running a task: the platform's side of the task contract.

Every task, whether started by ``accord run CONFIG``, by a benchmark protocol or by a test, goes
through :func:`run_task`, so the same things happen before its code runs:

1. the fully resolved config is written to ``<run_dir>/config.yaml`` (:func:`record_config`),
   unless that would overwrite the record of checkpoints trained with another config;
2. every random number generator is seeded from the run's one seed (``RunConfig.seed``): model
   initialisation, augmentation and anything else drawn from the global generators. The trainer
   derives data order and worker seeds from the same value, so two runs that differ only in
   ``seed`` differ everywhere, and two runs with the same seed are identical.

Checkpoints describe their run (:func:`run_record`, written by :meth:`accord.training.Trainer.for_run`):
:func:`load_run` rebuilds the trained model from a checkpoint file alone, without its run folder,
through the registered model factory it names (``register_models``:
``factory(run_config, **model_options)``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

import accord
from accord.config import ConfigError, RunConfig, resolved_yaml, validate_config
from accord.training.checkpoint import (
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_model_state,
    seed_everything,
)
from accord.training.trainer import CHECKPOINT_DIR
from accord.utils.files import write_text_atomically

__all__ = ["run_task", "record_config", "run_record", "load_run", "LoadedRun"]

log = logging.getLogger(__name__)


def record_config(cfg: RunConfig) -> Path:
    """Write the resolved config into the run directory without clobbering a previous run's record.

    ``<run_dir>/config.yaml`` describes the checkpoints next to it. It is (re)written when the run
    directory holds no checkpoints or the file already holds this exact config. Otherwise the
    checkpoints were trained with another config, and a run that fails before it trains must not
    make them undescribed: the new config goes to ``config.<UTC time>.yaml`` beside it, with a
    warning naming both files.

    Returns:
        The file written.
    """
    text = resolved_yaml(cfg)
    target = cfg.run_dir / "config.yaml"
    if (
        target.is_file()
        and list_checkpoints(cfg.run_dir / CHECKPOINT_DIR)
        and target.read_text(encoding="utf-8") != text
    ):
        target = cfg.run_dir / f"config.{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.yaml"
        log.warning(
            "%s describes the checkpoints of a run with another config; kept it, wrote this run's config to %s",
            cfg.run_dir / "config.yaml", target,
        )
    return write_text_atomically(target, text)


def run_task(cfg: RunConfig) -> dict[str, Any]:
    """Run the task ``cfg.plugin``.``cfg.task`` with a validated config.

    Args:
        cfg: an instance of the task's registered config model.

    Returns:
        The task's JSON-serialisable result dict.

    Raises:
        PluginNotInstalledError / ComponentNotFoundError: no such plugin or task.
        TypeError: ``cfg`` is not an instance of the config model the task registered.
    """
    from accord.plugins import get_host

    task = get_host().tasks.get(f"{cfg.plugin}.{cfg.task}")
    expected = task.extra["config"]
    if not isinstance(cfg, expected):
        raise TypeError(f"task {task.qualname} takes a {expected.__name__} config, got {type(cfg).__name__}")
    record_config(cfg)
    seed_everything(cfg.seed)
    log.info("%s: run_dir %s, seed %d", task.qualname, cfg.run_dir, cfg.seed)
    return task.obj(cfg)


def run_record(cfg: RunConfig, model_factory: str, model_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a checkpoint records about its run, so that :func:`load_run` can rebuild the model.

    Args:
        cfg: the task's validated config (it is stored resolved, as JSON values).
        model_factory: the registered model factory, ``"<plugin>.<name>"``, that builds the trained
            model as ``factory(cfg, **model_options)``.
        model_options: what the model needs besides the config and that the task found out at run
            time (e.g. the number of classes of the dataset); JSON values.

    Raises:
        ComponentNotFoundError: no model factory of that name is registered.
    """
    from accord.plugins import get_host

    host = get_host()
    factory = host.models.get(model_factory)
    return {
        "config": cfg.model_dump(mode="json"),
        "plugin": cfg.plugin,
        "plugin_version": host.plugin_version(cfg.plugin),
        "task": cfg.task,
        "model_factory": factory.qualname,
        "model_options": dict(model_options or {}),
        "accord_version": accord.__version__,
    }


@dataclass
class LoadedRun:
    """A model rebuilt from a checkpoint by :func:`load_run`.

    Attributes:
        model: the trained model (the trainer-contract module), weights loaded, in eval mode.
        config: the run's validated config (an instance of its task's config model).
        step: optimizer steps the checkpoint had taken.
        record: the checkpoint's run record (plugin, versions, model factory).
        checkpoint: the checkpoint's path.
    """

    model: nn.Module
    config: RunConfig
    step: int
    record: dict[str, Any]
    checkpoint: Path


def load_run(checkpoint: str | Path) -> LoadedRun:
    """Rebuild the model a checkpoint was trained as, from the checkpoint alone.

    The run config stored in the checkpoint is validated against its task's config model, the
    model is built by the model factory the checkpoint names, and the weights are loaded strictly.

    Raises:
        CheckpointError: an unreadable file, a checkpoint without a run record (written before
            checkpoints described their run, or by a trainer built without one), a plugin or
            factory that is not installed, a config the installed plugin no longer accepts, or
            weights that do not fit the rebuilt model; the message names the file.
    """
    from accord.plugins import get_host
    from accord.registry import ComponentNotFoundError, PluginNotInstalledError

    path = Path(checkpoint)
    state = load_checkpoint(path)
    record = state["run"]
    if not record:
        raise CheckpointError(
            f"{path}: the checkpoint does not describe its run (no 'run' entry: written by accord before checkpoint "
            "version 2 or by a Trainer built without run=); rebuild the model with the plugin's own code and load "
            "state['model'] into it"
        )
    host = get_host()
    try:
        host.require_plugin(record["plugin"])
        task = host.tasks.get(f"{record['plugin']}.{record['task']}")
        factory = host.models.get(record["model_factory"])
    except (PluginNotInstalledError, ComponentNotFoundError) as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        config = validate_config(task.extra["config"], record["config"], source=f"{path} (run config)",
                                 check_paths=False)
    except ConfigError as exc:
        raise CheckpointError("; ".join(exc.lines)) from None
    model = factory.obj(config, **record.get("model_options", {}))
    load_model_state(model, state["model"], path, f"the model that {factory.qualname} builds from its config")
    return LoadedRun(model=model.eval(), config=config, step=state["step"], record=dict(record), checkpoint=path)
