"""GEMINI on the core trainer: the two optimiser steps per iteration as alternating trainer steps.

The reference takes, per iteration, one ``backward()`` + ``Adam.step()`` on the correspondence loss
``L1`` and then a second on the task loss ``L2`` (restoration for GEMINI-MIP, CE + Dice for
GEMINI-Semi) on the same Adam, whose moments therefore mix both gradients (medssl §2.6). The core
:class:`~accord.training.Trainer` takes one optimiser step per ``forward``, so with
``optimizer_steps: two`` :class:`GeminiModel` alternates: odd trainer steps return ``L1``, even
ones ``L2`` computed on the *same* sample (kept from the odd step). That is exactly the reference's
update sequence on one Adam, with ``trainer.max_steps = 2 x iterations``; a constant learning rate
(the reference's) makes the schedule irrelevant. ``optimizer_steps: combined`` takes one step on
``L1 + L2`` instead (GVSL's single-step form).

Every step logs the same terms: the ones of the phase not run in that step are the previous values
(kept in a buffer, so they survive a resume). Besides the loss terms: ``folding_percent`` (voxels
with Jacobian determinant <= 0, both flows), ``min_jacobian`` and ``inverse_consistency`` (voxels).
A NaN or Inf in any term stops the run (the core trainer's check; the reference's ``== nan`` guard
never fired).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from accord.config import StrictModel
from accord_medssl.gemini.corruption import CorruptionOptions
from accord_medssl.gemini.losses import (
    GSS_WEIGHT,
    NCC_WEIGHT,
    SMOOTH_WEIGHT,
    TASK_WEIGHT,
    correspondence_loss,
    restoration_loss,
    segmentation_loss,
)
from accord_medssl.gemini.networks import GeminiNetwork, GeminiNetworkOptions
from accord_medssl.gemini.warp import folding_stats, inverse_consistency_error

__all__ = ["GeminiLossOptions", "GeminiModel", "GeminiOptions", "LOGGED_TERMS"]

#: The terms every step reports (see the module docstring).
LOGGED_TERMS = ("correspondence", "smooth", "gss", "ncc", "task", "folding_percent", "min_jacobian",
                "inverse_consistency")


class GeminiLossOptions(StrictModel):
    """GEMINI's losses and their settings (defaults: the reference's)."""

    smooth_weight: float = Field(SMOOTH_WEIGHT, ge=0)
    gss_weight: float = Field(GSS_WEIGHT, ge=0)
    ncc_weight: float = Field(NCC_WEIGHT, ge=0)
    task_weight: float = Field(TASK_WEIGHT, ge=0, description="weight of the step-2 restoration or CE + Dice loss")
    window: int = Field(9, ge=1, description="local NCC window side (odd)")
    smoothness: Literal["l2", "l1"] = "l2"
    mask_mode: Literal["nearest", "bilinear"] = Field(
        "nearest", description="validity-mask sampling (the reference's 2D chest trainer uses bilinear)"
    )
    warp_convention: Literal["correct", "reference"] = Field(
        "correct", description="correct: zero flow = identity; reference: GEMINI's half-voxel align_corners mismatch"
    )
    optimizer_steps: Literal["two", "combined"] = Field(
        "two", description="two: the reference's two Adam steps per iteration (alternating trainer steps, "
        "max_steps = 2 x iterations); combined: one step on L1 + L2"
    )


class GeminiOptions(StrictModel):
    """Model, losses, intensity normalisation and augmentation of GEMINI."""

    network: GeminiNetworkOptions = GeminiNetworkOptions()
    loss: GeminiLossOptions = GeminiLossOptions()
    normalisation: Literal["minmax", "ct_clip"] = Field(
        "minmax", description="minmax: negatives to 0 then per-volume min-max (GEMINI brain MRI); ct_clip: "
        "(HU + 1024) clipped to [0, 2048] / 2048 (GEMINI/GVSL CT)"
    )
    augment: bool = Field(True, description="shared random affine of every image of a sample (rotation +-20 deg, scale +-25%)")
    corruption: CorruptionOptions | None = Field(
        CorruptionOptions(), description="Models-Genesis corruption of the restoration input (None: GEMINI-Semi, no restoration)"
    )


class GeminiModel(nn.Module):
    """Trainer-contract GEMINI: ``forward(batch) -> {"loss", *LOGGED_TERMS}``.

    Args:
        options: the GEMINI options.
        task: ``"restoration"`` (GEMINI-MIP: batch ``image_a``, ``image_b``, ``corrupted_a``) or
            ``"segmentation"`` (GEMINI-Semi: batch ``image_a``, ``image_b`` unlabelled and
            ``labelled_image`` with its one-hot / binary ``label`` ``(B, K, *spatial)``).
        activation: segmentation output activation, softmax (3D) or sigmoid (2D chest masks).
    """

    def __init__(self, options: GeminiOptions, task: Literal["restoration", "segmentation"] = "restoration",
                 activation: Literal["softmax", "sigmoid"] = "softmax"):
        super().__init__()
        self.options = options
        self.task = task
        self.activation = activation
        self.network = GeminiNetwork(options.network)
        # 0: next step is the correspondence step; 1: the task step. Saved with the weights.
        self.register_buffer("phase", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_terms", torch.zeros(len(LOGGED_TERMS)))
        self._pending: Mapping[str, torch.Tensor] | None = None

    def correspondence_terms(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Step 1 on ``image_a``/``image_b``: ``{"correspondence" (= L1), "smooth", "gss", "ncc"}`` and the flow statistics."""
        loss = self.options.loss
        a, b = batch["image_a"], batch["image_b"]
        features_a, features_b, flow_ab, flow_ba = self.network(a, b)
        terms = correspondence_loss(
            a, b, features_a, features_b, flow_ab, flow_ba,
            weights=(loss.smooth_weight, loss.gss_weight, loss.ncc_weight), window=loss.window,
            smoothness=loss.smoothness, mask_mode=loss.mask_mode, convention=loss.warp_convention,
        )
        with torch.no_grad():
            folds = [folding_stats(flow) for flow in (flow_ab, flow_ba)]
            consistency = inverse_consistency_error(flow_ab.detach(), flow_ba.detach(), loss.warp_convention)
        device = terms["loss"].device
        return {
            "correspondence": terms["loss"], "smooth": terms["smooth"], "gss": terms["gss"], "ncc": terms["ncc"],
            "folding_percent": torch.tensor(sum(f["folding_percent"] for f in folds) / 2, device=device),
            "min_jacobian": torch.tensor(min(f["min_jacobian"] for f in folds), device=device),
            "inverse_consistency": consistency.float(),
        }

    def task_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Step 2: ``100 * MSE(R(U(t(A))), A)`` or ``100 * (CE + Dice)(S(U(X_lab)), Y_lab)``."""
        weight = self.options.loss.task_weight
        if self.task == "restoration":
            return restoration_loss(self.network.task(batch["corrupted_a"]), batch["image_a"], weight)
        logits = self.network.task(batch["labelled_image"])
        return segmentation_loss(logits, batch["label"].to(logits.dtype), self.activation, weight)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One trainer step (see the module docstring for what ``loss`` is in each mode)."""
        previous = dict(zip(LOGGED_TERMS, self.last_terms.unbind()))
        if self.options.loss.optimizer_steps == "combined":
            terms = self.correspondence_terms(batch)
            terms["task"] = self.task_loss(batch)
            loss = terms["correspondence"] + terms["task"]
        elif int(self.phase) == 0:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                raise ValueError("gemini.loss.optimizer_steps 'two' trains in one process (as the reference); "
                                 "use optimizer_steps: combined for distributed runs")
            terms = {**previous, **self.correspondence_terms(batch)}
            loss = terms["correspondence"]
            self._pending = batch
        else:
            # The task step of the same iteration uses the sample of its correspondence step; only
            # after a resume between the two (checkpoints fall on even steps) is it missing.
            sample = self._pending if self._pending is not None else batch
            self._pending = None
            terms = {**previous, "task": self.task_loss(sample)}
            loss = terms["task"]
        if self.training:
            with torch.no_grad():
                self.last_terms.copy_(torch.stack([terms[name].detach().float().reshape(()) for name in LOGGED_TERMS]))
                if self.options.loss.optimizer_steps == "two":
                    self.phase.fill_(1 - int(self.phase))
        return {"loss": loss, **{name: terms[name] for name in LOGGED_TERMS}}

