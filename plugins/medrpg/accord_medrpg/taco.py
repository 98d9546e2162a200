"""TaCo: MedRPG's region-phrase context contrastive loss on the vision-language transformer outputs.

For every sample, one positive region (the GT box) and K negative regions (random boxes of the same
image) are pooled on the visual token grid and contrasted with the phrase feature (InfoNCE, one
positive, temperature ``tau``). In the paper's mode, ``max_image_lcpTriple``, both sides of each
(phrase, region k) pair get the same context vector ``c_k``: the final tokens weighted by the
product of three attention rows of the last VL layer (the phrase's, the region's and [REG]'s),
renormalised. The reference's ``batch`` mode instead contrasts the GT regions and the phrases of
the whole batch with each other (symmetric, GLoRIA style). See docs/medrpg.md and the method spec
(section 3) for the formulas.

Token layout (the reference's): ``[REG] (0) | text (1..L) | visual (L+1 .. L+G*G)``, visual tokens
row-major on a ``G x G`` grid; ``attention[b, query, key]`` is the head-averaged last-layer map.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from accord.boxes import cxcywh_to_xyxy

__all__ = ["TacoMode", "TextPool", "TacoOutput", "region_cells", "taco_loss", "taco_weight"]

#: ``none``: no TaCo (plain TransVG); ``max_image``: region-phrase InfoNCE without context;
#: ``max_image_lcp``: context from ``a_t * a_k``; ``max_image_lcpTriple`` (MedRPG): ``a_t * a_k * a_reg``;
#: ``batch``: GT regions against the phrases of the batch, both directions, no context (the negatives unused).
TacoMode = Literal["none", "max_image", "max_image_lcp", "max_image_lcpTriple", "batch"]
#: Phrase feature (and its attention row): ``cls`` the [CLS] output (MedRPG); ``mask`` the mean over
#: real text tokens; ``all`` the mean over all L text slots; ``reg`` the [REG] output (the ``_reg``
#: variants); ``marker`` the mean over the tokens between the phrase's first two ``*`` markers.
TextPool = Literal["cls", "mask", "all", "reg", "marker"]

#: Added to the tri-attention normaliser, as the reference.
CONTEXT_EPS = 1e-5
#: Lower bound of the product of norms in the cosine, as the reference's (torch 1.7) cosine_similarity.
COSINE_EPS = 1e-8


@dataclass
class TacoOutput:
    """TaCo's loss and intermediates (``R = 1 + K`` regions, the GT first).

    Attributes:
        loss: scalar, mean over the batch of the cross-entropy with target 0 (the GT region); ``batch``
            mode: the sum of the two directions' mean cross-entropies with target ``i`` for row ``i``.
        logits: ``(B, R)`` cosine similarities / tau; ``batch`` mode: ``(B, B)``, row ``i`` the GT
            region of sample ``i``, column ``j`` the phrase of sample ``j``.
        region_features: ``(B, R, D)`` mean visual tokens inside each region (``h_k``).
        text_features: ``(B, D)`` pooled phrase feature (``h_t``).
        context_weights: ``(B, R, N)`` renormalised attention products over all N tokens (``q_k``),
            ``None`` for ``max_image`` and ``batch``.
        context: ``(B, R, D)`` context vectors ``c_k`` (``None`` for ``max_image`` and ``batch``).
        cells: ``(B, R, 4)`` long cell ranges ``x1, y1, x2, y2`` (end exclusive) of each region.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    region_features: torch.Tensor
    text_features: torch.Tensor
    context_weights: torch.Tensor | None
    context: torch.Tensor | None
    cells: torch.Tensor


