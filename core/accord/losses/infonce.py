"""The InfoNCE family: one contrastive core and the losses built on it.

For L2-normalised query rows ``q_i`` ``(N, D)`` and key columns ``k_j`` ``(M, D)`` the logits are
``s_ij = q_i . k_j / temperature`` and the loss of row ``i`` is

    loss_i = -sum_j t_ij s_ij + logsumexp_{j in C_i} s_ij

where ``C_i`` is row ``i``'s candidate set (all key columns, minus its own column under
``exclude_self``, plus any extra ``negatives``; or, with per-row ``candidates``, only its positives
and the keys listed for it) and ``t_i`` is a target distribution over ``C_i``:

* **positive index** - one-hot at ``positive_index[i]``, or uniform over ``positive_index[i, :]``
  (multi-positive); without any target argument, row ``i`` is paired with key ``i``;
* **labels** - uniform over the candidates whose ``key_labels`` equals ``query_labels[i]``. This is
  SupCon's ``L_out`` (Khosla et al. 2020, eq. 2): the mean over positives of ``-log p_ip``;
* **soft** - ``t_i = softmax_j(teacher_query_i . teacher_key_j / teacher_temperature)`` over ``C_i``
  (teacher features are L2-normalised; the teacher gets no gradient). The loss is then the cross
  entropy ``H(t_i, p_i)``, which differs from ``KL(t_i || p_i)`` by the constant entropy of ``t_i``.

Numerics: logits are computed in fp32 (inputs are cast up and autocast is switched off inside, so
bf16 autocast still accumulates in fp32) and every normaliser is a log-sum-exp.

Memory: the dense path builds the ``N x M`` logits; the tiled path
(:mod:`accord.losses.tiled`) streams them in tiles and is used automatically once ``N * M`` exceeds
one ``tile_size x tile_size`` tile (per-row candidates: once the gathered candidate keys exceed
one tile, then gathered chunk by chunk). Index and label targets are linear in the keys, so their
weighted logit ``sum_j t_ij s_ij = q_i . mean(positive keys) / temperature`` is computed in closed
form (per-label key sums) by both paths, never through an ``N x M`` mask.

Distributed (engine spec §A7, pattern G): with ``gather_distributed`` each rank computes its local
query rows against the keys of all ranks (gathered with gradient, so every key's gradient returns to
its owner), indices and own columns are offset by ``rank * M_local``, and the per-rank mean lets
DDP's gradient averaging reproduce the single-process gradient of the global mean.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from accord import dist as adist
from accord.utils.checks import check_finite, check_index_range, check_positive, check_same_shape, check_tensor
from accord.losses.memory import MemoryQueue
from accord.losses.precision import autocast_disabled
from accord.losses.tiled import (
    DEFAULT_TILE_SIZE,
    TeacherTargets,
    candidate_logits,
    candidate_logsumexp,
    self_positions,
    teacher_logits,
    teacher_weights_,
    tiled_row_stats,
)

__all__ = [
    "info_nce",
    "InfoNCELoss",
    "NTXentLoss",
    "SupConLoss",
    "SoftTargetContrastiveLoss",
]

Reduction = Literal["mean", "sum", "none"]
NoPositive = Literal["raise", "exclude"]


def _check_options(
    temperature: float, no_positive: str = "raise", reduction: str = "mean", tile_size: int = DEFAULT_TILE_SIZE
) -> None:
    check_positive(temperature, "temperature")
    if no_positive not in ("raise", "exclude"):
        raise ValueError(f"no_positive: expected 'raise' or 'exclude', got {no_positive!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    if isinstance(tile_size, bool) or not isinstance(tile_size, int) or tile_size < 1:
        raise ValueError(f"tile_size: expected a positive int, got {tile_size!r}")


def _check_features(tensor: torch.Tensor, name: str, dim: int | None = None, min_rows: int = 1) -> torch.Tensor:
    check_tensor(tensor, name, shape=(None, dim), floating=True, min_rows=min_rows)
    check_finite(tensor, name)
    return tensor


def _dense_row_stats(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    self_index: torch.Tensor | None,
    teacher: TeacherTargets | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path of :func:`accord.losses.tiled.tiled_row_stats`, on the full logits matrix."""
    n_rows, n_cols = query.shape[0], keys.shape[0]
    # Scaling the (N, D) queries rather than the (N, M) product saves one N x M temporary.
    logits = (query * scale) @ keys.T
    candidates = logits
    if self_index is not None:
        candidates = logits.index_put(self_positions(self_index, 0, n_cols), logits.new_tensor(float("-inf")))
    lse = torch.logsumexp(candidates, dim=1)
    if teacher is None:
        return lse, lse.new_zeros(n_rows)
    with torch.no_grad():
        teacher_block = teacher_logits(teacher, slice(0, n_rows), slice(0, n_cols), self_index)
        weights = teacher_weights_(teacher_block, torch.logsumexp(teacher_block, dim=1))
    # Raw logits: excluded columns have weight exactly 0, and 0 * -inf would be NaN.
    return lse, (weights * logits).sum(dim=1)


