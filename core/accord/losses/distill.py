"""Self-distillation losses with a centred, sharpened teacher: DINO (image level), iBOT (token level).

Both losses are the cross-entropy ``H(P_t, log P_s)`` between a teacher distribution
``P_t = softmax((t - c) / tau_t)`` (no gradient) and a student log-distribution
``log P_s = log_softmax(s / tau_s)``. The centre ``c`` is an EMA of the mean teacher output and,
together with the low teacher temperature, prevents collapse (DINO, arXiv 2104.14294, Sec. 3.1).

Centre and distributed training: the loss is computed with the current centre, then (in training
mode only) ``c <- m * c + (1 - m) * mean(t)``. With ``gather_distributed`` the mean is taken over the
global batch by all-reducing the teacher-output sum and row count. That all-reduce is deliberately
*not* autograd-aware: the centre is a buffer that never carries gradient, so there is nothing for a
backward to reduce (contrast the cross-rank statistics of accord.dist's docstring, which do). The
loss itself is a per-sample mean, so no gather is needed for it: with equal local batches DDP's
gradient averaging already yields the gradient of the global mean.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from accord import dist as accord_dist
from accord.utils.checks import check_finite, check_positive, check_tensor
from accord.losses.precision import float32_forward
from accord.utils.schedules import linear_schedule

__all__ = ["DINOLoss", "IBOTPatchLoss"]


class _CentredTeacherDistillation(nn.Module):
    """Shared parts of DINO and iBOT: temperatures, teacher distribution, centre buffer and update."""

    def __init__(
        self,
        out_dim: int,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.04,
        warmup_teacher_temperature: float | None = None,
        teacher_temperature_warmup_steps: int = 0,
        center_momentum: float = 0.9,
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim <= 0:
            raise ValueError(f"out_dim: expected a positive int, got {out_dim!r}")
        check_positive(student_temperature, "student_temperature")
        check_positive(teacher_temperature, "teacher_temperature")
        if warmup_teacher_temperature is not None:
            check_positive(warmup_teacher_temperature, "warmup_teacher_temperature")
        if (
            isinstance(teacher_temperature_warmup_steps, bool)
            or not isinstance(teacher_temperature_warmup_steps, int)
            or teacher_temperature_warmup_steps < 0
        ):
            raise ValueError(
                "teacher_temperature_warmup_steps: expected a non-negative int, "
                f"got {teacher_temperature_warmup_steps!r}"
            )
        if (warmup_teacher_temperature is None) != (teacher_temperature_warmup_steps == 0):
            raise ValueError(
                "warmup_teacher_temperature and teacher_temperature_warmup_steps: give both (a "
                f"warm-up) or neither, got {warmup_teacher_temperature!r} and {teacher_temperature_warmup_steps!r}"
            )
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum: expected a value in [0, 1], got {center_momentum!r}")
        self.out_dim = out_dim
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.teacher_temperature_warmup_steps = teacher_temperature_warmup_steps
        self.center_momentum = center_momentum
        self.gather_distributed = gather_distributed
        # Persistent: a resumed run must continue from the same centre.
        self.center: torch.Tensor
        self.register_buffer("center", torch.zeros(out_dim))

    def teacher_temperature_at(self, step: int | None) -> float:
        """Teacher temperature at ``step``: linear warm-up, then constant.

        Args:
            step: the warm-up counter (epochs in DINO / Alice, or iterations; the unit of
                ``teacher_temperature_warmup_steps``). Required only when a warm-up is configured.

        Returns:
            ``warmup_teacher_temperature`` at step 0, rising linearly to ``teacher_temperature`` at
            ``teacher_temperature_warmup_steps`` and staying there.
        """
        if self.warmup_teacher_temperature is None:
            return self.teacher_temperature
        if step is None:
            raise ValueError("step: required because a teacher-temperature warm-up is configured")
        return linear_schedule(
            step, self.teacher_temperature_warmup_steps, self.warmup_teacher_temperature, self.teacher_temperature
        )

    def _teacher_probabilities(self, teacher_logits: torch.Tensor, step: int | None) -> torch.Tensor:
        temperature = self.teacher_temperature_at(step)
        return F.softmax((teacher_logits.detach() - self.center) / temperature, dim=-1)

    def _check_logits(self, tensor: torch.Tensor, name: str, ndim: int) -> None:
        check_tensor(tensor, name, ndim=ndim, floating=True)
        if tensor.shape[-1] != self.out_dim or tensor.numel() == 0:
            raise ValueError(
                f"{name}: expected a non-empty tensor with last dim out_dim={self.out_dim}, "
                f"got shape {tuple(tensor.shape)}"
            )
        check_finite(tensor, name)

    @torch.no_grad()
    def _update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the (global) batch mean of ``teacher_logits`` ``(N, K)``, before centring."""
        # One vector [sum over rows, row count] so a single all-reduce gives an exact global mean
        # even when ranks hold different numbers of rows.
        sum_and_count = torch.cat(
            [teacher_logits.sum(dim=0), teacher_logits.new_tensor([teacher_logits.shape[0]])]
        )
        if self.gather_distributed and accord_dist.is_distributed():
            torch_dist.all_reduce(sum_and_count, op=torch_dist.ReduceOp.SUM)
        batch_center = (sum_and_count[:-1] / sum_and_count[-1]).to(self.center.dtype)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


