"""The one training loop every accord plugin uses.

Contract: ``model.forward(batch)`` returns a dict of scalar loss tensors that includes ``"loss"``
(the total that is back-propagated); every other term is only logged. If the model has
``momentum_update(momentum: float)``, it is called after every optimizer step with the EMA
momentum of :func:`ema_momentum_at` (when ``config.ema_momentum`` is set). DINO-style optimisation
(weight-decay exemptions and schedule, per-tensor clipping, frozen parameters) is opt-in through
:class:`~accord.config.TrainerConfig`. See docs/training.md.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from accord import dist as adist
from accord.config import TrainerConfig
from accord.schedules import cosine_schedule, linear_schedule, linear_warmup_cosine
from accord.training.checkpoint import (
    CheckpointError,
    build_checkpoint,
    capture_rng_state,
    checkpoint_path,
    derive_seed,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    remove_temp_files,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from accord.training.progress import RESERVED_METRIC_KEYS, ProgressReporter, read_metrics
from accord.training.sampler import BatchStream

__all__ = [
    "Trainer",
    "NonFiniteLossError",
    "DistributedContext",
    "setup_distributed",
    "teardown_distributed",
    "micro_batch_size",
    "learning_rate_at",
    "ema_momentum_at",
    "weight_decay_at",
    "parameter_groups",
    "build_optimizer",
    "build_scheduler",
    "clip_gradients",
    "frozen_parameters",
]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class NonFiniteLossError(RuntimeError):
    """A loss term was NaN or infinite; the step was not applied and not checkpointed.

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


# --- distributed setup ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributedContext:
    """Where this process trains: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(backend: str = "auto", device: str = "auto") -> DistributedContext:
    """Join the process group described by torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    With ``WORLD_SIZE`` unset or 1 this is a single process and no group is created. A group that
    already exists (created by the caller) is used as is and left for the caller to destroy.

    Args:
        backend: ``"auto"`` (nccl on CUDA, gloo on CPU), ``"gloo"`` or ``"nccl"``.
        device: ``"auto"`` (``cuda:LOCAL_RANK`` when CUDA is available), ``"cpu"`` or ``"cuda"``.

    Raises:
        RuntimeError: ``device="cuda"`` without CUDA, or ``backend="nccl"`` on the CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device is 'cuda' but torch sees no CUDA device")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    owns_group = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not adist.is_distributed():
        chosen = ("nccl" if use_cuda else "gloo") if backend == "auto" else backend
        if chosen == "nccl" and not use_cuda:
            raise RuntimeError("trainer.backend 'nccl' needs CUDA devices; use 'gloo' or 'auto' on the CPU")
        dist.init_process_group(backend=chosen)
        owns_group = True
    return DistributedContext(
        rank=adist.rank(),
        world_size=adist.world_size(),
        local_rank=local_rank,
        device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
        owns_process_group=owns_group,
    )


def teardown_distributed(context: DistributedContext, completed: bool = True) -> None:
    """Destroy the process group if :func:`setup_distributed` created it.

    Args:
        context: what :func:`setup_distributed` returned.
        completed: every rank got here normally, so they wait for each other first (tearing gloo
            down while another rank still talks to it can abort that rank at exit: "terminate
            called without an active exception"); after an error a rank leaves at once, since
            the others may never arrive.
    """
    if context.owns_process_group and adist.is_distributed():
        if completed:
            dist.barrier()
        dist.destroy_process_group()


# --- schedules and optimizer -----------------------------------------------------------------------


def micro_batch_size(batch_size: int, world_size: int, grad_accum_steps: int) -> int:
    """Samples per rank per micro-batch; the global batch must split evenly.

    Raises:
        ValueError: naming the three numbers when ``batch_size`` is not divisible.
    """
    parts = world_size * grad_accum_steps
    if batch_size % parts:
        raise ValueError(
            f"trainer.batch_size {batch_size} is not divisible by world_size {world_size} x "
            f"grad_accum_steps {grad_accum_steps} = {parts}"
        )
    return batch_size // parts


def learning_rate_at(step: int, config: TrainerConfig) -> float:
    """Learning rate of the optimizer step taken after ``step`` completed steps (0-based).

    Linear warm-up from 0 over ``warmup_steps``, then either cosine from ``lr`` to ``min_lr`` at
    ``max_steps`` (:func:`accord.schedules.linear_warmup_cosine`) or constant ``lr``.
    """
    if config.schedule == "cosine":
        return linear_warmup_cosine(step, config.warmup_steps, config.max_steps, config.lr, config.min_lr)
    if step < config.warmup_steps:
        return linear_schedule(step, config.warmup_steps, 0.0, config.lr)
    return config.lr


def _cosine_over_steps(step: int, config: TrainerConfig, first: float, last: float) -> float:
    """Cosine from ``first`` at optimizer step 0 to ``last`` at the last step (``max_steps - 1``)."""
    return cosine_schedule(step, max(1, config.max_steps - 1), first, last)


