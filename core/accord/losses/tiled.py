"""Tiled contrastive row statistics whose memory is linear in the batch (Inf-CL style, pure PyTorch).

A contrastive loss over query rows ``q_i`` and key columns ``k_j`` needs, per row, the log-sum-exp
of the logits ``s_ij = scale * q_i . k_j`` over the row's candidate columns, and a target-weighted
logit ``sum_j t_ij s_ij``. Materialising the ``N x M`` logits costs ``O(N M)`` memory. This module
streams the keys in ``tile_size x tile_size`` tiles instead:

* forward: an online log-sum-exp per row (running max + running sum, rescaled whenever the max
  grows), so only the ``(N,)`` LSE survives the forward pass;
* backward: each tile's logits are recomputed and turned into ``softmax * grad`` on the spot, then
  multiplied into ``dq`` and ``dk`` (two matmuls), so the logits never exist as a whole in either
  pass (engine spec §A4, §A8).

Targets that are linear in the keys (a positive index, or uniform over label-equal keys) do not need
tiles at all: their weighted logit is ``q_i . (mean of the positive keys)`` and is computed in closed
form by :mod:`accord.losses.infonce`. Soft targets, ``t_i = softmax_j(teacher logits)``, mix every
key with a query-dependent weight, so they are streamed here too: the teacher LSE is streamed first,
then the student pass accumulates ``sum_j t_ij s_ij`` tile by tile, and the backward recomputes
``t_ij`` from the teacher features and the stored teacher LSE.

The dense reference (``accord.losses.infonce``) builds its masks and teacher weights with the same
block helpers (:func:`self_positions`, :func:`teacher_logits`, :func:`teacher_weights_`), so the two
paths cannot disagree on what a candidate or a target is.

Per-row candidate sets (each query row its own ``K`` key indices, :func:`candidate_logsumexp`) are
chunked by rows instead: a chunk gathers its rows' candidate keys, ``(R, K, D)`` with
``R * K * D <= tile_size ** 2``, and the backward gathers them again, so the gathered keys of all
rows never exist at once either.

Why CPU-friendly choices: each pass reuses one preallocated tile buffer and works in place, because
on CPU a fresh multi-MiB tensor per tile costs more in page faults than the tile's matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from accord.losses.precision import autocast_disabled

__all__ = [
    "DEFAULT_TILE_SIZE",
    "TeacherTargets",
    "self_positions",
    "teacher_logits",
    "teacher_weights_",
    "streamed_logsumexp",
    "TiledRowStats",
    "tiled_row_stats",
    "candidate_logits",
    "CandidateLogSumExp",
    "candidate_logsumexp",
]

#: Edge of a logits tile. 2048 x 2048 fp32 is a 16 MiB buffer: small against the dense matrix yet
#: large enough that each tile's matmul runs at full speed (tuned in docs/benchmarks.md).
DEFAULT_TILE_SIZE = 2048


@dataclass(frozen=True)
class TeacherTargets:
    """Soft targets ``t_ij = softmax_j(scale * query_i . keys_j)`` over the same candidates as the student.

    The teacher receives no gradient (targets are constants of the student's objective).

    Attributes:
        query: ``(N, Dt)`` L2-normalised teacher features of the query rows.
        keys: ``(M, Dt)`` L2-normalised teacher features of the key columns.
        scale: ``1 / teacher_temperature``.
    """

    query: torch.Tensor
    keys: torch.Tensor
    scale: float


def _tile_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous ``(rows, cols)`` view at the start of a flat buffer (edge tiles are smaller)."""
    return buffer[: rows * cols].view(rows, cols)


def self_positions(
    self_index: torch.Tensor, col_start: int, n_cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's own column falls inside a block of columns.

    Args:
        self_index: ``(R,)`` global column index of each block row's own (excluded) column.
        col_start: global index of the block's first column.
        n_cols: number of columns in the block.

    Returns:
        ``(rows, cols)``: 1-D index tensors of the excluded entries inside the ``(R, n_cols)`` block.
    """
    cols = self_index - col_start
    rows = torch.nonzero((cols >= 0) & (cols < n_cols)).squeeze(1)
    return rows, cols[rows]


def teacher_logits(
    teacher: TeacherTargets,
    rows: slice,
    cols: slice,
    self_index: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher logits of one block, with each row's own column set to ``-inf`` when excluded.

    Args:
        teacher: the teacher features.
        rows: query rows of the block.
        cols: key columns of the block (``cols.start`` is the global column of the first one).
        self_index: ``(R,)`` own-column index of the block rows, or ``None`` without self-exclusion.
        out: optional ``(R, C)`` buffer to write into.

    Returns:
        ``(R, C)`` teacher logits ``teacher.scale * query_i . keys_j``.
    """
    logits = torch.mm(teacher.query[rows], teacher.keys[cols].T, out=out).mul_(teacher.scale)
    if self_index is not None:
        logits[self_positions(self_index, cols.start, logits.shape[1])] = float("-inf")
    return logits


def teacher_weights_(logits: torch.Tensor, teacher_lse: torch.Tensor) -> torch.Tensor:
    """Turn a block of teacher logits into target weights ``exp(u_ij - LSE_i)``, in place.

    Args:
        logits: ``(R, C)`` teacher logits of the block (overwritten).
        teacher_lse: ``(R,)`` teacher log-sum-exp of the block rows over all their candidates.

    Returns:
        ``logits``, now holding the block of the row-normalised target distribution.
    """
    return logits.sub_(teacher_lse[:, None]).exp_()


def _stream_rows(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    self_index: torch.Tensor | None,
    teacher: TeacherTargets | None,
    teacher_lse: torch.Tensor | None,
    tile_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One streaming pass: per-row LSE and (with a teacher) the soft-target weighted logit.

    Returns:
        ``lse`` ``(N,)`` and ``target_logit`` ``(N,)`` (zeros without a teacher).
    """
    n_rows, n_cols = query.shape[0], keys.shape[0]
    lse = query.new_empty(n_rows)
    target_logit = query.new_zeros(n_rows)
    logits_buffer = query.new_empty(min(tile_size, n_rows) * min(tile_size, n_cols))
    teacher_buffer = torch.empty_like(logits_buffer) if teacher is not None else None
    for row_start in range(0, n_rows, tile_size):
        rows = slice(row_start, min(row_start + tile_size, n_rows))
        query_block = query[rows] * scale
        row_self = self_index[rows] if self_index is not None else None
        running_max = torch.full_like(lse[rows], float("-inf"))
        running_sum = torch.zeros_like(lse[rows])
        for col_start in range(0, n_cols, tile_size):
            cols = slice(col_start, min(col_start + tile_size, n_cols))
            keys_tile = keys[cols]
            tile_shape = (query_block.shape[0], keys_tile.shape[0])
            logits = torch.mm(query_block, keys_tile.T, out=_tile_view(logits_buffer, *tile_shape))
            if teacher is not None:
                weights = teacher_logits(
                    teacher, rows, cols, row_self, out=_tile_view(teacher_buffer, *tile_shape)
                )
                teacher_weights_(weights, teacher_lse[rows])
                # Raw logits here: the excluded column has weight exactly 0, and 0 * -inf would be NaN.
                target_logit[rows] += weights.mul_(logits).sum(dim=1)
            if row_self is not None:
                logits[self_positions(row_self, col_start, tile_shape[1])] = float("-inf")
            new_max = torch.maximum(running_max, logits.amax(dim=1))
            # A row whose candidates so far are all excluded has max -inf; shift by a finite number
            # so exp() yields 0 rather than NaN.
            shift = new_max.clamp_min(torch.finfo(logits.dtype).min)
            running_sum.mul_(torch.exp(running_max - shift))
            running_sum += logits.sub_(shift[:, None]).exp_().sum(dim=1)
            running_max = new_max
        lse[rows] = running_max + running_sum.log()
    return lse, target_logit


@torch.no_grad()
def streamed_logsumexp(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    self_index: torch.Tensor | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> torch.Tensor:
    """Row-wise ``logsumexp_j(scale * query_i . keys_j)`` without building the logits (no gradient).

    Args:
        query: ``(N, D)``.
        keys: ``(M, D)``.
        scale: logit scale.
        self_index: ``(N,)`` column excluded from each row, or ``None``.
        tile_size: tile edge.

    Returns:
        ``(N,)`` log-sum-exp; ``-inf`` for a row without candidates.
    """
    with autocast_disabled(query.device):
        return _stream_rows(query, keys, scale, self_index, None, None, tile_size)[0]


class TiledRowStats(torch.autograd.Function):
    """Autograd function for the tiled row statistics (see :func:`tiled_row_stats`).

    Saves only the inputs and the ``(N,)`` LSEs; the backward recomputes every tile.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        query: torch.Tensor,
        keys: torch.Tensor,
        scale: float,
        self_index: torch.Tensor | None,
        teacher: TeacherTargets | None,
        tile_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        teacher_lse = None
        if teacher is not None:
            teacher_lse = streamed_logsumexp(teacher.query, teacher.keys, teacher.scale, self_index, tile_size)
        with autocast_disabled(query.device):
            lse, target_logit = _stream_rows(query, keys, scale, self_index, teacher, teacher_lse, tile_size)
        ctx.save_for_backward(query, keys, lse, teacher_lse, self_index)
        ctx.scale, ctx.teacher, ctx.tile_size = scale, teacher, tile_size
        if teacher is None:
            ctx.mark_non_differentiable(target_logit)
        return lse, target_logit

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_lse: torch.Tensor, grad_target: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        query, keys, lse, teacher_lse, self_index = ctx.saved_tensors
        scale, teacher, tile_size = ctx.scale, ctx.teacher, ctx.tile_size
        want_dq, want_dk = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_rows, n_cols = query.shape[0], keys.shape[0]
        dq = torch.zeros_like(query) if want_dq else None
        dk = torch.zeros_like(keys) if want_dk else None
        use_teacher = teacher is not None and bool(grad_target.any())
        with torch.no_grad(), autocast_disabled(query.device):
            logits_buffer = query.new_empty(min(tile_size, n_rows) * min(tile_size, n_cols))
            teacher_buffer = torch.empty_like(logits_buffer) if use_teacher else None
            for row_start in range(0, n_rows, tile_size):
                rows = slice(row_start, min(row_start + tile_size, n_rows))
                query_block = query[rows] * scale
                row_self = self_index[rows] if self_index is not None else None
                for col_start in range(0, n_cols, tile_size):
                    cols = slice(col_start, min(col_start + tile_size, n_cols))
                    keys_tile = keys[cols]
                    # d lse_i / d s_ij = softmax_ij and d target_i / d s_ij = t_ij, so the logit
                    # gradient of the tile is softmax * grad_lse + t * grad_target.
                    tile_shape = (query_block.shape[0], keys_tile.shape[0])
                    grad_logits = torch.mm(query_block, keys_tile.T, out=_tile_view(logits_buffer, *tile_shape))
                    if row_self is not None:
                        grad_logits[self_positions(row_self, col_start, tile_shape[1])] = float("-inf")
                    grad_logits.sub_(lse[rows, None]).exp_().mul_(grad_lse[rows, None])
                    if use_teacher:
                        weights = teacher_logits(
                            teacher, rows, cols, row_self, out=_tile_view(teacher_buffer, *tile_shape)
                        )
                        teacher_weights_(weights, teacher_lse[rows])
                        grad_logits.add_(weights.mul_(grad_target[rows, None]))
                    # s_ij = scale * q_i . k_j, so dq_i = scale * sum_j g_ij k_j and
                    # dk_j = sum_i g_ij (scale * q_i).
                    if dq is not None:
                        dq[rows].addmm_(grad_logits, keys_tile, alpha=scale)
                    if dk is not None:
                        dk[cols].addmm_(grad_logits.T, query_block)
        return dq, dk, None, None, None, None


def tiled_row_stats(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    self_index: torch.Tensor | None = None,
    teacher: TeacherTargets | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp and soft-target logit of ``scale * query @ keys.T``, in linear memory.

    Differentiable in ``query`` and ``keys`` (the teacher gets no gradient). Peak extra memory is
    two ``tile_size x tile_size`` buffers plus ``O((N + M) D)`` for inputs and gradients.

    Args:
        query: ``(N, D)`` floating query rows (normalise them first for cosine logits).
        keys: ``(M, D)`` key columns, same dtype as ``query``.
        scale: logit scale, ``1 / temperature``.
        self_index: ``(N,)`` long, the column removed from each row's candidates (NT-Xent's own
            view), or ``None``.
        teacher: soft targets over the same candidates, or ``None``.
        tile_size: edge of the square logits tile; any ``N`` and ``M`` work, tiles need not divide them.

    Returns:
        ``(lse, target_logit)``, both ``(N,)``: ``lse_i = logsumexp_{j candidate} s_ij`` and
        ``target_logit_i = sum_j t_ij s_ij`` (zeros, without gradient, when ``teacher`` is ``None``).

    Shape:
        - query: :math:`(N, D)`
        - keys: :math:`(M, D)`
        - output: two tensors of shape :math:`(N,)`
    """
    return TiledRowStats.apply(query, keys, scale, self_index, teacher, tile_size)


def candidate_logits(
    query: torch.Tensor, keys: torch.Tensor, candidates: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of query rows against their own candidate keys, ``-inf`` where a candidate is not valid.

    Shared by the dense path of :func:`accord.losses.info_nce` and by :class:`CandidateLogSumExp`,
    so both agree on what a row's candidates are.

    Args:
        query: ``(R, D)`` query rows, already multiplied by the logit scale.
        keys: ``(M, D)`` all key columns.
        candidates: ``(R, K)`` long indices into ``keys``; entries that are not valid must still be
            in range (set them to 0).
        valid: ``(R, K)`` bool, which entries count.

    Returns:
        ``(logits, gathered)``: ``(R, K)`` logits ``query_r . keys[candidates[r, k]]`` (``-inf``
        where not valid) and the ``(R, K, D)`` gathered candidate keys.
    """
    gathered = keys[candidates]
    logits = torch.einsum("rd,rkd->rk", query, gathered).masked_fill(~valid, float("-inf"))
    return logits, gathered


def _candidate_chunks(n_rows: int, n_candidates: int, dim: int, tile_size: int) -> list[slice]:
    """Row chunks whose gathered candidate keys ``(R, K, D)`` hold at most ``tile_size ** 2`` values."""
    rows_per_chunk = max(1, tile_size**2 // max(1, n_candidates * dim))
    return [slice(start, min(start + rows_per_chunk, n_rows)) for start in range(0, n_rows, rows_per_chunk)]


class CandidateLogSumExp(torch.autograd.Function):
    """Autograd function of :func:`candidate_logsumexp`; saves only the inputs and the ``(N,)`` LSE."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        query: torch.Tensor,
        keys: torch.Tensor,
        scale: float,
        candidates: torch.Tensor,
        valid: torch.Tensor,
        tile_size: int,
    ) -> torch.Tensor:
        lse = query.new_empty(query.shape[0])
        with autocast_disabled(query.device):
            for rows in _candidate_chunks(*candidates.shape, query.shape[1], tile_size):
                logits, _ = candidate_logits(query[rows] * scale, keys, candidates[rows], valid[rows])
                lse[rows] = torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(query, keys, candidates, valid, lse)
        ctx.scale, ctx.tile_size = scale, tile_size
        return lse

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_lse: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        query, keys, candidates, valid, lse = ctx.saved_tensors
        scale, tile_size = ctx.scale, ctx.tile_size
        dq = torch.zeros_like(query) if ctx.needs_input_grad[0] else None
        dk = torch.zeros_like(keys) if ctx.needs_input_grad[1] else None
        # A row without any valid candidate has LSE -inf; exp(-inf - 0) = 0 gives it zero weights
        # where exp(-inf - (-inf)) would be NaN.
        finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        with torch.no_grad(), autocast_disabled(query.device):
            for rows in _candidate_chunks(*candidates.shape, query.shape[1], tile_size):
                query_block = query[rows] * scale
                logits, gathered = candidate_logits(query_block, keys, candidates[rows], valid[rows])
                # d lse_r / d s_rk = softmax_rk, so the logit gradient is softmax * grad_lse.
                grad_logits = logits.sub_(finite_lse[rows, None]).exp_().mul_(grad_lse[rows, None])
                # s_rk = scale * q_r . k_c(r, k): dq_r = scale * sum_k g_rk k_c and dk_c += g_rk scale q_r.
                if dq is not None:
                    dq[rows] = torch.einsum("rk,rkd->rd", grad_logits, gathered).mul_(scale)
                if dk is not None:
                    contributions = grad_logits[:, :, None] * query_block[:, None, :]
                    dk.index_add_(0, candidates[rows].flatten(), contributions.flatten(0, 1))
        return dq, dk, None, None, None, None


def candidate_logsumexp(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    candidates: torch.Tensor,
    valid: torch.Tensor,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> torch.Tensor:
    """Per-row ``logsumexp_k(scale * query_i . keys[candidates[i, k]])`` over valid ``k``, chunked.

    Differentiable in ``query`` and ``keys``. Peak extra memory is one chunk of gathered keys
    (``R * K * D <= tile_size ** 2`` values, at least one row) plus ``O((N + M) D)``.

    Args:
        query: ``(N, D)`` floating query rows.
        keys: ``(M, D)`` key columns, same dtype as ``query``.
        scale: logit scale, ``1 / temperature``.
        candidates: ``(N, K)`` long indices into ``keys`` (in range also where not valid).
        valid: ``(N, K)`` bool, which candidates count.
        tile_size: bounds a chunk of gathered keys to ``tile_size ** 2`` values.

    Returns:
        ``(N,)`` log-sum-exp; ``-inf`` for a row without a valid candidate (its gradient is 0).

    Shape:
        - query: :math:`(N, D)`
        - keys: :math:`(M, D)`
        - candidates, valid: :math:`(N, K)`
        - output: :math:`(N,)`
    """
    return CandidateLogSumExp.apply(query, keys, scale, candidates, valid, tile_size)
