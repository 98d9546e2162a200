"""The one training loop every accord plugin uses.

Contract: ``model.forward(batch)`` returns a dict of scalar loss tensors that includes ``"loss"``
(the total that is back-propagated); every other term is only logged. If the model has
``momentum_update(momentum: float)``, it is called after every optimizer step with the EMA
momentum of :func:`~accord.training.optim.ema_momentum_at` (when ``config.ema_momentum`` is set).
DINO-style optimisation (weight-decay exemptions and schedule, per-tensor clipping, frozen
parameters) is opt-in through :class:`~accord.config.TrainerConfig`. A task hooks into the loop
with ``validate`` and :class:`~accord.training.callbacks.Callback` objects. See docs/training.md.

The optimisation rules live in :mod:`accord.training.optim`, process-group handling in
:mod:`accord.training.distributed`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from accord.config import RunConfig, TrainerConfig
from accord.errors import UserError
from accord.training.callbacks import Callback, TrainingState
from accord.training.checkpoint import (
    CheckpointError,
    build_checkpoint,
    capture_rng_state,
    checkpoint_path,
    derive_seed,
    latest_valid_checkpoint,
    load_model_state,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_temp_files,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from accord.training.distributed import (
    DistributedContext,
    broadcast_from_main,
    micro_batch_size,
    setup_distributed,
    teardown_distributed,
)
from accord.training.optim import (
    apply_update_rules,
    build_optimizer,
    build_scheduler,
    ema_momentum_at,
    frozen_parameters,
)
from accord.training.progress import RESERVED_METRIC_KEYS, ProgressReporter, last_training_record
from accord.training.sampler import BatchStream

__all__ = ["Trainer", "NonFiniteLossError", "Validate"]

#: ``validate(model, step) -> {name: value}``: scores the model (unwrapped from DDP) after ``step``.
Validate = Callable[[nn.Module, int], Mapping[str, float]]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class NonFiniteLossError(UserError, RuntimeError):
    """A loss term was NaN or infinite; the step was not applied and not checkpointed.

    A :class:`~accord.errors.UserError` (the fix is in the run's settings or data, and the message
    says where training stopped), so the CLI prints it as one line; also a ``RuntimeError``, as
    before that base existed.

    Attributes:
        step: the (1-based) optimizer step that failed.
        terms: every loss term of that step (mean over micro-batches and ranks).
    """

    def __init__(self, step: int, terms: Mapping[str, float], last_checkpoint: Path | None) -> None:
        self.step = step
        self.terms = dict(terms)
        values = ", ".join(f"{name}={value}" for name, value in terms.items())
        kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint written yet"
        super().__init__(f"non-finite loss at step {step}: {values} (step not applied; {kept})")


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {key: _to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_to_device(item, device) for item in value]
        # Named tuples take their fields as positional arguments.
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _loss_terms(output: Any) -> dict[str, torch.Tensor]:
    """Check the model's output contract and return its loss terms."""
    if not isinstance(output, Mapping) or "loss" not in output:
        raise TypeError(
            "model.forward(batch) must return a dict of scalar loss tensors including 'loss', "
            f"got {type(output).__name__}"
            + (f" with keys {sorted(output)}" if isinstance(output, Mapping) else "")
        )
    for name, value in output.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"model.forward(batch)[{name!r}] must be a scalar tensor, got {shape}")
        if name in RESERVED_METRIC_KEYS:
            reserved = ", ".join(RESERVED_METRIC_KEYS)
            raise ValueError(f"loss term name {name!r} is reserved for metrics ({reserved})")
        if "/" in name:
            raise ValueError(f"loss term name {name!r} contains '/', which marks namespaced metrics (val/dice)")
    return dict(output)