def ema_momentum_at(step: int, config: TrainerConfig) -> float:
    """EMA momentum for the update after optimizer step ``step`` (0-based).

    Cosine from ``ema_momentum`` (first step) to ``ema_momentum_end`` (last step, ``max_steps - 1``).

    Raises:
        ValueError: ``config.ema_momentum`` is not set.
    """
    if config.ema_momentum is None:
        raise ValueError("trainer.ema_momentum is not set, so there is no EMA momentum schedule")
    return _cosine_over_steps(step, config, config.ema_momentum, config.ema_momentum_end)


def weight_decay_at(step: int, config: TrainerConfig) -> float:
    """Weight decay of the decayed parameter group in optimizer step ``step`` (0-based).

    Cosine from ``weight_decay`` (first step) to ``weight_decay_end`` (last step, ``max_steps - 1``),
    as DINO's per-iteration schedule; constant ``weight_decay`` when ``weight_decay_end`` is unset.
    """
    if config.weight_decay_end is None:
        return config.weight_decay
    return _cosine_over_steps(step, config, config.weight_decay, config.weight_decay_end)


def _exempt_from_weight_decay(name: str, parameter: nn.Parameter) -> bool:
    # DINO's and timm's rule: biases and 1-D tensors (norm scales and shifts) are not decayed.
    return parameter.ndim <= 1 or name.endswith(".bias")


#: Key of the optimizer groups whose weight decay is 0 by ``weight_decay_exempt_1d``. Checkpoints keep
#: it; groups saved before it existed were all decayed, hence ``group.get(key, False)``.
EXEMPT_FROM_DECAY = "exempt_from_weight_decay"


def _parameters_matching(
    pattern: str, named: list[tuple[str, nn.Parameter]], model: nn.Module, option: str
) -> list[nn.Parameter]:
    """The parameters of ``named`` whose name contains a match of ``pattern``; none is an error naming ``option``."""
    matched = [parameter for name, parameter in named if re.search(pattern, name)]
    if not matched:
        examples = ", ".join(name for name, _ in named[:5])
        raise ValueError(f"trainer.{option} pattern {pattern!r} matches no trainable parameter of "
                         f"{type(model).__name__} (names look like: {examples})")
    return matched


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _first_matching_multiplier(name: str, multipliers: Mapping[str, float]) -> float:
    return next((factor for pattern, factor in multipliers.items() if re.search(pattern, name)), 1.0)


def parameter_groups(model: nn.Module, config: TrainerConfig) -> list[dict[str, Any]]:
    """Optimizer parameter groups over the parameters that require gradients.

    One group per (learning-rate multiplier, weight-decay exemption) that occurs. Group 0 always
    exists (possibly empty): the decayed parameters at the base learning rate, whose ``lr`` and
    ``weight_decay`` the metrics report. A group's ``lr`` is ``config.lr`` times the
    ``lr_multipliers`` factor of its parameters, so the schedule scales every group alike; the
    decayed groups follow :func:`weight_decay_at`, the exempt ones (``weight_decay_exempt_1d``:
    biases and 1-D parameters) keep weight decay 0.

    Raises:
        ValueError: no parameter requires gradients, or an ``lr_multipliers`` pattern matches none.
    """
    named = _trainable(model)
    if not named:
        raise ValueError("the model has no parameters with requires_grad=True to optimize")
    for pattern in config.lr_multipliers:
        _parameters_matching(pattern, named, model, "lr_multipliers")
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, False): []}
    for name, parameter in named:
        exempt = config.weight_decay_exempt_1d and _exempt_from_weight_decay(name, parameter)
        grouped.setdefault((_first_matching_multiplier(name, config.lr_multipliers), exempt), []).append(parameter)
    groups = []
    for (multiplier, exempt), parameters in grouped.items():
        group: dict[str, Any] = {"params": parameters, "lr": config.lr * multiplier}
        if exempt:
            group.update({"weight_decay": 0.0, EXEMPT_FROM_DECAY: True})
        groups.append(group)
    return groups


