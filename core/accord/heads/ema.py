"""Exponential-moving-average (momentum) teacher for BYOL / MoCo / DINO / iBOT / Alice."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["EMATeacher"]


class EMATeacher(nn.Module):
    """A frozen copy of a student network, updated as an EMA of the student's weights.

    The teacher is a deep copy of ``student`` taken at construction (so both start identical, as in
    DINO). Its parameters have ``requires_grad=False`` and :meth:`forward` runs under
    ``torch.no_grad()``, so the teacher never receives or builds gradients; its outputs are targets.

    Update rule (:meth:`update`), with momentum ``m``:

    - parameters: ``theta_t <- m * theta_t + (1 - m) * theta_s``;
    - buffers (BatchNorm running mean / var, ``num_batches_tracked``, any other buffer): **copied**
      from the student. Averaging them would give statistics of no network that ever ran (and is
      meaningless for the integer counter); the student's statistics were measured on the same data
      distribution with nearly the same weights, which is what the teacher's eval-mode BatchNorm
      needs.

    Mode: the teacher follows the usual ``train()`` / ``eval()`` switch of the module tree it lives
    in. In train mode its BatchNorm layers normalise with the current batch statistics (as the
    target networks of MoCo, BYOL and DINO do); the running statistics it accumulates are
    overwritten by the next :meth:`update`. In eval mode it uses the copied student statistics.

    Args:
        student: the online network; it is deep-copied, never modified.

    Example:
        >>> student = nn.Linear(4, 2)
        >>> teacher = EMATeacher(student)
        >>> teacher.update(student, momentum=0.996)
        >>> teacher(torch.randn(3, 4)).requires_grad
        False
    """

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise ValueError(f"student: expected an nn.Module, got {type(student).__name__}")
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float) -> None:
        """EMA step towards ``student`` (call after the optimiser step).

        Args:
            student: the online network; must have the teacher's parameter and buffer names and
                shapes (the module it was built from).
            momentum: ``m`` in ``[0, 1]``; 1 leaves the teacher unchanged, 0 copies the student.

        Raises:
            ValueError: ``momentum`` outside ``[0, 1]`` or a student with a different structure.
        """
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: expected a value in [0, 1], got {momentum!r}")
        teacher_params = dict(self.teacher.named_parameters())
        student_params = dict(student.named_parameters())
        teacher_buffers = dict(self.teacher.named_buffers())
        student_buffers = dict(student.named_buffers())
        self._check_same_structure(teacher_params, student_params, "parameters")
        self._check_same_structure(teacher_buffers, student_buffers, "buffers")
        for name, teacher_param in teacher_params.items():
            # lerp(t, s, 1 - m) = m * t + (1 - m) * s; torch's lerp is exact at both ends.
            teacher_param.lerp_(student_params[name].detach(), 1.0 - momentum)
        for name, teacher_buffer in teacher_buffers.items():
            teacher_buffer.copy_(student_buffers[name])

    @staticmethod
    def _check_same_structure(
        teacher: dict[str, torch.Tensor], student: dict[str, torch.Tensor], kind: str
    ) -> None:
        if teacher.keys() != student.keys():
            missing = sorted(teacher.keys() - student.keys())
            extra = sorted(student.keys() - teacher.keys())
            raise ValueError(
                f"student: {kind} differ from the teacher's; missing {missing}, unexpected {extra}"
            )
        for name, tensor in teacher.items():
            if tensor.shape != student[name].shape:
                raise ValueError(
                    f"student: {kind[:-1]} {name!r} has shape {tuple(student[name].shape)}, "
                    f"the teacher's has {tuple(tensor.shape)}"
                )

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the teacher without gradient; arguments and outputs are those of the student."""
        return self.teacher(*args, **kwargs)