def region_cells(boxes: torch.Tensor, grid: int) -> torch.Tensor:
    """Grid cells of normalised ``cxcywh`` boxes, with the reference's rounding and widening.

    ``x1, y1, x2, y2 = floor(xyxy * grid)``; ``x1, y1 >= 0``; a box whose ``x1 == x2`` (narrower than
    a cell boundary crossing) becomes ``[max(0, x1 - 1), min(grid, x2 + 1))``, likewise in y. The
    reference hard-codes ``grid = 20`` in the widening; here it follows the grid. Ends are clamped
    to ``grid`` (Python slicing did that upstream); a box entirely beyond the canvas falls back to
    the edge cell instead of an empty region (a NaN upstream).

    Args:
        boxes: ``(..., 4)`` normalised ``cx, cy, w, h``.
        grid: cells per side.

    Returns:
        ``(..., 4)`` long ``x1, y1, x2, y2``, end exclusive, ``0 <= x1 < x2 <= grid``.
    """
    cells = torch.floor(cxcywh_to_xyxy(boxes.detach()) * grid).long().clamp(0, grid)
    starts, ends = cells[..., :2], cells[..., 2:]
    degenerate = starts >= ends
    starts = torch.where(degenerate, (starts - 1).clamp(min=0), starts)
    ends = torch.where(degenerate, (ends + 1).clamp(max=grid), ends)
    # A start at the far edge (box beyond the canvas) has no cell to its right: keep the last one.
    starts = torch.minimum(starts, ends - 1)
    return torch.cat((starts, ends), dim=-1)