def build_optimizer(model: nn.Module, config: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over :func:`parameter_groups` (a frozen teacher is left out)."""
    groups = parameter_groups(model, config)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.sgd_momentum, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainerConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that follows :func:`learning_rate_at` (``TrainerConfig`` validated its ranges)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_at(step, config) / config.lr)


def clip_gradients(parameters: list[nn.Parameter], max_norm: float, mode: str) -> None:
    """Clip the gradients of ``parameters`` in place; parameters without a gradient are skipped.

    Args:
        parameters: the optimized parameters.
        max_norm: the largest L2 norm kept.
        mode: ``"global"`` scales all gradients together so that their joint norm is at most
            ``max_norm``; ``"per_tensor"`` applies the same rule to each parameter's gradient on
            its own, as DINO's ``clip_gradients``.
    """
    if mode == "global":
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return
    for parameter in parameters:
        torch.nn.utils.clip_grad_norm_(parameter, max_norm)


def frozen_parameters(model: nn.Module, config: TrainerConfig) -> list[nn.Parameter]:
    """The trainable parameters that ``config.freeze_parameters`` keeps fixed (none when unset).

    ``pattern`` is searched (:func:`re.search`) in the names of ``model.named_parameters()`` of the
    model as passed to :meth:`Trainer.fit`, i.e. without DDP's ``module.`` prefix.

    Raises:
        ValueError: the pattern matches no parameter that requires gradients.
    """
    if config.freeze_parameters is None:
        return []
    return _parameters_matching(config.freeze_parameters.pattern, _trainable(model), model, "freeze_parameters")


# --- the trainer -----------------------------------------------------------------------------------


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
    return dict(output)


class Trainer:
    """Runs optimizer steps on a model, with checkpoints, resume, logging and DDP.

    Args:
        config: the trainer options.
        run_dir: where ``checkpoints/``, ``metrics.jsonl`` and ``loss_curves.png`` go.
        before_checkpoint: called as ``before_checkpoint(step, model)`` on rank 0 just before each
            checkpoint is written (every ``checkpoint_every`` steps and after the last one), e.g.
            to validate and keep the best weights; a resumed run has then already seen every step
            up to its checkpoint.
    """

    def __init__(
        self,
        config: TrainerConfig,
        run_dir: Path | str,
        before_checkpoint: Callable[[int, nn.Module], None] | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / CHECKPOINT_DIR
        self.before_checkpoint = before_checkpoint

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
        per_rank_batch = micro_batch_size(cfg.batch_size, context.world_size, cfg.grad_accum_steps)
        if cfg.deterministic:
            # cuBLAS reads this when its handle is created; set it before the first CUDA matmul.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False

        resumed = self._checkpoint_to_resume()
        step = resumed[1]["step"] if resumed else 0
        self._check_ranks_agree(step, context)
        seed_everything(cfg.seed + context.rank)

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
            per_rank_batch,
            rank=context.rank,
            world_size=context.world_size,
            seed=cfg.seed,
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
            start_step=step,
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
        last_checkpoint = resumed[0] if resumed else None
        finished = False
        try:
            while step < cfg.max_steps:
                train_model.train()
                terms = self._accumulate_gradients(train_model, optimizer, data, context)
                if not all(math.isfinite(v) for v in terms.values()):
                    raise NonFiniteLossError(step + 1, terms, last_checkpoint)
                self._prepare_update(step, optimizer, frozen)
                decayed_group = optimizer.param_groups[0]
                lr, weight_decay = decayed_group["lr"], decayed_group["weight_decay"]
                optimizer.step()
                scheduler.step()
                if has_momentum_update:
                    with torch.no_grad():
                        model.momentum_update(ema_momentum_at(step, cfg))
                step += 1
                scheduled = cfg.weight_decay_end is not None
                reporter.update(step, lr, terms, weight_decay=weight_decay if scheduled else None)
                if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                    last_checkpoint = self._save(step, model, optimizer, scheduler, data, context)
            finished = True
        finally:
            reporter.close(plot=finished)

        result = reporter.last_record or (read_metrics(reporter.metrics_path) or [{"step": step}])[-1]
        newest = list_checkpoints(self.checkpoint_dir)
        return {**result, "checkpoint": str(newest[-1][1]) if newest else None}

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
        model.load_state_dict(state["model"])
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
            seed_everything(derive_seed(self.config.seed, context.rank, state["step"]))

    def _prepare_update(self, step: int, optimizer: torch.optim.Optimizer, frozen: list[nn.Parameter]) -> None:
        """Apply the freeze, the gradient clipping and the weight decay of optimizer step ``step`` (0-based)."""
        cfg = self.config
        if frozen and step < cfg.freeze_parameters.steps:
            # No gradient (rather than a zero one) makes the optimizer skip these parameters
            # entirely: no weight decay and no moment updates either. Dropped before clipping so
            # that they do not count in a global norm.
            for parameter in frozen:
                parameter.grad = None
        if cfg.grad_clip_norm is not None:
            trained = [p for group in optimizer.param_groups for p in group["params"]]
            clip_gradients(trained, cfg.grad_clip_norm, cfg.grad_clip_mode)
        # Set on every step, also without a schedule, so a resumed run follows the current config
        # rather than the group value stored in its checkpoint.
        weight_decay = weight_decay_at(step, cfg)
        for group in optimizer.param_groups:
            if not group.get(EXEMPT_FROM_DECAY, False):
                group["weight_decay"] = weight_decay

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

    def _save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        data: BatchStream,
        context: DistributedContext,
    ) -> Path:
        """Write the checkpoint of ``step`` (rank 0 only; every rank contributes its RNG state)."""
        if self.before_checkpoint is not None and context.is_main:
            self.before_checkpoint(step, model)
        local_rng = capture_rng_state()
        rng = [local_rng]
        if context.world_size > 1:
            rng = [None] * context.world_size
            dist.all_gather_object(rng, local_rng)
        path = checkpoint_path(self.checkpoint_dir, step)
        if context.is_main:
            state = build_checkpoint(
                step=step,
                data_position=data.position(),
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                rng=rng,
                config=self.config.model_dump(mode="json"),
            )
            save_checkpoint(state, path)
            prune_checkpoints(self.checkpoint_dir, self.config.keep_last)
        return path
