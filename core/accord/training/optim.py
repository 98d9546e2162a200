"""Optimisation of a training run: schedules, parameter groups, optimizer, clipping and frozen parameters.

Every function reads :class:`~accord.config.TrainerConfig`; :class:`~accord.training.Trainer` calls
them once per run (:func:`build_optimizer`, :func:`build_scheduler`, :func:`frozen_parameters`) and
once per step (:func:`apply_update_rules`, :func:`ema_momentum_at`). See docs/training.md
("Learning rate", "DINO-style optimisation").
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from accord.config import TrainerConfig
from accord.utils.schedules import cosine_schedule, linear_schedule, linear_warmup_cosine

__all__ = [
    "EXEMPT_FROM_DECAY",
    "learning_rate_at",
    "steps_per_epoch",
    "trainer_for_epochs",
    "ema_momentum_at",
    "weight_decay_at",
    "parameter_groups",
    "build_optimizer",
    "build_scheduler",
    "clip_gradients",
    "frozen_parameters",
    "apply_update_rules",
]


def learning_rate_at(step: int, config: TrainerConfig) -> float:
    """Learning rate of the optimizer step taken after ``step`` completed steps (0-based).

    Linear warm-up from ``lr * warmup_start_factor`` (default 0) over ``warmup_steps``, then either
    cosine from ``lr`` to ``min_lr`` at ``max_steps`` (:func:`accord.utils.schedules.linear_warmup_cosine`),
    constant ``lr``, or (``step``) ``lr`` times ``lr_drop_factor`` for each of ``lr_drop_steps`` already
    completed (torch's ``MultiStepLR``: with milestone 60, the step after 60 completed steps runs at the
    dropped rate).
    """
    if step < config.warmup_steps:
        return linear_schedule(step, config.warmup_steps, config.lr * config.warmup_start_factor, config.lr)
    if config.schedule == "cosine":
        return linear_warmup_cosine(step, config.warmup_steps, config.max_steps, config.lr, config.min_lr)
    if config.schedule == "step":
        return config.lr * config.lr_drop_factor ** sum(step >= drop for drop in config.lr_drop_steps)
    return config.lr


def steps_per_epoch(trainer: TrainerConfig, samples: int) -> int:
    """Optimizer steps in one pass over ``samples``: ``(samples // batch_size) // grad_accum_steps`` (the
    core sampler drops the global micro-batch the samples do not fill; mmdet's pads it instead, at
    most one step per epoch more)."""
    return samples // trainer.batch_size // trainer.grad_accum_steps


def trainer_for_epochs(
    trainer: TrainerConfig, epochs: int, samples: int, lr_drop_epochs: Sequence[int] = (), source: str = "data"
) -> tuple[TrainerConfig, int]:
    """``trainer`` with an epoch-based schedule (the reference codes' ``--epochs`` / ``--lr_drop``) in steps.

    One epoch is :func:`steps_per_epoch` optimizer steps.

    Args:
        trainer: the run's trainer options; ``max_steps`` is replaced.
        epochs: passes over the training samples.
        samples: training samples of one epoch.
        lr_drop_epochs: epochs after which the lr drops (``schedule: step``); become ``lr_drop_steps``.
        source: what the samples come from, for the error messages (a file or folder).

    Returns:
        The resolved trainer options and the optimizer steps per epoch.

    Raises:
        ValueError: the samples do not fill one optimizer step, or ``lr_drop_epochs`` is given beside
            ``trainer.lr_drop_steps``.
    """
    per_epoch = steps_per_epoch(trainer, samples)
    if per_epoch < 1:
        raise ValueError(f"{source}: {samples} training samples do not fill one batch of trainer.batch_size="
                         f"{trainer.batch_size} x grad_accum_steps={trainer.grad_accum_steps}")
    updates: dict[str, Any] = {"max_steps": epochs * per_epoch}
    if lr_drop_epochs:
        if trainer.lr_drop_steps:
            raise ValueError(f"give lr drop epochs ({list(lr_drop_epochs)}) or trainer.lr_drop_steps "
                             f"({trainer.lr_drop_steps}), not both")
        updates["lr_drop_steps"] = [epoch * per_epoch for epoch in lr_drop_epochs]
    return TrainerConfig.model_validate({**trainer.model_dump(), **updates}), per_epoch


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


def apply_update_rules(
    step: int, optimizer: torch.optim.Optimizer, frozen: list[nn.Parameter], config: TrainerConfig
) -> None:
    """Apply the freeze, the gradient clipping and the weight decay of optimizer step ``step`` (0-based).

    Args:
        step: optimizer steps already taken.
        optimizer: from :func:`build_optimizer`, gradients computed.
        frozen: :func:`frozen_parameters` of the model.
        config: the trainer options.
    """
    if frozen and step < config.freeze_parameters.steps:
        # No gradient (rather than a zero one) makes the optimizer skip these parameters
        # entirely: no weight decay and no moment updates either. Dropped before clipping so
        # that they do not count in a global norm.
        for parameter in frozen:
            parameter.grad = None
    if config.grad_clip_norm is not None:
        trained = [p for group in optimizer.param_groups for p in group["params"]]
        clip_gradients(trained, config.grad_clip_norm, config.grad_clip_mode)
    # Set on every step, also without a schedule, so a resumed run follows the current config
    # rather than the group value stored in its checkpoint.
    weight_decay = weight_decay_at(step, config)
    for group in optimizer.param_groups:
        if not group.get(EXEMPT_FROM_DECAY, False):
            group["weight_decay"] = weight_decay
