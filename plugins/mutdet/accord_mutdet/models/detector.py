"""ARS-DETR-style rotated deformable DETR, with MutDet's enhanced branch for pretraining.

Layout (spec §4-§7):

* backbone: MONAI ResNet, C3-C5 (:mod:`accord_mutdet.models.backbone`);
* neck: mmdet ``ChannelMapper`` (1x1 conv + GN to ``embed_dim``, plus a stride-64 level: 4 levels);
* positions: mmdet ``SinePositionalEncoding`` plus a learned level embedding;
* encoder: mmdet ``DeformableDetrTransformerEncoder`` (mmcv ``MultiScaleDeformableAttention``);
* two-stage proposals: grid anchors with sides ``0.05 * 2**level`` valid inside ``(0.01, 0.99)``,
  encoder heads (objectness, box delta, AR-CSL angle) on the projected memory, top-k as references;
* decoder: learned content queries (+ DINO-style denoising queries), self-attention, rotated
  deformable cross-attention (:mod:`accord_mutdet.models.attention`) and an FFN per layer, with
  iterative box refinement and the angle re-decoded from each layer's AR-CSL logits;
* heads: per decoder layer a class Linear, a 3-layer box MLP and a 180-bin angle Linear; the
  encoder's heads are separate modules (``enc_*``), so checkpoints of different decoder depths map
  by name (the reference appends them to the decoder's head lists, which shifts them, spec §8).

MutDet (``mutdet`` options given with ``enhancement=True``) adds, under the ``mutdet.`` prefix: the
second memory projection, the two-way enhancement module, the encoder and decoder embedding MLPs
and (when the object width differs from ``embed_dim``) an object projection. Both branches share
the decoder and every head; the enhanced one's loss keys are prefixed ``p_``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from mmdet.models.layers import DeformableDetrTransformerEncoder, SinePositionalEncoding
from mmdet.models.necks import ChannelMapper
from torch import nn

from accord.boxes import normalise_le90

from accord_mutdet.angle import NUM_BINS, ARCSLCoder
from accord_mutdet.losses import (
    LOSS_WEIGHTS,
    alignment_loss,
    angle_bce_loss,
    box_l1_loss,
    focal_loss,
    hbb_giou_loss,
    match_queries,
    rank_normaliser,
)
from accord_mutdet.models.attention import RotatedMultiScaleDeformableAttention
from accord_mutdet.models.backbone import ResNetBackbone
from accord_mutdet.models.denoising import DenoisingQueries, make_denoising_queries
from accord_mutdet.models.enhancement import MutualEnhancement
from accord_mutdet.models.options import DetectorOptions, MutDetOptions

__all__ = ["RotatedDETR", "MUTDET_PREFIX", "CLASS_HEAD_PREFIXES", "proposal_scores"]

NUM_LEVELS = 4
#: modules only MutDet pretraining has; fine-tuning drops them
MUTDET_PREFIX = "mutdet."
#: modules whose shape depends on the number of classes; fine-tuning re-initialises them
CLASS_HEAD_PREFIXES = ("cls_heads.", "label_embed.")


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear-ReLU-...-Linear through ``dims``."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_sine_embedding(boxes: torch.Tensor, dim: int) -> torch.Tensor:
    """DINO's sine embedding of normalised ``(cx, cy, w, h)``: ``(..., 4)`` -> ``(..., 4 * dim // 2)``."""
    half = dim // 2
    freq = 10000 ** (2 * (torch.arange(half, device=boxes.device) // 2) / half)
    pos = boxes[..., None] * (2 * math.pi) / freq  # (..., 4, half)
    emb = torch.stack([pos[..., 0::2].sin(), pos[..., 1::2].cos()], dim=-1).flatten(-2)
    return emb.flatten(-2)


def proposal_scores(token_embed: torch.Tensor, objects: torch.Tensor, object_padding: torch.Tensor,
                    objectness: torch.Tensor, mode: str = "logit") -> torch.Tensor:
    """MutDet's enhanced-branch proposal score: ``max_j cos(Z_enc, O_enh_j) x objectness``.

    Args:
        token_embed: ``(B, S, D)`` encoder-predicted embeddings.
        objects: ``(B, N, D)`` enhanced object embeddings.
        object_padding: ``(B, N)`` True = padding slot.
        objectness: ``(B, S)`` objectness logits.
        mode: ``"logit"`` multiplies the raw logit (the reference: a negative logit inverts the
            ranking, spec §11.10) or ``"sigmoid"`` its probability.

    Returns:
        ``(B, S)`` scores; an image without objects is ranked by objectness alone.
    """
    if mode not in ("logit", "sigmoid"):
        raise ValueError(f"proposal_score: expected 'logit' or 'sigmoid', got {mode!r}")
    cosine = F.normalize(token_embed, dim=-1) @ F.normalize(objects, dim=-1).transpose(1, 2)
    cosine = cosine.masked_fill(object_padding[:, None, :], float("-inf")).amax(-1)
    cosine = torch.where(object_padding.all(1)[:, None], torch.ones_like(cosine), cosine)
    return cosine * (objectness.sigmoid() if mode == "sigmoid" else objectness)


def _global_most(targets: list[dict[str, torch.Tensor]], device: torch.device) -> int:
    """Most targets of one image in the global batch: every DDP rank builds the same DN groups
    (as one process on the global batch does) and takes the same collective-bearing branches."""
    most = max((t["labels"].numel() for t in targets), default=0)
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return most
    value = torch.tensor([most], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return int(value)


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, rotated deformable cross-attention, FFN."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, points: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = RotatedMultiScaleDeformableAttention(dim, heads, NUM_LEVELS, points, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, pos: torch.Tensor, value: torch.Tensor, reference: torch.Tensor,
                spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        q = query + pos
        attended = self.self_attn(q, q, query, attn_mask=attn_mask, need_weights=False)[0]
        query = self.norms[0](query + self.dropout(attended))
        query = self.norms[1](self.cross_attn(query, value, reference, spatial_shapes, level_start_index, pos))
        return self.norms[2](query + self.dropout(self.ffn(query)))


class RotatedDETR(nn.Module):
    """Rotated two-stage deformable DETR with AR-CSL angles; optionally MutDet's pretraining branch.

    Trainer contract: ``forward(batch)`` returns a dict of weighted scalar loss terms and ``"loss"``,
    their sum. ``batch`` is a mapping (:func:`accord_mutdet.data.collate_detection`) with ``images``
    ``(B, 3, H, W)`` ImageNet-normalised (:func:`accord_mutdet.data.prepare_image`), ``boxes`` (per
    image ``(N, 5)`` le90 pixels), ``labels`` (per image ``(N,)`` long) and, for MutDet,
    ``embeddings`` (per image ``(N, object_dim)``).

    Args:
        options: architecture.
        num_classes: classes of the class head (256 pseudo-classes when pretraining).
        class_names: names of those classes (kept for ``predict`` users; default ``class_<i>``).
        mutdet: MutDet options; ``None`` or ``enhancement=False`` builds the plain detector.
        frozen_backbone: freeze the whole backbone (MutDet/DETReg pretraining).

    The constructor builds the architecture only (``load_run`` rebuilds it this way);
    ``options.backbone_weights`` is loaded by the tasks (:func:`~accord_mutdet.models.backbone.load_backbone_weights`).
    """

    def __init__(self, options: DetectorOptions, num_classes: int, class_names: list[str] | None = None,
                 mutdet: MutDetOptions | None = None, frozen_backbone: bool = False) -> None:
        super().__init__()
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names: expected {num_classes} names, got {len(class_names)}")
        self.options = options
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        self.mutdet_options = mutdet if mutdet is not None and mutdet.enhancement else None
        self.coder = ARCSLCoder()
        d = options.embed_dim
        self.backbone = ResNetBackbone(options.backbone, frozen=frozen_backbone)
        self.neck = ChannelMapper(self.backbone.out_channels, d, kernel_size=1, act_cfg=None,
                                  norm_cfg=dict(type="GN", num_groups=math.gcd(32, d // 4)), num_outs=NUM_LEVELS)
        for module in self.neck.modules():  # mmdet's Xavier init, without mmengine's per-tensor log lines
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)  # no bias: the GN follows
        self.positional = SinePositionalEncoding(num_feats=d // 2, normalize=True, offset=-0.5)
        self.level_embed = nn.Parameter(torch.randn(NUM_LEVELS, d) * 0.02)
        self.encoder = DeformableDetrTransformerEncoder(
            num_layers=options.encoder_layers,
            layer_cfg=dict(
                self_attn_cfg=dict(embed_dims=d, num_heads=options.num_heads, num_levels=NUM_LEVELS,
                                   num_points=options.num_points, dropout=options.dropout, batch_first=True),
                ffn_cfg=dict(embed_dims=d, feedforward_channels=options.ffn_dim, ffn_drop=options.dropout)))
        for layer in self.encoder.layers:
            layer.self_attn.init_weights()
        self.enc_output = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d))
        self.query_embed = nn.Embedding(options.num_queries, d)
        self.label_embed = nn.Embedding(num_classes, d)
        self.ref_point_head = mlp([2 * d, d, d])
        self.decoder = nn.ModuleList(
            DecoderLayer(d, options.num_heads, options.ffn_dim, options.num_points, options.dropout)
            for _ in range(options.decoder_layers))
        layers = options.decoder_layers
        self.cls_heads = nn.ModuleList(nn.Linear(d, num_classes) for _ in range(layers))
        self.reg_heads = nn.ModuleList(mlp([d, d, d, 4]) for _ in range(layers))
        self.angle_heads = nn.ModuleList(nn.Linear(d, NUM_BINS) for _ in range(layers))
        self.enc_cls = nn.Linear(d, 1)
        self.enc_reg = mlp([d, d, d, 4])
        self.enc_angle = nn.Linear(d, NUM_BINS)
        prior = -math.log((1 - 0.01) / 0.01)  # focal-loss prior probability 0.01
        for head in [*self.cls_heads, self.enc_cls]:
            nn.init.constant_(head.bias, prior)
        for head in [*self.reg_heads, self.enc_reg]:
            nn.init.zeros_(head[-1].weight)
            nn.init.zeros_(head[-1].bias)
        if self.mutdet_options is not None:
            m = self.mutdet_options
            self.mutdet = nn.ModuleDict({
                "patch_enc_output": nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d)),
                "object_proj": nn.Identity() if m.object_dim == d else nn.Linear(m.object_dim, d),
                "enhancement": MutualEnhancement(d, options.num_heads, m.mlp_dim, m.depth),
                "patch_enc_decode": mlp([d, m.encoder_embed_dim, d]),
                "feature_embed": mlp([d, d, d]),
            })

    # --- shared pieces ------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone, neck and deformable encoder.

        Returns:
            ``memory (B, S, D)``, ``spatial_shapes (L, 2)``, ``level_start_index (L,)``,
            ``anchors (S, 4)`` (inverse-sigmoid space), ``valid (S,)`` (anchor inside the band).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected (B, 3, H, W), got {tuple(images.shape)}")
        features = self.neck(self.backbone(images))
        flat, pos, shapes = [], [], []
        for level, feature in enumerate(features):
            b, _, h, w = feature.shape
            mask = feature.new_zeros(b, h, w, dtype=torch.bool)
            pos.append(self.positional(mask).flatten(2).transpose(1, 2) + self.level_embed[level])
            flat.append(feature.flatten(2).transpose(1, 2))
            shapes.append((h, w))
        spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=images.device)
        sizes = spatial_shapes.prod(1)
        level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        valid_ratios = images.new_ones(images.shape[0], NUM_LEVELS, 2)
        memory = self.encoder(query=torch.cat(flat, 1), query_pos=torch.cat(pos, 1), key_padding_mask=None,
                              spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                              valid_ratios=valid_ratios)
        anchors, valid = self._anchors(shapes, images.device)
        return {"memory": memory, "spatial_shapes": spatial_shapes, "level_start_index": level_start_index,
                "anchors": anchors, "valid": valid}

    @staticmethod
    def _anchors(shapes: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        boxes = []
        for level, (h, w) in enumerate(shapes):
            ys, xs = torch.meshgrid((torch.arange(h, device=device) + 0.5) / h,
                                    (torch.arange(w, device=device) + 0.5) / w, indexing="ij")
            side = torch.full_like(xs, 0.05 * 2.0**level)
            boxes.append(torch.stack([xs, ys, side, side], -1).reshape(-1, 4))
        boxes = torch.cat(boxes)
        valid = ((boxes > 0.01) & (boxes < 0.99)).all(-1)
        return inverse_sigmoid(boxes), valid

    def encoder_heads(self, tokens: torch.Tensor, anchors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Objectness ``(B, S)``, boxes ``(B, S, 4)`` and angle logits ``(B, S, 180)`` of every token."""
        return {"logits": self.enc_cls(tokens), "boxes": (self.enc_reg(tokens) + anchors).sigmoid(),
                "angles": self.enc_angle(tokens)}

    def decode(self, value: torch.Tensor, reference: torch.Tensor, angle: torch.Tensor, spatial_shapes: torch.Tensor,
               level_start_index: torch.Tensor, dn: DenoisingQueries | None) -> list[dict[str, torch.Tensor]]:
        """Run the decoder from reference boxes ``(B, Q, 4)`` and angles ``(B, Q)``; DN queries go first.

        Returns:
            Per layer ``{"logits" (B, S+Q, C), "boxes" (B, S+Q, 4), "angles" (B, S+Q, 180), "hidden"}``.
        """
        batch = value.shape[0]
        query = self.query_embed.weight[None].expand(batch, -1, -1)
        attn_mask = None
        if dn is not None:
            noised = self.label_embed(dn.labels) * dn.valid[..., None]
            query = torch.cat([noised, query], 1)
            reference = torch.cat([dn.boxes[..., :4], reference], 1)
            angle = torch.cat([dn.boxes[..., 4], angle], 1)
            attn_mask = dn.attn_mask
        outputs = []
        for layer, block in enumerate(self.decoder):
            pos = self.ref_point_head(box_sine_embedding(reference, self.options.embed_dim))
            query = block(query, pos, value, torch.cat([reference, angle[..., None]], -1), spatial_shapes,
                          level_start_index, attn_mask)
            boxes = (self.reg_heads[layer](query) + inverse_sigmoid(reference)).sigmoid()
            angles = self.angle_heads[layer](query)
            outputs.append({"logits": self.cls_heads[layer](query), "boxes": boxes, "angles": angles, "hidden": query})
            reference = boxes.detach()
            angle = self.coder.decode(angles.detach())
        return outputs

    def _select(self, scores: torch.Tensor, heads: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k tokens by ``scores (B, S)``: detached reference boxes ``(B, k, 4)`` and angles ``(B, k)``."""
        k = self.options.num_queries
        if scores.shape[1] < k:
            raise ValueError(f"images too small: {scores.shape[1]} encoder tokens for {k} queries; use larger "
                             "images or fewer num_queries")
        index = scores.topk(k, dim=1).indices
        boxes = heads["boxes"].detach().gather(1, index[..., None].expand(-1, -1, 4))
        angles = self.coder.decode(heads["angles"].detach().gather(1, index[..., None].expand(-1, -1, NUM_BINS)))
        return boxes, angles

    def _plain_branch(self, encoded: dict[str, torch.Tensor], dn: DenoisingQueries | None):
        tokens = self.enc_output(encoded["memory"] * encoded["valid"][None, :, None])
        heads = self.encoder_heads(tokens, encoded["anchors"])
        scores = heads["logits"][..., 0].masked_fill(~encoded["valid"][None], float("-inf"))
        reference, angle = self._select(scores, heads)
        layers = self.decode(encoded["memory"], reference, angle, encoded["spatial_shapes"],
                             encoded["level_start_index"], dn)
        return heads, layers

    # --- inference ----------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, images: torch.Tensor, max_detections: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Detections of the plain (fine-tuning) path.

        Args:
            images: ``(B, 3, H, W)`` ImageNet-normalised (:func:`accord_mutdet.data.prepare_image`).
            max_detections: top (query, class) pairs kept per image (default ``options.max_detections``).

        Returns:
            Per image ``{"boxes": (M, 5) le90 pixels, "scores": (M,), "labels": (M,) int64}`` by
            decreasing score.
        """
        was_training = self.training
        self.eval()
        try:
            encoded = self.encode(images)
            _, layers = self._plain_branch(encoded, None)
        finally:
            self.train(was_training)
        last = layers[-1]
        height, width = images.shape[-2:]
        scale = last["boxes"].new_tensor([width, height, width, height])
        probs = last["logits"].sigmoid().flatten(1)  # (B, Q * C)
        k = min(max_detections or self.options.max_detections, probs.shape[1])
        scores, index = probs.topk(k, dim=1)
        query, labels = index // self.num_classes, index % self.num_classes
        results = []
        for b in range(images.shape[0]):
            boxes = last["boxes"][b, query[b]] * scale
            angles = self.coder.decode(last["angles"][b, query[b]])
            rotated = normalise_le90(torch.cat([boxes, angles[:, None]], 1).float())
            results.append({"boxes": rotated, "scores": scores[b].float(), "labels": labels[b].long()})
        return results

    # --- training -----------------------------------------------------------------------------------

    def _targets(self, batch: dict[str, Any], height: int, width: int) -> list[dict[str, torch.Tensor]]:
        targets = []
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        for b, (boxes, labels) in enumerate(zip(batch["boxes"], batch["labels"])):
            if boxes.ndim != 2 or boxes.shape[1] != 5 or labels.shape != boxes.shape[:1]:
                raise ValueError(f"batch boxes[{b}] / labels[{b}]: expected (N, 5) and (N,), got "
                                 f"{tuple(boxes.shape)} and {tuple(labels.shape)}")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"batch labels[{b}]: expected classes in [0, {self.num_classes}), got "
                                 f"[{int(labels.min())}, {int(labels.max())}]")
            pixel = normalise_le90(boxes.float())
            normalised = pixel[:, :4] / scale.to(pixel.device)
            # AR-CSL labels once per image: every layer, branch and matcher reuses them
            targets.append({"labels": labels.long(), "boxes": normalised, "pixel_boxes": pixel,
                            "rotated": torch.cat([normalised, pixel[:, 4:]], 1), "csl": self.coder.encode_boxes(pixel)})
        return targets

    def _terms(self, out: dict[str, torch.Tensor], matches, targets, num_pos: float, binary: bool = False,
               rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The four weighted detection terms of one set of predictions and its matches."""
        logits = out["logits"]
        onehot = torch.zeros_like(logits)
        pred_boxes, tgt_boxes, pred_angles, tgt_pixel, tgt_csl = [], [], [], [], []
        for b, (q, t) in enumerate(matches):
            onehot[b, q, 0 if binary else targets[b]["labels"][t]] = 1
            pred_boxes.append(out["boxes"][b, q])
            tgt_boxes.append(targets[b]["boxes"][t])
            pred_angles.append(out["angles"][b, q])
            tgt_pixel.append(targets[b]["pixel_boxes"][t])
            tgt_csl.append(targets[b]["csl"][t])
        if rows is not None:  # denoising: padding queries take no part
            logits, onehot = logits[rows], onehot[rows]
        pred_boxes, tgt_boxes = torch.cat(pred_boxes), torch.cat(tgt_boxes)
        return {
            "cls": LOSS_WEIGHTS["cls"] * focal_loss(logits, onehot, num_pos),
            "bbox": LOSS_WEIGHTS["bbox"] * box_l1_loss(pred_boxes, tgt_boxes, num_pos),
            "iou": LOSS_WEIGHTS["iou"] * hbb_giou_loss(pred_boxes, tgt_boxes, num_pos),
            "angle": LOSS_WEIGHTS["angle"] * angle_bce_loss(torch.cat(pred_angles), torch.cat(tgt_pixel), num_pos,
                                                            self.coder, torch.cat(tgt_csl)),
        }

    def _branch_losses(self, enc_heads, layers, dn: DenoisingQueries | None, targets, objects,
                       enc_embeddings: torch.Tensor | None, prefix: str) -> dict[str, torch.Tensor]:
        """Encoder, decoder (every layer), denoising and (MutDet) alignment terms of one branch."""
        device = enc_heads["logits"].device
        # global-batch normalisers (DDP then reproduces one process on the same global batch)
        num_pos = rank_normaliser(sum(t["labels"].numel() for t in targets), device)
        dn_pos = rank_normaliser(int(dn.positive.sum()), device) if dn is not None else 0.0
        losses: dict[str, torch.Tensor] = {}
        binary_targets = [{**t, "labels": t["labels"].new_zeros(t["labels"].shape)} for t in targets]
        enc_matches = match_queries(enc_heads["logits"], enc_heads["boxes"], enc_heads["angles"], binary_targets,
                                    self.coder)
        for name, value in self._terms(enc_heads, enc_matches, targets, num_pos, binary=True).items():
            losses[f"{prefix}enc_{name}"] = value
        dn_size = dn.size if dn is not None else 0
        dec_matches = None
        for layer, out in enumerate(layers):
            matching = {k: v[:, dn_size:] for k, v in out.items()}
            dec_matches = match_queries(matching["logits"], matching["boxes"], matching["angles"], targets, self.coder)
            for name, value in self._terms(matching, dec_matches, targets, num_pos).items():
                key = f"{prefix}{name}"
                losses[key] = losses.get(key, 0) + value
            if dn is not None:
                noised = {k: v[:, :dn_size] for k, v in out.items()}
                dn_matches = [(dn.positive[b].nonzero()[:, 0], dn.target_index[b][dn.positive[b]])
                              for b in range(len(targets))]
                terms = self._terms(noised, dn_matches, targets, dn_pos, rows=dn.valid)
            else:
                terms = {name: out["logits"].sum() * 0 for name in ("cls", "bbox", "iou", "angle")}
            for name, value in terms.items():
                key = f"{prefix}dn_{name}"
                losses[key] = losses.get(key, 0) + value
        if objects is None:
            return losses
        # MutDet alignment: decoder last layer, DN last layer (group 0), encoder (enhanced branch only)
        embed = self.mutdet["feature_embed"](layers[-1]["hidden"])
        tau = self.mutdet_options.tau
        aligned = alignment_loss(list(embed[:, dn_size:]), objects, [q for q, _ in dec_matches],
                                 [t for _, t in dec_matches], tau)
        losses[f"{prefix}embed"] = aligned.loss
        if dn is not None:
            # Group 0's positive copy of target j is query j (the reference takes the first rows of the
            # flattened batch instead, i.e. image 0's repeated groups; spec §7).
            group0 = [torch.arange(t["labels"].numel(), device=embed.device) for t in targets]
            dn_aligned = alignment_loss(list(embed[:, :dn_size]), objects, group0, group0, tau)
            losses[f"{prefix}dn_embed"] = dn_aligned.loss
        else:
            losses[f"{prefix}dn_embed"] = embed.sum() * 0
        if enc_embeddings is not None:
            enc_aligned = alignment_loss(list(enc_embeddings), objects, [q for q, _ in enc_matches],
                                         [t for _, t in enc_matches], tau)
            losses[f"{prefix}enc_embed"] = enc_aligned.loss
        losses[f"{prefix}pos_sim"] = torch.nan_to_num(aligned.pos_sim).detach()
        losses[f"{prefix}neg_sim"] = torch.nan_to_num(aligned.neg_sim).detach()
        return losses

    def _enhanced_branch(self, encoded, objects_raw: list[torch.Tensor], dn):
        """MutDet's enhanced branch: enhancement, similarity x objectness proposals, decoder on F_enh."""
        m = self.mutdet
        valid = encoded["valid"]
        pre = m["patch_enc_output"](encoded["memory"] * valid[None, :, None])
        batch = pre.shape[0]
        most = max(1, max(o.shape[0] for o in objects_raw))
        objects = pre.new_zeros(batch, most, self.options.embed_dim)
        padding = torch.ones(batch, most, dtype=torch.bool, device=pre.device)
        for b, o in enumerate(objects_raw):
            objects[b, : o.shape[0]] = m["object_proj"](o.to(pre.dtype))
            padding[b, : o.shape[0]] = False
        enhanced_objects, enhanced_memory = m["enhancement"](objects, pre, padding)
        heads = self.encoder_heads(enhanced_memory, encoded["anchors"])
        token_embed = m["patch_enc_decode"](enhanced_memory)
        scores = proposal_scores(token_embed.detach(), enhanced_objects.detach(), padding,
                                 heads["logits"][..., 0].detach(), self.mutdet_options.proposal_score)
        scores = scores.masked_fill(~valid[None], float("-inf"))
        reference, angle = self._select(scores, heads)
        layers = self.decode(enhanced_memory, reference, angle, encoded["spatial_shapes"],
                             encoded["level_start_index"], dn)
        targets_enh = [enhanced_objects[b, : o.shape[0]] for b, o in enumerate(objects_raw)]
        return heads, layers, targets_enh, token_embed

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        images = batch["images"]
        targets = self._targets(batch, images.shape[-2], images.shape[-1])
        encoded = self.encode(images)
        o = self.options
        dn = make_denoising_queries([t["labels"] for t in targets], [t["rotated"] for t in targets],
                                    o.num_queries, self.num_classes, o.num_dn_queries, o.dn_label_noise,
                                    o.dn_box_noise, o.dn_angle_noise, most=_global_most(targets, images.device)
                                    ) if self.training else None
        enc_heads, layers = self._plain_branch(encoded, dn)
        if self.mutdet_options is None:
            losses = self._branch_losses(enc_heads, layers, dn, targets, None, None, "")
        else:
            if "embeddings" not in batch:
                raise ValueError("batch: MutDet pretraining needs 'embeddings' (per image (N, object_dim)); "
                                 "give the dataset a pseudo-label directory")
            raw = list(batch["embeddings"])
            for b, (emb, t) in enumerate(zip(raw, targets)):
                expected = (t["labels"].numel(), self.mutdet_options.object_dim)
                if emb.ndim != 2 or tuple(emb.shape) != expected:
                    raise ValueError(f"batch embeddings[{b}]: expected {expected}, got {tuple(emb.shape)}")
            p_heads, p_layers, objects, token_embed = self._enhanced_branch(encoded, raw, dn)
            losses = self._branch_losses(enc_heads, layers, dn, targets, objects, None, "")
            losses.update(self._branch_losses(p_heads, p_layers, dn, targets, objects, token_embed, "p_"))
        total = sum(v for k, v in losses.items() if not k.endswith("_sim"))
        if dn is None:  # no target in the batch: keep label_embed in the graph (DDP needs every parameter)
            total = total + self.label_embed.weight.sum() * 0
        return {"loss": total, **losses}