class Trainer:
    """Runs optimizer steps on a model, with checkpoints, resume, logging and DDP.

    Tasks build it with :meth:`for_run`, which takes the seed, the run directory and the
    checkpoints' description of the run from the task's config.

    Args:
        config: the trainer options.
        run_dir: where ``checkpoints/``, ``metrics.jsonl`` and ``loss_curves.png`` go.
        seed: the run's seed (``RunConfig.seed``): every generator is reseeded from it (plus the
            rank) when training starts, and the data order and worker seeds derive from it.
        run: what every checkpoint records about the run (:func:`accord.runs.run_record`: the
            resolved run config, plugin and version, model factory) so that
            :func:`accord.runs.load_run` can rebuild the model from the checkpoint alone; ``None``
            writes checkpoints that resume but cannot be rebuilt on their own.
        validate: ``validate(model, step) -> {name: value}``, run on rank 0 (model unwrapped from
            DDP) every ``config.validate_every`` steps (``None``: with every checkpoint) and after
            the last step, before that step's checkpoint; the values are logged as ``val/<name>``
            and passed to every callback's ``on_validation`` on every rank. It should restore the
            model's train/eval mode.
        callbacks: hooks into the loop (:mod:`accord.training.callbacks`), called in this order.
    """

    def __init__(
        self,
        config: TrainerConfig,
        run_dir: Path | str,
        *,
        seed: int,
        run: Mapping[str, Any] | None = None,
        validate: Validate | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.seed = seed
        self.run = dict(run) if run is not None else None
        self.checkpoint_dir = self.run_dir / CHECKPOINT_DIR
        self.validate = validate
        self.callbacks = list(callbacks)

    @classmethod
    def for_run(
        cls,
        run_config: RunConfig,
        *,
        model_factory: str,
        model_options: dict[str, Any] | None = None,
        trainer: TrainerConfig | None = None,
        validate: Validate | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> "Trainer":
        """The trainer of a task run: seed, run directory and checkpoint record from ``run_config``.

        Args:
            run_config: the task's validated config; checkpoints embed it, so it should hold
                everything the model factory needs (e.g. an architecture resolved from a
                pretrained checkpoint).
            model_factory: the registered model factory (``"<plugin>.<name>"``) that rebuilds the
                trained model as ``factory(run_config, **model_options)``.
            model_options: what the factory needs besides the config (JSON values, e.g. the
                number of classes found in the data).
            trainer: the trainer options (default: ``run_config.trainer``).
            validate: see the class.
            callbacks: see the class.
        """
        from accord.runs import run_record

        options = trainer if trainer is not None else getattr(run_config, "trainer")
        record = run_record(run_config, model_factory, model_options)
        return cls(options, run_config.run_dir, seed=run_config.seed, run=record, validate=validate,
                   callbacks=callbacks)

    def fit(
        self,
        model: nn.Module,
        dataset: Dataset,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> dict[str, Any]:
        """Train ``model`` on ``dataset`` until ``config.max_steps`` optimizer steps are done.

        Args:
            model: returns a dict of scalar loss terms with ``"loss"`` from ``forward(batch)``.
            dataset: a map-style dataset; batches are built with ``collate_fn``.
            collate_fn: ``DataLoader`` collate function (``None``: the default).

        Returns:
            The metrics record of the last step (``step``, ``lr``, loss terms, ``samples_per_s``,
            ``time``) plus ``checkpoint``, the path of the newest checkpoint.

        Raises:
            NonFiniteLossError: a loss term was NaN/inf; that step is neither applied nor saved.
            CheckpointError: ``resume`` names an unusable file, or ``resume: never`` would mix
                with existing checkpoints.
            ValueError: the batch size does not split over ranks and micro-batches.
        """
        context = setup_distributed(self.config.backend, self.config.device)
        completed = False
        try:
            result = self._fit(context, model, dataset, collate_fn)
            completed = True
            return result
        finally:
            teardown_distributed(context, completed)

    def _checkpoint_to_resume(self) -> tuple[Path, dict[str, Any]] | None:
        resume = self.config.resume
        if resume == "never":
            existing = list_checkpoints(self.checkpoint_dir)
            if existing:
                raise CheckpointError(
                    f"trainer.resume is 'never' but {self.checkpoint_dir} already holds checkpoints "
                    f"({existing[-1][1].name} is newest); use resume: auto to continue that run, or "
                    f"choose another run_dir"
                )
            return None
        if resume == "auto":
            return latest_valid_checkpoint(self.checkpoint_dir)
        return Path(resume), load_checkpoint(resume)

    def _warn_config_changes(self, path: Path, saved: Mapping[str, Any]) -> None:
        current = self.config.model_dump(mode="json")
        # Options added to TrainerConfig after the checkpoint was written count as their defaults.
        previous = {**TrainerConfig.model_construct().model_dump(mode="json"), **saved}
        changed = [k for k in current if k != "resume" and previous.get(k) != current[k]]
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {current[k]!r}" for k in changed)
            log.warning("resuming from %s with a changed trainer config (%s)", path, details)

    def _fit(
        self,
        context: DistributedContext,
        model: nn.Module,
        dataset: Dataset,
        collate_fn: Callable[[list[Any]], Any] | None,
    ) -> dict[str, Any]:
        cfg = self.config
        if cfg.deterministic:
            _use_deterministic_algorithms()
        resumed = self._checkpoint_to_resume()
        start = resumed[1]["step"] if resumed else 0
        if context.is_main and not resumed:
            log.info("training from step 0 to %d", cfg.max_steps)
        self._check_ranks_agree(start, context)
        seed_everything(self.seed + context.rank)
        loop = self._start_loop(context, model, dataset, collate_fn, resumed)
        state = TrainingState(step=start, max_steps=cfg.max_steps, model=model, run_dir=self.run_dir,
                              is_main=context.is_main, resumed=start if resumed else None, reporter=loop.reporter)
        finished = False
        try:
            self._notify("on_train_start", state)
            while state.step < cfg.max_steps:
                self._optimizer_step(loop, state.step)
                state.step += 1
                if self.validate is not None and self._due(state.step, cfg.validate_every or cfg.checkpoint_every):
                    self._validate(state, context)
                self._notify("on_step", state, only=[c for c in self.callbacks if self._due(state.step, c.every)])
                if self._due(state.step, cfg.checkpoint_every):
                    loop.last_checkpoint = self._save(state.step, loop)
                    self._notify("on_checkpoint", state, loop.last_checkpoint)
            self._notify("on_train_end", state)
            finished = True
        finally:
            loop.reporter.close(plot=finished)

        result = loop.reporter.last_record or last_training_record(loop.reporter.metrics_path) or {"step": state.step}
        newest = list_checkpoints(self.checkpoint_dir)
        return {**result, "checkpoint": str(newest[-1][1]) if newest else None}

    def _due(self, step: int, every: int) -> bool:
        """Whether something done every ``every`` steps and after the last step is due after ``step``."""
        return step % every == 0 or step == self.config.max_steps

    def _start_loop(
        self,
        context: DistributedContext,
        model: nn.Module,
        dataset: Dataset,
        collate_fn: Callable[[list[Any]], Any] | None,
        resumed: tuple[Path, dict[str, Any]] | None,
    ) -> _Loop:
        """Optimizer, scheduler, data stream, DDP wrapper and progress output, restored from ``resumed``."""
        cfg = self.config
        model.to(context.device)
        optimizer = build_optimizer(model, cfg)
        frozen = frozen_parameters(model, cfg)
        if frozen and cfg.freeze_parameters.steps >= cfg.max_steps and context.is_main:
            log.warning(
                "trainer.freeze_parameters.steps (%d) >= max_steps (%d): the %d matching parameters are never updated",
                cfg.freeze_parameters.steps,
                cfg.max_steps,
                len(frozen),
            )
        scheduler = build_scheduler(optimizer, cfg)
        data = BatchStream(
            dataset,
            micro_batch_size(cfg.batch_size, context.world_size, cfg.grad_accum_steps),
            rank=context.rank,
            world_size=context.world_size,
            seed=self.seed,
            num_workers=cfg.num_workers,
            collate_fn=collate_fn,
            pin_memory=context.device.type == "cuda",
        )
        if resumed:
            self._restore(resumed, model, optimizer, scheduler, data, context)
        if context.is_main:
            remove_temp_files(self.checkpoint_dir)

        train_model: nn.Module = model
        if context.world_size > 1:
            # find_unused_parameters=False: every trainable parameter must receive a gradient each
            # step (frozen teachers have requires_grad=False and are ignored by DDP).
            device_ids = [context.device.index] if context.device.type == "cuda" else None
            train_model = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)

        reporter = ProgressReporter(
            self.run_dir,
            max_steps=cfg.max_steps,
            start_step=resumed[1]["step"] if resumed else 0,
            global_batch_size=cfg.batch_size,
            log_every=cfg.log_every,
            is_main=context.is_main,
            tensorboard=cfg.tensorboard,
        )
        has_momentum_update = cfg.ema_momentum is not None and callable(getattr(model, "momentum_update", None))
        if cfg.ema_momentum is not None and not has_momentum_update and context.is_main:
            log.warning(
                "trainer.ema_momentum is set but %s has no momentum_update(momentum)", type(model).__name__
            )
        return _Loop(model, train_model, optimizer, scheduler, data, frozen, reporter, has_momentum_update, context,
                     last_checkpoint=resumed[0] if resumed else None)

    def _optimizer_step(self, loop: _Loop, step: int) -> None:
        """Take optimizer step ``step + 1``: gradients, update rules, parameter and teacher update, progress.

        Raises:
            NonFiniteLossError: a loss term is NaN or infinite (nothing is updated).
        """
        cfg = self.config
        loop.train_model.train()
        terms = self._accumulate_gradients(loop.train_model, loop.optimizer, loop.data, loop.context)
        if not all(math.isfinite(v) for v in terms.values()):
            raise NonFiniteLossError(step + 1, terms, loop.last_checkpoint)
        apply_update_rules(step, loop.optimizer, loop.frozen, cfg)
        decayed_group = loop.optimizer.param_groups[0]
        lr, weight_decay = decayed_group["lr"], decayed_group["weight_decay"]
        loop.optimizer.step()
        loop.scheduler.step()
        if loop.has_momentum_update:
            with torch.no_grad():
                loop.model.momentum_update(ema_momentum_at(step, cfg))
        scheduled = cfg.weight_decay_end is not None
        loop.reporter.update(step + 1, lr, terms, weight_decay=weight_decay if scheduled else None)

    def _validate(self, state: TrainingState, context: DistributedContext) -> None:
        """Run ``validate`` on rank 0, log its metrics as ``val/<name>`` and pass them to the callbacks."""
        metrics = None
        if context.is_main:
            with _rng_kept():
                metrics = _validation_metrics(self.validate(state.model, state.step))
            state.log({f"val/{name}": value for name, value in metrics.items()})
        self._notify("on_validation", state, broadcast_from_main(metrics, context))

    def _notify(self, hook: str, state: TrainingState, *args: Any, only: list[Callback] | None = None) -> None:
        """Call ``hook`` of every callback (or of ``only``), keeping the random streams of training unchanged."""
        for callback in self.callbacks if only is None else only:
            with _rng_kept():
                getattr(callback, hook)(state, *args)

    def _check_ranks_agree(self, step: int, context: DistributedContext) -> None:
        """Fail fast when ranks resolved different checkpoints (e.g. no shared filesystem)."""
        if context.world_size == 1:
            return
        steps: list[int | None] = [None] * context.world_size
        dist.all_gather_object(steps, step)
        if len(set(steps)) != 1:
            raise CheckpointError(
                f"ranks would resume from different steps {steps} (by rank); every rank must see the "
                f"same {self.checkpoint_dir} (a shared filesystem for multi-node runs)"
            )

    def _restore(
        self,
        resumed: tuple[Path, dict[str, Any]],
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        data: BatchStream,
        context: DistributedContext,
    ) -> None:
        path, state = resumed
        if context.is_main:
            log.info("resuming from %s (step %d)", path, state["step"])
            self._warn_config_changes(path, state["config"])
        load_model_state(model, state["model"], path, "this run's model (did the model config change?)")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:
            raise CheckpointError(
                f"{path}: its optimizer state does not fit this run's parameter groups ({exc}); "
                "was trainer.weight_decay_exempt_1d or the model changed?"
            ) from None
        scheduler.load_state_dict(state["scheduler"])
        data.seek(**state["data_position"])
        if state["world_size"] == context.world_size:
            restore_rng_state(state["rng"][context.rank])
        else:
            # Per-rank streams cannot be mapped onto a different number of ranks; start fresh
            # streams that still differ by rank and by resume step.
            log.warning(
                "%s was written by %d ranks, this run has %d: random streams are re-seeded",
                path,
                state["world_size"],
                context.world_size,
            )
            seed_everything(derive_seed(self.seed, context.rank, state["step"]))

    def _accumulate_gradients(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: BatchStream,
        context: DistributedContext,
    ) -> dict[str, float]:
        """Forward/backward ``grad_accum_steps`` micro-batches; returns the mean loss terms.

        The terms are averaged over micro-batches and ranks. Backward runs even for a non-finite
        loss so every rank takes part in the same collectives; the caller decides not to step.
        """
        accum = self.config.grad_accum_steps
        use_bf16 = self.config.precision == "bf16"
        optimizer.zero_grad(set_to_none=True)
        names: list[str] | None = None
        totals: torch.Tensor | None = None
        for index in range(accum):
            batch = _to_device(data.next_batch(), context.device)
            # Gradients are all-reduced only on the last micro-batch of a step.
            defer_sync = isinstance(model, DistributedDataParallel) and index < accum - 1
            with model.no_sync() if defer_sync else contextlib.nullcontext():
                with torch.autocast(context.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    terms = _loss_terms(model(batch))
                (terms["loss"] / accum).backward()
            if names is None:
                names = list(terms)
            elif list(terms) != names:
                raise ValueError(f"model.forward returned terms {list(terms)}, earlier micro-batches {names}")
            values = torch.stack([value.detach().float().reshape(()) for value in terms.values()])
            totals = values if totals is None else totals + values
        means = totals / accum
        if context.world_size > 1:
            dist.all_reduce(means)
            means /= context.world_size
        return dict(zip(names, means.tolist()))

    def _save(self, step: int, loop: _Loop) -> Path:
        """Write the checkpoint of ``step`` (rank 0 only; every rank contributes its RNG state)."""
        context = loop.context
        local_rng = capture_rng_state()
        rng = [local_rng]
        if context.world_size > 1:
            rng = [None] * context.world_size
            dist.all_gather_object(rng, local_rng)
        path = checkpoint_path(self.checkpoint_dir, step)
        if context.is_main:
            state = build_checkpoint(
                step=step,
                data_position=loop.data.position(),
                model=loop.model,
                optimizer=loop.optimizer,
                scheduler=loop.scheduler,
                rng=rng,
                config=self.config.model_dump(mode="json"),
                run=self.run,
            )
            save_checkpoint(state, path)
            prune_checkpoints(self.checkpoint_dir, self.config.keep_last)
        return path


@dataclass
class _Loop:
    """What :meth:`Trainer.fit` keeps from step to step."""

    model: nn.Module  # as passed to fit
    train_model: nn.Module  # the model, DDP-wrapped with more than one rank
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data: BatchStream
    frozen: list[nn.Parameter]
    reporter: ProgressReporter
    has_momentum_update: bool
    context: DistributedContext
    last_checkpoint: Path | None


def _use_deterministic_algorithms() -> None:
    """``trainer.deterministic``: deterministic kernels only, no cuDNN autotuning."""
    # cuBLAS reads this when its handle is created; set it before the first CUDA matmul.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """Run a hook without moving training's random streams, so validating or probing changes no batch,
    augmentation or dropout mask of the run."""
    saved = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(saved)


def _validation_metrics(metrics: Any) -> dict[str, float]:
    """``validate``'s result as ``{name: float}``.

    Raises:
        TypeError: not a mapping of names to numbers (the message names the offending entry).
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"validate(model, step) must return a dict of metric names to numbers, got "
                        f"{type(metrics).__name__}")
    checked = {}
    for name, value in metrics.items():
        try:
            checked[str(name)] = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"validate(model, step)[{name!r}] must be a number, got {type(value).__name__}") from None
    return checked