def _row_stats(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    self_index: torch.Tensor | None,
    teacher: TeacherTargets | None,
    tile_size: int,
    tiled: bool | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row LSE over the candidates and soft-target logit, tiled or dense."""
    use_tiled = tiled if tiled is not None else query.shape[0] * keys.shape[0] > tile_size**2
    if use_tiled:
        return tiled_row_stats(query, keys, scale, self_index, teacher, tile_size)
    return _dense_row_stats(query, keys, scale, self_index, teacher)


def _label_targets(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    query_labels: torch.Tensor,
    key_labels: torch.Tensor,
    self_index: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean logit over label-equal candidates, via per-label key sums (no ``N x M`` mask).

    Returns:
        ``(target_logit, has_positive)``, both ``(N,)``.
    """
    n_keys = keys.shape[0]
    classes, inverse = torch.unique(torch.cat([key_labels, query_labels]), return_inverse=True)
    key_class, query_class = inverse[:n_keys], inverse[n_keys:]
    class_sums = keys.new_zeros(len(classes), keys.shape[1]).index_add(0, key_class, keys)
    positive_sums = class_sums[query_class]
    counts = torch.bincount(key_class, minlength=len(classes))[query_class]
    if self_index is not None:
        own_is_positive = key_labels[self_index] == query_labels
        positive_sums = positive_sums - own_is_positive[:, None] * keys[self_index]
        counts = counts - own_is_positive.long()
    target_logit = scale * (query * positive_sums).sum(dim=1) / counts.clamp_min(1)
    return target_logit, counts > 0


def _reduce(
    per_row: torch.Tensor,
    has_positive: torch.Tensor | None,
    reduction: str,
    no_positive: str,
    gather_distributed: bool,
) -> torch.Tensor:
    """Reduce over this rank's rows; rows without a positive raise or are dropped."""
    if has_positive is not None:
        local = torch.stack([(~has_positive).sum(), has_positive.sum()]).to(per_row.dtype)
        # Counted over all ranks so every rank raises together and the mean uses the global count.
        missing, valid = (adist.all_reduce_with_grad(local) if gather_distributed else local).tolist()
        if missing and no_positive == "raise":
            raise ValueError(
                f"query_labels: {int(missing)} row(s) have no positive among the key_labels "
                "candidates; pass no_positive='exclude' to leave them out of the loss"
            )
        per_row = torch.where(has_positive, per_row, torch.zeros_like(per_row))
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    if has_positive is None:
        return per_row.mean()
    world = adist.world_size() if gather_distributed else 1
    # Local sum over the average valid count per rank: DDP's gradient mean then equals the gradient
    # of the global mean over valid rows. A batch without any positive contributes a zero loss that
    # stays attached to the graph (DDP needs every rank to run backward).
    return per_row.sum() / (valid / world) if valid else per_row.sum() * 0.0


def _check_candidates(
    candidates: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    n_rows: int,
    n_cols: int,
    kind: str,
    in_batch_negatives: bool,
    exclude_self: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the per-row candidates of :func:`info_nce`.

    Returns:
        ``(candidates, valid)``, both ``(N, K)``: long indices with padded entries set to 0 (so a
        gather stays in range) and the bool mask of real candidates.
    """
    if kind != "index":
        raise ValueError(f"candidates: per-row candidates need positive_index or paired rows, got {kind} targets")
    if not in_batch_negatives:
        raise ValueError(
            "in_batch_negatives: False cannot be combined with candidates; a row's candidates are "
            "already exactly its positives and the keys listed for it"
        )
    if exclude_self:
        raise ValueError("exclude_self: cannot be combined with candidates; leave the row's own key out of them")
    check_tensor(candidates, "candidates", ndim=2, floating=False, min_rows=0)
    if candidates.shape[0] != n_rows:
        raise ValueError(f"candidates: expected shape ({n_rows}, K), one row per query, got {tuple(candidates.shape)}")
    if candidate_mask is None:
        valid = torch.ones_like(candidates, dtype=torch.bool)
    else:
        check_tensor(candidate_mask, "candidate_mask", shape=tuple(candidates.shape), min_rows=0)
        if candidate_mask.dtype != torch.bool:
            raise ValueError(
                f"candidate_mask: expected a bool tensor (True = real candidate), got dtype {candidate_mask.dtype}"
            )
        valid = candidate_mask.to(candidates.device)
    check_index_range(candidates[valid], "candidates", n_cols)
    # Padding may hold any value (e.g. -1): index 0 keeps the gather in range, the mask drops it.
    return torch.where(valid, candidates.long(), 0), valid


def _candidate_row_lse(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    positive_index: torch.Tensor,
    positive_logits: torch.Tensor,
    candidates: torch.Tensor,
    valid: torch.Tensor,
    tile_size: int,
    tiled: bool | None,
) -> torch.Tensor:
    """Per-row LSE over the row's distinct positives and its valid candidates that are not positives.

    Args:
        query: ``(N, D)`` normalised queries.
        keys: ``(M, D)`` normalised keys (all ranks' under the gather).
        scale: ``1 / temperature``.
        positive_index: ``(N, P)`` positive columns in ``keys``.
        positive_logits: ``(N, P)`` their logits.
        candidates: ``(N, K)`` long candidate columns (padding set to 0).
        valid: ``(N, K)`` bool mask of real candidates.
        tile_size: chunk bound of the tiled path.
        tiled: force the tiled (``True``) or dense (``False``) path; ``None`` decides by size.

    Returns:
        ``(N,)`` log-sum-exp, finite (every row has a positive).
    """
    # A key repeated in positive_index (or also listed as a candidate) is one candidate column, as
    # in the all-keys path: the normaliser counts it once.
    positive_index, order = positive_index.sort(dim=1)
    repeated = torch.zeros_like(positive_index, dtype=torch.bool)
    repeated[:, 1:] = positive_index[:, 1:] == positive_index[:, :-1]
    positive_logits = positive_logits.gather(1, order).masked_fill(repeated, float("-inf"))
    valid = valid & ~(candidates[:, :, None] == positive_index[:, None, :]).any(dim=2)
    use_tiled = tiled if tiled is not None else candidates.numel() * query.shape[1] > tile_size**2
    if use_tiled:
        candidate_lse = candidate_logsumexp(query, keys, scale, candidates, valid, tile_size)
        return torch.logaddexp(torch.logsumexp(positive_logits, dim=1), candidate_lse)
    logits, _ = candidate_logits(query * scale, keys, candidates, valid)
    return torch.logsumexp(torch.cat([positive_logits, logits], dim=1), dim=1)


def _check_targets(
    n_rows: int,
    n_keys: int,
    positive_index: torch.Tensor | None,
    query_labels: torch.Tensor | None,
    key_labels: torch.Tensor | None,
    teacher_query: torch.Tensor | None,
    teacher_key: torch.Tensor | None,
    exclude_self: bool,
) -> tuple[str, torch.Tensor | None]:
    """Validate the target arguments of :func:`info_nce`.

    Returns:
        The target kind (``"index"``, ``"labels"`` or ``"soft"``) and the effective key labels.
    """
    given = [
        name
        for name, present in (
            ("positive_index", positive_index is not None),
            ("query_labels/key_labels", query_labels is not None or key_labels is not None),
            ("teacher_query/teacher_key", teacher_query is not None or teacher_key is not None),
        )
        if present
    ]
    if len(given) > 1:
        raise ValueError(f"targets: give at most one target kind, got {' and '.join(given)}")
    if query_labels is not None or key_labels is not None:
        if query_labels is None:
            raise ValueError("query_labels: required when key_labels is given")
        check_tensor(query_labels, "query_labels", shape=(n_rows,), floating=False)
        if key_labels is None:
            if n_keys != n_rows:
                raise ValueError(f"key_labels: required when N != M (N={n_rows}, M={n_keys})")
            key_labels = query_labels
        check_tensor(key_labels, "key_labels", shape=(n_keys,), floating=False)
        return "labels", key_labels
    if teacher_query is not None or teacher_key is not None:
        if teacher_query is None or teacher_key is None:
            raise ValueError("teacher_query, teacher_key: soft targets need both")
        check_tensor(teacher_query, "teacher_query", shape=(n_rows, None), floating=True)
        check_finite(teacher_query, "teacher_query")
        check_tensor(teacher_key, "teacher_key", shape=(n_keys, teacher_query.shape[1]), floating=True)
        check_finite(teacher_key, "teacher_key")
        return "soft", None
    if positive_index is None:
        if n_rows != n_keys:
            raise ValueError(
                "key: without positive_index, labels or teacher, queries and keys are paired row by "
                f"row and need equal counts; got {n_rows} query rows and {n_keys} key rows"
            )
        return "index", None
    check_tensor(positive_index, "positive_index", ndim=(1, 2), floating=False, min_rows=0)
    if positive_index.shape[0] != n_rows or positive_index.numel() == 0:
        raise ValueError(
            f"positive_index: expected shape ({n_rows},) or ({n_rows}, P) with P >= 1, "
            f"got {tuple(positive_index.shape)}"
        )
    check_index_range(positive_index, "positive_index", n_keys)
    own_rows = torch.arange(n_rows, device=positive_index.device)
    if exclude_self and bool((positive_index.reshape(n_rows, -1) == own_rows[:, None]).any()):
        raise ValueError(
            "positive_index: a row points at its own column, which exclude_self removes from the candidates"
        )
    return "index", None


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: float = 0.1,
    positive_index: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    candidate_mask: torch.Tensor | None = None,
    query_labels: torch.Tensor | None = None,
    key_labels: torch.Tensor | None = None,
    teacher_query: torch.Tensor | None = None,
    teacher_key: torch.Tensor | None = None,
    teacher_temperature: float = 0.1,
    negatives: torch.Tensor | None = None,
    in_batch_negatives: bool = True,
    exclude_self: bool = False,
    no_positive: NoPositive = "raise",
    reduction: Reduction = "mean",
    gather_distributed: bool = False,
    tile_size: int = DEFAULT_TILE_SIZE,
    tiled: bool | None = None,
) -> torch.Tensor:
    """Contrastive cross-entropy of query rows against key columns (one direction).

    Give at most one target kind: ``positive_index``, labels (``query_labels`` / ``key_labels``),
    or a teacher (``teacher_query`` / ``teacher_key``). Without any, row ``i`` is paired with key
    ``i``. Features need not be normalised; they are L2-normalised here.

    **Per-row candidates.** By default every key column is a candidate of every row. With
    ``candidates`` each row has its own set instead: the logits of row ``i`` are

        ``[s(i, p) for each distinct positive p of row i] + [s(i, candidates[i, k]) for each k
        with candidate_mask[i, k], unless candidates[i, k] is one of row i's positives]``

    (plus the ``negatives`` columns, if given), and ``loss_i = -mean_p s(i, p) + logsumexp(row)``,
    the one-hot or multi-positive target of the all-keys form. A candidate that is one of the row's
    positives is already in the row and is not added again, so ``candidates`` listing every key
    gives exactly the all-keys loss; a key listed twice as a candidate counts twice. A row whose
    candidates are all padding keeps only its positive(s): its loss is 0 for one positive (the
    log-softmax of a single logit), with zero gradient, and it still counts in the mean. This one
    call covers mined negatives per anchor (``candidates`` = the mined key indices), in-image
    negatives (the other regions of the query's image, padded to the largest image) and
    batch-wide matched pairs (``candidates=None``: every key of the batch). Needs index or paired
    targets; not combinable with ``in_batch_negatives=False`` or ``exclude_self``.

    Args:
        query: ``(N, D)`` query features.
        key: ``(M, D)`` key features (may be the same tensor as ``query``).
        temperature: logit temperature, ``> 0``.
        positive_index: ``(N,)`` or ``(N, P)`` long, index of each row's positive key(s) in
            ``key`` (this rank's keys; offset to the gathered keys internally). ``P > 1`` gives the
            uniform multi-positive target.
        candidates: ``(N, K)`` integer, row ``i``'s candidate keys as indices into ``key`` (with
            ``gather_distributed``: into the keys of all ranks, rank ``r``'s key ``j`` at
            ``r * M + j``, so a row may take candidates from any rank). ``K`` may be 0.
        candidate_mask: ``(N, K)`` bool, ``True`` for a real candidate; ``False`` entries are
            padding and may hold any value (e.g. -1). Default: all real. Only with ``candidates``.
        query_labels: ``(N,)`` integer labels; positives are candidates with an equal key label.
        key_labels: ``(M,)`` integer labels; defaults to ``query_labels`` when ``N == M``.
        teacher_query: ``(N, Dt)`` teacher features of the queries (soft targets).
        teacher_key: ``(M, Dt)`` teacher features of the keys.
        teacher_temperature: temperature of the teacher's softmax, ``> 0``.
        negatives: ``(K_q, D)`` extra negative-only columns (e.g. a memory queue); detached here.
        in_batch_negatives: ``False`` restricts the key candidates to each row's positives, so the
            only negatives are ``negatives`` (the MoCo form). Needs index or paired targets.
        exclude_self: remove key ``i`` from row ``i``'s candidates (queries and keys are the same
            set, as in NT-Xent and SupCon). Needs ``N == M``.
        no_positive: labels only - ``"raise"`` (default) on a row with no positive candidate, or
            ``"exclude"`` to leave such rows out of the loss (and of the mean).
        reduction: ``"mean"`` or ``"sum"`` over this rank's rows, or ``"none"`` for ``(N,)`` (an
            excluded row is 0).
        gather_distributed: contrast against the keys of all ranks (gathered with gradient).
        tile_size: tile edge of the linear-memory path.
        tiled: ``True``/``False`` forces the tiled/dense path; ``None`` picks tiled when the logits
            exceed one tile (``N * M_global > tile_size ** 2``; with ``candidates``, when the
            gathered candidate keys do: ``N * K * D > tile_size ** 2``).

    Returns:
        A scalar, or ``(N,)`` for ``reduction="none"``; float32 (float64 for float64 inputs).

    Raises:
        ValueError: a shape, dtype, range or option is invalid, features are empty or not finite,
            or (``no_positive="raise"``) a row has no positive.

    Shape:
        - query: :math:`(N, D)`
        - key: :math:`(M, D)`
        - positive_index: :math:`(N,)` or :math:`(N, P)`
        - candidates / candidate_mask: :math:`(N, K)`
        - query_labels / key_labels: :math:`(N,)` / :math:`(M,)`
        - teacher_query / teacher_key: :math:`(N, D_t)` / :math:`(M, D_t)`
        - negatives: :math:`(K_q, D)`
        - output: scalar, or :math:`(N,)` with ``reduction="none"``

    Example:
        Three mined negatives per anchor, the last one of row 1 padding:

        >>> query, key = torch.randn(2, 8), torch.randn(6, 8)
        >>> candidates = torch.tensor([[2, 3, 4], [0, 5, -1]])
        >>> mask = candidates >= 0
        >>> loss = info_nce(query, key, positive_index=torch.tensor([0, 1]), candidates=candidates,
        ...                 candidate_mask=mask)
    """
    _check_options(temperature, no_positive, reduction, tile_size)
    check_positive(teacher_temperature, "teacher_temperature")
    _check_features(query, "query")
    n_rows, dim = query.shape
    _check_features(key, "key", dim)
    n_keys = key.shape[0]
    if negatives is not None:
        _check_features(negatives, "negatives", dim, min_rows=0)
    if exclude_self and n_rows != n_keys:
        raise ValueError(
            f"exclude_self: query and key must be the same set (N == M), got N={n_rows}, M={n_keys}"
        )
    if exclude_self and n_keys * (adist.world_size() if gather_distributed else 1) < 2:
        raise ValueError("exclude_self: a single key leaves row 0 without any candidate; need M >= 2")
    kind, key_labels = _check_targets(
        n_rows, n_keys, positive_index, query_labels, key_labels, teacher_query, teacher_key, exclude_self
    )
    if not in_batch_negatives and kind != "index":
        raise ValueError(
            "in_batch_negatives: False (positives + negatives only, the MoCo form) needs "
            f"positive_index or paired targets, got {kind} targets"
        )
    if candidates is not None:
        n_cols = n_keys * (adist.world_size() if gather_distributed else 1)
        candidates, candidate_valid = _check_candidates(
            candidates, candidate_mask, n_rows, n_cols, kind, in_batch_negatives, exclude_self
        )
    elif candidate_mask is not None:
        raise ValueError("candidate_mask: given without candidates")

    device = query.device
    with autocast_disabled(device):
        dtype = torch.promote_types(query.dtype, torch.float32)
        q = F.normalize(query.to(dtype), dim=1)
        k = q if key is query else F.normalize(key.to(dtype), dim=1)
        scale = 1.0 / temperature
        # Keys of every rank only matter when other keys are candidates; offsets move this rank's
        # local indices into the gathered column space.
        gather = gather_distributed and in_batch_negatives
        keys = adist.gather_with_grad(k) if gather else k
        offset = adist.rank_offset(n_keys) if gather else 0
        rows = torch.arange(n_rows, device=device)
        self_index = rows + offset if exclude_self else None

        teacher = None
        has_positive = None
        if kind == "index":
            index = positive_index if positive_index is not None else rows
            index = index.reshape(n_rows, -1).to(device)
            positive_logits = torch.einsum("nd,npd->np", q, keys[index + offset]) * scale
            target_logit = positive_logits.mean(dim=1)
        elif kind == "labels":
            all_key_labels = adist.gather_no_grad(key_labels) if gather else key_labels
            target_logit, has_positive = _label_targets(
                q, keys, scale, query_labels.to(device), all_key_labels.to(device), self_index
            )
        else:
            teacher_q = F.normalize(teacher_query.detach().to(dtype), dim=1)
            teacher_k = F.normalize(teacher_key.detach().to(dtype), dim=1)
            teacher = TeacherTargets(
                teacher_q, adist.gather_no_grad(teacher_k) if gather else teacher_k, 1.0 / teacher_temperature
            )

        if candidates is not None:
            lse = _candidate_row_lse(
                q, keys, scale, index + offset, positive_logits, candidates.to(device),
                candidate_valid.to(device), tile_size, tiled,
            )
        elif in_batch_negatives:
            lse, soft_target_logit = _row_stats(q, keys, scale, self_index, teacher, tile_size, tiled)
            if teacher is not None:
                target_logit = soft_target_logit
        else:
            lse = torch.logsumexp(positive_logits, dim=1)
        if negatives is not None and negatives.shape[0] > 0:
            negative_keys = F.normalize(negatives.detach().to(dtype), dim=1)
            lse = torch.logaddexp(lse, _row_stats(q, negative_keys, scale, None, None, tile_size, tiled)[0])
        return _reduce(lse - target_logit, has_positive, reduction, no_positive, gather_distributed)


class InfoNCELoss(nn.Module):
    """InfoNCE / CLIP-style contrastive loss with positive-index or label targets.

    Row ``i`` of ``query`` is contrasted with all key columns, or only with its own ``candidates``;
    its positive(s) are key ``i`` (default), ``positive_index[i]`` or the keys sharing its label.
    See :func:`info_nce` for the formula.

    Args:
        temperature: logit temperature, ``> 0``.
        symmetric: average the query->key and key->query losses (CLIP). Needs paired rows or labels.
        memory_size: rows of a MoCo-style :class:`~accord.losses.memory.MemoryQueue` of negatives
            (0 disables it). The queue holds past normalised keys and is updated in training mode
            only, after the loss is computed; with ``symmetric`` it serves both directions.
        memory_dim: feature dimension of the queue; required with ``memory_size > 0``.
        in_batch_negatives: ``False`` gives the MoCo form (each row's candidates are its
            positives plus the queue); ``True`` also uses the other keys of the batch.
        gather_distributed: contrast against keys from all ranks and enqueue all ranks' keys.
        no_positive: with labels, ``"raise"`` on a row without positive or ``"exclude"`` it.
        tile_size: tile edge of the linear-memory path.
        tiled: force (``True``) or forbid (``False``) the tiled path; ``None`` decides by size.

    Raises:
        ValueError: an option is invalid (at construction) or an input is (in :meth:`forward`).

    Shape:
        - query: :math:`(N, D)`
        - key: :math:`(M, D)`
        - positive_index: :math:`(N,)` or :math:`(N, P)`
        - query_labels / key_labels: :math:`(N,)` / :math:`(M,)`
        - candidates / candidate_mask: :math:`(N, K)`, per-row candidate keys (see :func:`info_nce`)
        - output: scalar

    Example:
        >>> loss_fn = InfoNCELoss(temperature=0.07, symmetric=True)
        >>> image, text = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss = loss_fn(image, text)
    """

    def __init__(
        self,
        temperature: float = 0.1,
        symmetric: bool = False,
        memory_size: int = 0,
        memory_dim: int | None = None,
        in_batch_negatives: bool = True,
        gather_distributed: bool = False,
        no_positive: NoPositive = "raise",
        tile_size: int = DEFAULT_TILE_SIZE,
        tiled: bool | None = None,
    ) -> None:
        super().__init__()
        _check_options(temperature, no_positive, "mean", tile_size)
        self.temperature = temperature
        self.symmetric = symmetric
        self.in_batch_negatives = in_batch_negatives
        self.gather_distributed = gather_distributed
        self.no_positive = no_positive
        self.tile_size = tile_size
        self.tiled = tiled
        self.memory = _make_memory(memory_size, memory_dim, gather_distributed)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        positive_index: torch.Tensor | None = None,
        query_labels: torch.Tensor | None = None,
        key_labels: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
        candidate_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for name, value in (("positive_index", positive_index), ("candidates", candidates)):
            if self.symmetric and value is not None:
                raise ValueError(
                    f"{name}: symmetric=True needs paired rows or labels; the reverse of an "
                    f"arbitrary {name} is ambiguous"
                )
        negatives = _memory_negatives(self.memory, query)
        options = dict(
            temperature=self.temperature,
            negatives=negatives,
            in_batch_negatives=self.in_batch_negatives,
            no_positive=self.no_positive,
            gather_distributed=self.gather_distributed,
            tile_size=self.tile_size,
            tiled=self.tiled,
        )
        loss = info_nce(
            query,
            key,
            positive_index=positive_index,
            candidates=candidates,
            candidate_mask=candidate_mask,
            query_labels=query_labels,
            key_labels=key_labels,
            **options,
        )
        if self.symmetric:
            reverse_query_labels = query_labels if key_labels is None else key_labels
            loss = 0.5 * (
                loss + info_nce(key, query, query_labels=reverse_query_labels, key_labels=query_labels, **options)
            )
        _memory_update(self.memory, key, self.training)
        return loss

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, symmetric={self.symmetric}, "
            f"in_batch_negatives={self.in_batch_negatives}, gather_distributed={self.gather_distributed}, "
            f"tile_size={self.tile_size}, tiled={self.tiled}"
        )


class NTXentLoss(nn.Module):
    """NT-Xent, the normalised temperature-scaled cross entropy of SimCLR (arXiv:2002.05709).

    The ``2n`` views ``z = [out0; out1]`` are contrasted with each other: view ``i``'s positive is
    the other view of the same sample and its candidates are the other ``2n - 1`` views, so with
    all similarities equal the loss is ``log(2n - 1)``. With a memory queue it follows lightly's
    MoCo form instead: ``out0`` against its positive ``out1`` and the queued negatives (loss
    ``log(K + 1)`` for equal similarities), and ``out1`` is enqueued.

    Args:
        temperature: logit temperature, ``> 0``.
        memory_size: rows of the negative queue (0: plain SimCLR).
        memory_dim: feature dimension of the queue; required with ``memory_size > 0``.
        gather_distributed: use the views of all ranks as candidates (and enqueue all ranks' keys).
        tile_size: tile edge of the linear-memory path.
        tiled: force (``True``) or forbid (``False``) the tiled path; ``None`` decides by size.

    Shape:
        - out0: :math:`(n, D)`
        - out1: :math:`(n, D)`
        - output: scalar

    Example:
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> loss = loss_fn(torch.randn(16, 128), torch.randn(16, 128))
    """

    def __init__(
        self,
        temperature: float = 0.5,
        memory_size: int = 0,
        memory_dim: int | None = None,
        gather_distributed: bool = False,
        tile_size: int = DEFAULT_TILE_SIZE,
        tiled: bool | None = None,
    ) -> None:
        super().__init__()
        _check_options(temperature, tile_size=tile_size)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.tile_size = tile_size
        self.tiled = tiled
        self.memory = _make_memory(memory_size, memory_dim, gather_distributed)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        check_tensor(out0, "out0", ndim=2, floating=True)
        check_same_shape(out0, out1, "out0", "out1")
        options = dict(
            temperature=self.temperature,
            gather_distributed=self.gather_distributed,
            tile_size=self.tile_size,
            tiled=self.tiled,
        )
        if self.memory is not None:
            loss = info_nce(
                out0, out1, negatives=_memory_negatives(self.memory, out0), in_batch_negatives=False, **options
            )
            _memory_update(self.memory, out1, self.training)
            return loss
        n = out0.shape[0]
        views = torch.cat([out0, out1])
        partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(out0.device)
        return info_nce(views, views, positive_index=partner, exclude_self=True, **options)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, gather_distributed={self.gather_distributed}, "
            f"tile_size={self.tile_size}, tiled={self.tiled}"
        )


class SupConLoss(nn.Module):
    """Supervised contrastive loss ``L_out`` (Khosla et al. 2020, arXiv:2004.11362, eq. 2).

    Every view is an anchor; its positives are the other views with the same label and its
    candidates all other views. The loss is the mean over anchors (the paper sums) of
    ``-mean_{p in P(i)} log softmax_{a in A(i)}(z_i . z_a / T)_p``.

    Args:
        temperature: logit temperature, ``> 0``.
        gather_distributed: use the views and labels of all ranks as candidates.
        no_positive: ``"raise"`` (default) when an anchor has no other view of its label, or
            ``"exclude"`` to leave such anchors out of the mean.
        tile_size: tile edge of the linear-memory path.
        tiled: force (``True``) or forbid (``False``) the tiled path; ``None`` decides by size.

    Shape:
        - features: :math:`(N, D)` or :math:`(N, V, D)` (``V`` views per sample)
        - labels: :math:`(N,)` integer
        - output: scalar

    Example:
        >>> loss_fn = SupConLoss(temperature=0.1)
        >>> loss = loss_fn(torch.randn(8, 2, 64), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    """

    def __init__(
        self,
        temperature: float = 0.1,
        gather_distributed: bool = False,
        no_positive: NoPositive = "raise",
        tile_size: int = DEFAULT_TILE_SIZE,
        tiled: bool | None = None,
    ) -> None:
        super().__init__()
        _check_options(temperature, no_positive, tile_size=tile_size)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.no_positive = no_positive
        self.tile_size = tile_size
        self.tiled = tiled

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_tensor(features, "features", ndim=(2, 3), floating=True)
        check_tensor(labels, "labels", shape=(features.shape[0],), floating=False)
        if features.ndim == 3:
            n_views = features.shape[1]
            features = features.transpose(0, 1).reshape(-1, features.shape[2])
            labels = labels.repeat(n_views)
        return info_nce(
            features,
            features,
            temperature=self.temperature,
            query_labels=labels,
            key_labels=labels,
            exclude_self=True,
            no_positive=self.no_positive,
            gather_distributed=self.gather_distributed,
            tile_size=self.tile_size,
            tiled=self.tiled,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, gather_distributed={self.gather_distributed}, "
            f"no_positive={self.no_positive!r}, tile_size={self.tile_size}, tiled={self.tiled}"
        )


class SoftTargetContrastiveLoss(nn.Module):
    """Contrastive loss whose targets are a teacher's similarity distribution.

    Row ``i``'s target over the key columns is ``softmax_j(tq_i . tk_j / teacher_temperature)``
    from L2-normalised teacher features (no gradient to the teacher); the loss is its cross
    entropy with the student's ``softmax_j(q_i . k_j / temperature)`` (similarity distillation,
    e.g. SEED / CompRess). Tiled like the other losses: the teacher's ``N x M`` matrix is never
    built either.

    Args:
        temperature: student temperature, ``> 0``.
        teacher_temperature: teacher temperature, ``> 0`` (lower = sharper targets).
        symmetric: average the query->key and key->query directions.
        exclude_self: drop column ``i`` from row ``i`` (queries and keys are the same set).
        gather_distributed: use the keys (and teacher keys) of all ranks as candidates.
        tile_size: tile edge of the linear-memory path.
        tiled: force (``True``) or forbid (``False``) the tiled path; ``None`` decides by size.

    Shape:
        - query: :math:`(N, D)`; key: :math:`(M, D)`
        - teacher_query: :math:`(N, D_t)`; teacher_key: :math:`(M, D_t)`
        - output: scalar

    Example:
        >>> loss_fn = SoftTargetContrastiveLoss(temperature=0.2, teacher_temperature=0.05)
        >>> loss = loss_fn(torch.randn(8, 32), torch.randn(8, 32), torch.randn(8, 64), torch.randn(8, 64))
    """

    def __init__(
        self,
        temperature: float = 0.1,
        teacher_temperature: float = 0.1,
        symmetric: bool = False,
        exclude_self: bool = False,
        gather_distributed: bool = False,
        tile_size: int = DEFAULT_TILE_SIZE,
        tiled: bool | None = None,
    ) -> None:
        super().__init__()
        _check_options(temperature, tile_size=tile_size)
        check_positive(teacher_temperature, "teacher_temperature")
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature
        self.symmetric = symmetric
        self.exclude_self = exclude_self
        self.gather_distributed = gather_distributed
        self.tile_size = tile_size
        self.tiled = tiled

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, teacher_query: torch.Tensor, teacher_key: torch.Tensor
    ) -> torch.Tensor:
        options = dict(
            temperature=self.temperature,
            teacher_temperature=self.teacher_temperature,
            exclude_self=self.exclude_self,
            gather_distributed=self.gather_distributed,
            tile_size=self.tile_size,
            tiled=self.tiled,
        )
        loss = info_nce(query, key, teacher_query=teacher_query, teacher_key=teacher_key, **options)
        if self.symmetric:
            reverse = info_nce(key, query, teacher_query=teacher_key, teacher_key=teacher_query, **options)
            loss = 0.5 * (loss + reverse)
        return loss

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, teacher_temperature={self.teacher_temperature}, "
            f"symmetric={self.symmetric}, exclude_self={self.exclude_self}, "
            f"gather_distributed={self.gather_distributed}, tile_size={self.tile_size}, tiled={self.tiled}"
        )


def _make_memory(memory_size: int, memory_dim: int | None, gather_distributed: bool) -> MemoryQueue | None:
    if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 0:
        raise ValueError(f"memory_size: expected an int >= 0, got {memory_size!r}")
    if memory_size == 0:
        return None
    if memory_dim is None:
        raise ValueError("memory_dim: required with memory_size > 0 (the queue is allocated up front)")
    return MemoryQueue(memory_size, memory_dim, gather_distributed=gather_distributed)


def _memory_negatives(memory: MemoryQueue | None, query: torch.Tensor) -> torch.Tensor | None:
    if memory is None:
        return None
    if isinstance(query, torch.Tensor) and query.ndim == 2 and query.shape[1] != memory.dim:
        raise ValueError(
            f"query: expected feature dim {memory.dim} (the memory queue's memory_dim), "
            f"got shape {tuple(query.shape)}"
        )
    return memory.negatives()


def _memory_update(memory: MemoryQueue | None, key: torch.Tensor, training: bool) -> None:
    if memory is not None and training:
        memory.enqueue(F.normalize(key.detach(), dim=1))