def _stack_views(views: torch.Tensor | Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """``(V, B, K)`` from a stacked tensor or a non-empty sequence of equally shaped ``(B, K)`` views."""
    if isinstance(views, torch.Tensor):
        check_tensor(views, name, ndim=3)
        return views
    if not isinstance(views, (list, tuple)) or len(views) == 0:
        raise ValueError(f"{name}: expected a non-empty list of (B, K) tensors or a (V, B, K) tensor")
    for index, view in enumerate(views):
        check_tensor(view, f"{name}[{index}]", shape=tuple(views[0].shape) if index else (None, None))
    return torch.stack(tuple(views))


class DINOLoss(_CentredTeacherDistillation):
    """DINO cross-view self-distillation loss (arXiv 2104.14294, Algorithm 1).

    With teacher views ``t_i`` (the global crops, ``i < V_t``) and student views ``s_j`` (the same
    global crops first, in the same order, then any local crops, ``j < V_s``):

    ``L = mean_{(i, j): i != j} mean_b H(softmax((t_ib - c) / tau_t), log_softmax(s_jb / tau_s))``

    Same-view pairs ``(i, i)`` are excluded, so Alice's two-view loss
    ``(H(P_t(q), s(a)) + H(P_t(a), s(q))) / 2`` (medssl §1.8) is the case ``V_t = V_s = 2``.

    Args:
        out_dim: number of prototypes ``K`` (the head's output size).
        student_temperature: ``tau_s``.
        teacher_temperature: ``tau_t`` (after any warm-up).
        warmup_teacher_temperature: teacher temperature at step 0 of a linear warm-up (DINO 0.04 ->
            0.07, Alice 0.008 -> 0.01); ``None`` for a constant ``teacher_temperature``.
        teacher_temperature_warmup_steps: warm-up length in the unit of ``forward``'s ``step``; the
            warm-up reaches ``teacher_temperature`` at exactly this step.
        center_momentum: ``m`` of the centre EMA.
        gather_distributed: compute the centre's batch mean over all ranks. Leave it on in any
            multi-process run, or the ranks' centres drift apart.

    Shape:
        - ``teacher_out``: ``V_t`` views of ``(B, K)`` (list) or ``(V_t, B, K)``.
        - ``student_out``: ``V_s >= max(V_t, 2)`` views of ``(B, K)`` or ``(V_s, B, K)``.
        - Output: scalar.

    Example:
        >>> loss_fn = DINOLoss(out_dim=8)
        >>> teacher = [torch.randn(4, 8) for _ in range(2)]
        >>> student = [torch.randn(4, 8, requires_grad=True) for _ in range(4)]
        >>> loss_fn(teacher, student).shape
        torch.Size([])
    """

    @float32_forward
    def forward(
        self,
        teacher_out: torch.Tensor | Sequence[torch.Tensor],
        student_out: torch.Tensor | Sequence[torch.Tensor],
        step: int | None = None,
    ) -> torch.Tensor:
        """Loss over all cross-view (teacher, student) pairs; updates the centre in training mode.

        Args:
            teacher_out: teacher head outputs (logits), one per global view; never back-propagated.
            student_out: student head outputs (logits); the first ``V_t`` are the teacher's views.
            step: teacher-temperature warm-up counter (see :meth:`teacher_temperature_at`).

        Returns:
            The scalar loss.
        """
        teacher = _stack_views(teacher_out, "teacher_out")
        student = _stack_views(student_out, "student_out")
        self._check_logits(teacher, "teacher_out", ndim=3)
        self._check_logits(student, "student_out", ndim=3)
        num_teacher_views, batch_size, _ = teacher.shape
        num_student_views = student.shape[0]
        if student.shape[1] != batch_size:
            raise ValueError(
                f"student_out: expected batch size {batch_size} (as teacher_out), got shape {tuple(student.shape)}"
            )
        if num_student_views < max(num_teacher_views, 2):
            raise ValueError(
                f"student_out: expected at least max(V_t, 2) = {max(num_teacher_views, 2)} views (the "
                f"teacher's views first, and at least one cross-view pair), got {num_student_views}"
            )
        teacher_probs = self._teacher_probabilities(teacher, step)
        student_log_probs = F.log_softmax(student / self.student_temperature, dim=-1)
        # pair_loss[i, j] = mean_b H(teacher view i, student view j)
        pair_loss = -torch.einsum("ibk,jbk->ij", teacher_probs, student_log_probs) / batch_size
        same_view = torch.eye(num_teacher_views, num_student_views, dtype=torch.bool, device=pair_loss.device)
        loss = pair_loss[~same_view].mean()
        if self.training:
            self._update_center(teacher.reshape(-1, self.out_dim))
        return loss


class IBOTPatchLoss(_CentredTeacherDistillation):
    """iBOT masked-token self-distillation loss (arXiv 2111.07832, Eq. 2), with its own centre.

    Per token, the cross-entropy between the centred, sharpened teacher token distribution (teacher
    sees the unmasked view) and the student token distribution (student sees the masked view), at
    the same position of the same view:

    ``L = mean_b [ sum_t m_bt H(P_t(t_bt), log P_s(s_bt)) / max(1, sum_t m_bt) ]``

    - ``mask`` given (iBOT): only masked tokens count. A sample with no masked token contributes 0
      but still counts in the mean over samples, exactly as iBOT's reference code (which masks only
      part of the images); so a batch with no masked token at all gives a loss of 0 that is still
      attached to the graph (DDP sees every parameter used).
    - ``mask=None`` (Alice's CASA token loss, medssl §1.8): every token counts.

    Views: stack the views into the batch dim (``(V * B, T, K)``); the mean over samples then equals
    iBOT / Alice's average over views of per-view means.

    Centre: EMA of the mean over *all* teacher tokens (masked or not), as iBOT and Alice do
    (``c2 <- m c2 + (1 - m) mean_b mean_t t_bt``).

    Args:
        out_dim: token prototype count ``K``.
        student_temperature: ``tau_s``.
        teacher_temperature: ``tau_t`` (after any warm-up).
        warmup_teacher_temperature: start of a linear teacher-temperature warm-up, or ``None``.
        teacher_temperature_warmup_steps: warm-up length in the unit of ``forward``'s ``step``.
        center_momentum: ``m`` of the centre EMA.
        gather_distributed: average the centre's batch mean over all ranks.

    Shape:
        - ``teacher_out``, ``student_out``: ``(B, T, K)``.
        - ``mask``: bool ``(B, T)``, True where the student's token was masked.
        - Output: scalar.
    """

    @float32_forward
    def forward(
        self,
        teacher_out: torch.Tensor,
        student_out: torch.Tensor,
        mask: torch.Tensor | None = None,
        step: int | None = None,
    ) -> torch.Tensor:
        """Masked-token distillation loss; updates the centre in training mode.

        Args:
            teacher_out: teacher token logits (unmasked input); never back-propagated.
            student_out: student token logits (masked input), same shape.
            mask: which tokens were masked for the student; ``None`` uses all tokens.
            step: teacher-temperature warm-up counter (see :meth:`teacher_temperature_at`).

        Returns:
            The scalar loss.
        """
        self._check_logits(teacher_out, "teacher_out", ndim=3)
        self._check_logits(student_out, "student_out", ndim=3)
        if student_out.shape != teacher_out.shape:
            raise ValueError(
                f"student_out: expected the teacher_out shape {tuple(teacher_out.shape)} (B, T, K), "
                f"got {tuple(student_out.shape)}"
            )
        teacher_probs = self._teacher_probabilities(teacher_out, step)
        student_log_probs = F.log_softmax(student_out / self.student_temperature, dim=-1)
        token_loss = -(teacher_probs * student_log_probs).sum(dim=-1)
        if mask is None:
            per_sample = token_loss.mean(dim=1)
        else:
            if not isinstance(mask, torch.Tensor) or mask.shape != teacher_out.shape[:2] or mask.dtype != torch.bool:
                got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(
                    f"mask: expected a bool tensor of shape (B, T) = {tuple(teacher_out.shape[:2])}, got {got}"
                )
            weights = mask.to(token_loss.dtype)
            per_sample = (token_loss * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        loss = per_sample.mean()
        if self.training:
            self._update_center(teacher_out.reshape(-1, self.out_dim))
        return loss
