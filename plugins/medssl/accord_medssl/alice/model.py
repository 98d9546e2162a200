"""The Alice student-teacher model (ICCV 2023; medssl §1.5-1.9) on a MONAI SwinUNETR.

Per step, with query and anchor crops ``x_q``, ``x_a`` (two different volumes, matched on anatomy by
:class:`~accord_medssl.anatomy.AnatomicalViewMiner`):

1. the student sees both views with random block masks (:func:`random_block_mask`, voxels zeroed),
   the EMA teacher sees them unmasked;
2. ``dino``: the DINO loss between the teacher's pooled-token distribution of one view and the
   student's of the *other* view (core :class:`~accord.losses.DINOLoss`, cross-view pairs only);
3. ``token``: per view, CASA aligns the student's encoder tokens with the student's decoder tokens
   (prediction ``z_s``) and with the teacher's decoder tokens (target ``z_t``); the iBOT
   cross-entropy between them, same view, over all tokens (core
   :class:`~accord.losses.IBOTPatchLoss`);
4. ``reconstruction``: the student decoder's MSE to the unmasked views, on the masked voxels.

``loss = dino_weight * dino + token_weight * token + reconstruction_weight * reconstruction``
with the reference's weights 1, 1 and 10 / 2 = 5. The reported ``dino``, ``token`` and
``reconstruction`` terms are unweighted. See docs_alice.md for every difference from the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from accord.utils.checks import check_tensor
from accord.config import StrictModel
from accord.heads import DINOHead, EMATeacher
from accord.losses import DINOLoss, IBOTPatchLoss
from accord_medssl.alice.casa import CASA
from accord_medssl.alice.masking import random_block_mask, token_mask
from accord_medssl.models.swin_unetr import SwinUNETRBackbone, SwinUNETRBackboneOptions

__all__ = ["AliceModel", "AliceNetwork", "AliceNetworkOutput", "AliceOptions"]


class AliceOptions(StrictModel):
    """Alice's hyper-parameters; the defaults are the reference's (medssl §1.5-1.9)."""

    backbone: SwinUNETRBackboneOptions = Field(default_factory=SwinUNETRBackboneOptions)
    out_dim: int = Field(512, ge=1, description="prototypes K of the heads; also CASA's width")
    head_hidden_dim: int = Field(2048, ge=1, description="hidden width of the 3-layer head MLP")
    head_bottleneck_dim: int = Field(256, ge=1, description="L2-normalised embedding size before the prototypes")
    casa_num_heads: int = Field(8, ge=1, description="CASA attention heads; must divide out_dim")
    casa_hidden_dim: int = Field(2048, ge=1, description="CASA feed-forward width")
    casa_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="CASA attention and residual dropout")
    student_temperature: float = Field(0.1, gt=0.0, description="tau_s of the DINO loss")
    teacher_temperature: float = Field(0.01, gt=0.0, description="tau_t of the DINO loss after warm-up")
    warmup_teacher_temperature: float | None = Field(
        0.008, gt=0.0, description="tau_t at step 0 of the warm-up; None for a constant tau_t"
    )
    token_student_temperature: float = Field(0.1, gt=0.0, description="tau_s of the token loss")
    token_teacher_temperature: float = Field(0.01, gt=0.0, description="tau_t2 of the token loss after warm-up")
    token_warmup_teacher_temperature: float | None = Field(
        0.008, gt=0.0, description="tau_t2 at step 0 of the warm-up; None for a constant tau_t2"
    )
    teacher_temperature_warmup_steps: int = Field(
        940,
        ge=0,
        description="optimizer steps of both teacher-temperature warm-ups. The reference warms up over "
        "30 epochs: set 30 x steps per epoch (940 ~ 30 epochs of 2,000 CTs at global batch 64)",
    )
    center_momentum: float = Field(0.9, ge=0.0, le=1.0, description="EMA momentum of both centres")
    dino_weight: float = Field(1.0, ge=0.0, description="lambda_1")
    token_weight: float = Field(1.0, ge=0.0, description="lambda_2")
    reconstruction_weight: float = Field(
        5.0, ge=0.0, description="effective weight of the MSE: the reference's lambda_3 = 10 times its extra 1/2"
    )
    reconstruction_voxels: Literal["masked", "all"] = Field(
        "masked",
        description="'masked': MSE on masked voxels (the intent; the reference computes this but uses "
        "'all', bug 4)",
    )
    token_loss_tokens: Literal["all", "masked"] = Field(
        "all", description="'all' (the reference) or only tokens whose region was masked for the student"
    )
    token_mask_min_fraction: float = Field(
        0.5, gt=0.0, le=1.0, description="with token_loss_tokens='masked': masked-voxel share that masks a token"
    )
    mask_block_size: int = Field(16, ge=1, description="in-plane block edge of the student mask, voxels")
    mask_ratio: float = Field(0.75, gt=0.0, lt=1.0, description="fraction of in-plane blocks masked")
    mask_depth_axis: int = Field(-1, ge=-3, le=2, description="spatial axis the mask tubes run along")
    gather_distributed: bool = Field(
        True, description="average the centres over all ranks (a no-op without a process group)"
    )

    @model_validator(mode="after")
    def _check_widths(self) -> AliceOptions:
        if self.out_dim % self.casa_num_heads:
            raise ValueError(f"casa_num_heads ({self.casa_num_heads}) must divide out_dim ({self.out_dim})")
        return self


@dataclass(frozen=True)
class AliceNetworkOutput:
    """Head outputs of :class:`AliceNetwork` (logits over ``K`` prototypes).

    Attributes:
        pooled_logits: ``(B, K)``.
        encoder_token_logits: ``(B, T_enc, K)``.
        decoder_token_logits: ``(B, T_dec, K)``.
        encoder_grid: the encoder tokens' grid (for token masks).
        reconstruction: ``(B, C, D, H, W)`` or ``None``.
    """

    pooled_logits: torch.Tensor
    encoder_token_logits: torch.Tensor
    decoder_token_logits: torch.Tensor
    encoder_grid: tuple[int, int, int]
    reconstruction: torch.Tensor | None


class AliceNetwork(nn.Module):
    """Backbone plus Alice's heads (the reference's ``AliceHead``, §1.5), student or teacher.

    Encoder tokens pass a ``Linear(C_enc, C_enc)`` and decoder tokens a ``Linear(C_dec, C_enc)``
    (the reference's ``mlp3`` / ``mlp4``); then the pooled token and both token sets go through one
    shared 3-layer MLP, L2 normalisation and a weight-normalised prototype layer: ``pooled_head``
    for the pooled token, ``token_head`` (own prototypes, same MLP) for the tokens. Both heads are
    core :class:`~accord.heads.DINOHead` objects whose ``mlp`` is the same module.

    Args:
        options: the model options.

    Shape:
        - Input: ``(B, C, D, H, W)``, spatial sizes multiples of 32.
        - Output: :class:`AliceNetworkOutput`.
    """

    def __init__(self, options: AliceOptions) -> None:
        super().__init__()
        self.backbone = SwinUNETRBackbone(options.backbone)
        width = self.backbone.encoder_channels
        self.encoder_token_projection = nn.Linear(width, width)
        self.decoder_token_projection = nn.Linear(self.backbone.decoder_channels, width)
        head_sizes = dict(
            out_dim=options.out_dim, hidden_dim=options.head_hidden_dim, bottleneck_dim=options.head_bottleneck_dim
        )
        self.pooled_head = DINOHead(width, **head_sizes)
        self.token_head = DINOHead(width, **head_sizes)
        # One MLP for the pooled token and the tokens, as the reference; the token head keeps its
        # own prototype layer. (DINOHead has no shared-MLP option, so its own MLP is replaced.)
        self.token_head.mlp = self.pooled_head.mlp

    def forward(self, images: torch.Tensor, reconstruct: bool = True) -> AliceNetworkOutput:
        """Head outputs for ``images``; ``reconstruct=False`` skips the full-resolution decoder."""
        features = self.backbone(images, reconstruct=reconstruct)
        return AliceNetworkOutput(
            pooled_logits=self.pooled_head(features.pooled),
            encoder_token_logits=self.token_head(self.encoder_token_projection(features.encoder_tokens)),
            decoder_token_logits=self.token_head(self.decoder_token_projection(features.decoder_tokens)),
            encoder_grid=features.encoder_grid,
            reconstruction=features.reconstruction,
        )


def _teacher_warmup(start: float | None, steps: int) -> dict[str, float | int | None]:
    # The core losses take the warm-up start and length together, or neither.
    return {"warmup_teacher_temperature": start, "teacher_temperature_warmup_steps": steps if start is not None else 0}


class AliceModel(nn.Module):
    """Alice pretraining: masked student, EMA teacher, CASA and the three losses (trainer contract).

    ``forward(batch)`` returns the loss terms; the trainer calls :meth:`momentum_update` after each
    optimizer step (set ``trainer.ema_momentum: 0.996`` and ``ema_momentum_end: 1.0`` for Alice's
    cosine schedule). That call also advances the step counter of the teacher-temperature warm-ups.

    Args:
        options: hyper-parameters (defaults: the reference's).

    Example:
        >>> options = AliceOptions(backbone={"feature_size": 12, "norm_name": "batch"}, out_dim=64,
        ...                        head_hidden_dim=64, head_bottleneck_dim=32, casa_hidden_dim=64)
        >>> model = AliceModel(options)
        >>> views = {"query": torch.rand(2, 1, 32, 32, 32), "anchor": torch.rand(2, 1, 32, 32, 32)}
        >>> sorted(model(views))
        ['dino', 'loss', 'reconstruction', 'token']
    """

    def __init__(self, options: AliceOptions | None = None) -> None:
        super().__init__()
        self.options = options if options is not None else AliceOptions()
        opts = self.options
        self.student = AliceNetwork(opts)
        # An EMA copy of the student network only: CASA has no EMA copy, as in the reference.
        self.teacher = EMATeacher(self.student)
        self.casa = CASA(opts.out_dim, opts.casa_num_heads, opts.casa_hidden_dim, opts.casa_dropout)
        steps = opts.teacher_temperature_warmup_steps
        self.dino_loss = DINOLoss(
            opts.out_dim,
            student_temperature=opts.student_temperature,
            teacher_temperature=opts.teacher_temperature,
            center_momentum=opts.center_momentum,
            gather_distributed=opts.gather_distributed,
            **_teacher_warmup(opts.warmup_teacher_temperature, steps),
        )
        self.token_loss = IBOTPatchLoss(
            opts.out_dim,
            student_temperature=opts.token_student_temperature,
            teacher_temperature=opts.token_teacher_temperature,
            center_momentum=opts.center_momentum,
            gather_distributed=opts.gather_distributed,
            **_teacher_warmup(opts.token_warmup_teacher_temperature, steps),
        )
        # Optimizer steps taken (advanced by momentum_update); persistent so a resumed run continues
        # the temperature warm-up where it stopped.
        self.optimizer_steps: torch.Tensor
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.long))

    @property
    def backbone(self) -> SwinUNETRBackbone:
        """The student's backbone (the weights to fine-tune; see :func:`monai_state_dict`)."""
        return self.student.backbone

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss terms for one batch of view pairs.

        Args:
            batch: ``"query"`` and ``"anchor"``, each ``(B, C, D, H, W)`` with equal shapes, spatial
                sizes multiples of 32 and in-plane sizes multiples of ``mask_block_size``. Other
                keys (e.g. the miner's crop boxes) are ignored.

        Returns:
            Scalar tensors ``"loss"`` (weighted total), ``"dino"``, ``"token"`` and
            ``"reconstruction"`` (unweighted).

        Raises:
            ValueError: a missing key, or views of a bad or different shape.
        """
        if not isinstance(batch, Mapping) or not {"query", "anchor"} <= batch.keys():
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(f"batch: expected a mapping with 'query' and 'anchor' views, got {got}")
        query = check_tensor(batch["query"], "batch['query']", ndim=5, floating=True)
        anchor = check_tensor(batch["anchor"], "batch['anchor']", shape=tuple(query.shape), floating=True)
        opts = self.options
        batch_size = query.shape[0]
        views = torch.cat([query, anchor])
        voxel_mask = random_block_mask(
            views.shape[0],
            tuple(views.shape[2:]),
            block_size=opts.mask_block_size,
            mask_ratio=opts.mask_ratio,
            depth_axis=opts.mask_depth_axis,
            device=views.device,
        )
        # Masked voxels are zeroed (SimMIM-style, as the reference; see masking.py).
        student = self.student(views.masked_fill(voxel_mask, 0.0))
        teacher = self.teacher(views, reconstruct=False)
        step = int(self.optimizer_steps)

        def by_view(logits: torch.Tensor) -> torch.Tensor:
            return logits.reshape(2, batch_size, -1)

        dino = self.dino_loss(by_view(teacher.pooled_logits), by_view(student.pooled_logits), step=step)
        student_aligned, teacher_aligned = self.casa(
            student.encoder_token_logits, student.decoder_token_logits, teacher.decoder_token_logits
        )
        tokens_masked = None
        if opts.token_loss_tokens == "masked":
            tokens_masked = token_mask(voxel_mask, student.encoder_grid, opts.token_mask_min_fraction)
        token = self.token_loss(teacher_aligned, student_aligned, mask=tokens_masked, step=step)
        squared_error = (student.reconstruction.float() - views.float()).square()
        if opts.reconstruction_voxels == "masked":
            reconstruction = squared_error.masked_select(voxel_mask).mean()
        else:
            reconstruction = squared_error.mean()
        loss = opts.dino_weight * dino + opts.token_weight * token + opts.reconstruction_weight * reconstruction
        return {"loss": loss, "dino": dino, "token": token, "reconstruction": reconstruction}

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """EMA step of the teacher towards the student; advances the warm-up step counter.

        Args:
            momentum: ``m`` in ``[0, 1]``: ``theta_t <- m theta_t + (1 - m) theta_s``.
        """
        self.teacher.update(self.student, momentum)
        self.optimizer_steps += 1