def _pool_text(tokens: torch.Tensor, attention: torch.Tensor, text_mask: torch.Tensor | None,
               marker_span: torch.Tensor | None, num_text: int,
               text_pool: TextPool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h_t (B, D), a_t (B, N))``: the phrase feature and its attention row, pooled alike."""
    if text_pool == "reg":
        return tokens[:, 0], attention[:, 0]
    if text_pool == "cls":
        return tokens[:, 1], attention[:, 1]
    text = slice(1, 1 + num_text)
    if text_pool == "all":
        return tokens[:, text].mean(1), attention[:, text].mean(1)
    if text_pool == "marker":
        if marker_span is None or marker_span.shape != (tokens.shape[0], num_text):
            raise ValueError(f"text_pool='marker' needs marker_span ({tokens.shape[0]}, {num_text}) bool, True on "
                             f"the tokens between the markers, got "
                             f"{None if marker_span is None else tuple(marker_span.shape)}")
        if not marker_span.any(1).all():
            raise ValueError(f"marker_span: rows {torch.nonzero(~marker_span.any(1)).flatten().tolist()} mark no token")
        # The attention rows of the same tokens as the features: the reference took the rows one slot
        # earlier (sequence positions id1+1..id2-1 for text tokens id1+1..id2-1 at positions id1+2..id2).
        weights = marker_span.to(tokens.dtype)
    else:
        if text_mask is None:
            raise ValueError("text_pool='mask' needs text_mask (B, L) bool, True on padding")
        weights = (~text_mask).to(tokens.dtype)
    weights = weights / weights.sum(1, keepdim=True).clamp(min=1)
    return (torch.einsum("bl,bld->bd", weights, tokens[:, text]),
            torch.einsum("bl,bln->bn", weights, attention[:, text]))


def taco_loss(
    tokens: torch.Tensor,
    attention: torch.Tensor,
    boxes: torch.Tensor,
    *,
    num_text: int,
    temperature: float = 0.1,
    mode: TacoMode = "max_image_lcpTriple",
    text_pool: TextPool = "cls",
    text_mask: torch.Tensor | None = None,
    marker_span: torch.Tensor | None = None,
) -> TacoOutput:
    """TaCo region-phrase contrast, vectorised over the batch and the regions.

    ``batch`` mode (the reference's ``trans_vg_caloss_crossbatch``, which fails there on an undefined
    temperature name): ``S[i, j] = cos(h_i, t_j) / tau`` between the GT region ``h_i`` of sample ``i``
    and the phrase feature ``t_j`` of sample ``j``; ``loss = CE(S, diag) + CE(S^T, diag)``. The other
    samples of this process's batch are the negatives (no gather across ranks, as the reference), a
    batch of one gives 0, and two samples with the same phrase and finding count as negatives of
    each other (GLoRIA's convention).

    Args:
        tokens: ``(B, N, D)`` final VL tokens, ``N = 1 + num_text + G*G``.
        attention: ``(B, N, N)`` last-layer head-averaged attention (row = query).
        boxes: ``(B, R, 4)`` normalised ``cxcywh``: the GT box first, then ``R - 1`` negatives.
        num_text: text slots ``L``.
        temperature: ``tau`` (MedRPG: 0.1).
        mode: see :data:`TacoMode` (``"none"`` is not a loss: do not call).
        text_pool: see :data:`TextPool`.
        text_mask: ``(B, L)`` bool, True on padding (``text_pool="mask"`` only).
        marker_span: ``(B, L)`` bool, True on the tokens between the first two markers
            (``text_pool="marker"`` only; :meth:`accord_medrpg.models.PhraseTokenizer.marker_span`).

    Returns:
        :class:`TacoOutput`. Nothing is detached: gradients reach tokens and attention, as upstream.
    """
    if mode == "none":
        raise ValueError("taco_loss: mode 'none' means TaCo is off; do not call it")
    batch, num_tokens, dim = tokens.shape
    grid = round((num_tokens - 1 - num_text) ** 0.5)
    if grid * grid != num_tokens - 1 - num_text:
        raise ValueError(f"tokens has {num_tokens} slots; expected 1 + {num_text} + a square number of visual tokens")
    if attention.shape != (batch, num_tokens, num_tokens):
        raise ValueError(f"attention must be {(batch, num_tokens, num_tokens)}, got {tuple(attention.shape)}")
    if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B={batch}, R, 4) normalised cxcywh, got {tuple(boxes.shape)}")
    visual = slice(1 + num_text, None)

    cells = region_cells(boxes, grid)
    axis = torch.arange(grid, device=tokens.device)
    inside_x = (axis >= cells[..., 0:1]) & (axis < cells[..., 2:3])  # (B, R, G)
    inside_y = (axis >= cells[..., 1:2]) & (axis < cells[..., 3:4])
    region = (inside_y[..., :, None] & inside_x[..., None, :]).flatten(2).to(tokens.dtype)  # (B, R, G*G)
    region = region / region.sum(-1, keepdim=True)
    region_features = torch.einsum("brv,bvd->brd", region, tokens[:, visual])  # h_k
    text_features, text_attention = _pool_text(tokens, attention, text_mask, marker_span, num_text, text_pool)
    if mode == "batch":
        logits = _cosine(region_features[:, 0, None], text_features[None]) / temperature  # (B regions, B phrases)
        # The symmetric InfoNCE of accord.losses.info_nce, written on the logits that are returned anyway.
        target = torch.arange(batch, device=logits.device)
        loss = F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)
        return TacoOutput(loss, logits, region_features, text_features, None, None, cells)

    context_weights = context = None
    text_side = text_features[:, None].expand(-1, region.shape[1], -1)
    region_side = region_features
    if mode != "max_image":
        region_attention = torch.einsum("brv,bvn->brn", region, attention[:, visual])  # a_k
        product = text_attention[:, None] * region_attention
        if mode == "max_image_lcpTriple":
            product = product * attention[:, None, 0]
        context_weights = product / (product.sum(-1, keepdim=True) + CONTEXT_EPS)
        context = torch.einsum("brn,bnd->brd", context_weights, tokens)  # c_k
        text_side = text_side + context
        region_side = region_side + context

    logits = _cosine(text_side, region_side) / temperature
    # accord.losses.info_nce contrasts one query row against keys; here the query side (t_k) differs
    # per candidate k, so the logits are formed directly and fed to the cross-entropy.
    loss = F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long, device=logits.device))
    return TacoOutput(loss, logits, region_features, text_features, context_weights, context, cells)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b> / max(|a| |b|, 1e-8)`` over the last dim, broadcast (the reference's formula)."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=COSINE_EPS)


def taco_weight(epoch: int, epochs: int, base: float = 0.05, power: float = 0.9) -> float:
    """TaCo's loss weight in epoch ``epoch`` (0-based) of ``epochs``: ``base * (epoch / epochs) ** power``.

    Zero in the first epoch, as the reference's ``CAlossFunc`` poly ramp.
    """
    if epochs < 1 or not 0 <= epoch:
        raise ValueError(f"taco_weight: need epochs >= 1 and epoch >= 0, got epoch={epoch}, epochs={epochs}")
    return base * (min(epoch, epochs) / epochs) ** power
