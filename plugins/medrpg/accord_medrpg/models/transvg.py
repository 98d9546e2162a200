"""TransVG (Deng et al., ICCV 2021) as MedRPG uses it, with TaCo as its training-only loss.

``image -> ResNet + DETR encoder -> visu_proj``; ``phrase -> BERT -> text_proj``; the sequence
``[REG] | L text tokens | G*G visual tokens`` (+ a learned position per slot) runs through the
vision-language encoder; an MLP on the [REG] output gives the box through a sigmoid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from accord.config import StrictModel
from accord.heads import ProjectionHead
from accord_medrpg.losses import box_losses
from accord_medrpg.models.layers import Encoder
from accord_medrpg.models.text import TextEncoder
from accord_medrpg.models.visual import STRIDE, VisualEncoder
from accord_medrpg.taco import TacoMode, TextPool, taco_loss

__all__ = ["TransVGOptions", "TacoOptions", "TransVG", "quick_options"]


class TransVGOptions(StrictModel):
    """Architecture of TransVG (defaults: the reference's, 640 px, ResNet-50, 6 + 6 layers, d=256)."""

    image_size: int = Field(640, ge=STRIDE, description="square canvas side; a multiple of 32 (grid = size / 32)")
    max_query_len: int = Field(20, ge=3, description="text tokens incl. [CLS] and [SEP]")
    dim: int = Field(256, ge=8, description="width of the DETR and vision-language encoders")
    resnet_layers: list[int] = Field([3, 4, 6, 3], min_length=4, max_length=4,
                                     description="bottleneck blocks per stage")
    resnet_widths: list[int] = Field([64, 128, 256, 512], min_length=4, max_length=4, description="stage widths")
    resnet_train_from: Literal["conv1", "layer1", "layer2", "layer3", "layer4"] = Field(
        "layer2", description="first trainable ResNet stage (layer2: the stem and layer1 stay fixed, as DETR)")
    detr_layers: int = Field(6, ge=0)
    vl_layers: int = Field(6, ge=1)
    heads: int = Field(8, ge=1)
    ffn_dim: int = Field(2048, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    bert_path: str | None = Field(
        None, description="local bert-base-uncased folder (vocab.txt, config.json, weights); None: a BERT built "
        "from bert_config with a WordPiece vocabulary trained on the training phrases")
    bert_config: dict[str, Any] = Field(
        default_factory=lambda: {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                 "intermediate_size": 3072},
        description="BertConfig keywords of a BERT built without bert_path")
    vocab_size: int = Field(2000, ge=16, description="WordPiece vocabulary trained on the phrases (no bert_path)")

    @model_validator(mode="after")
    def _canvas_fits_grid(self) -> "TransVGOptions":
        if self.image_size % STRIDE:
            raise ValueError(f"image_size must be a multiple of {STRIDE}, got {self.image_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self

    @property
    def grid(self) -> int:
        return self.image_size // STRIDE


def quick_options(**overrides: Any) -> TransVGOptions:
    """A CPU-sized TransVG (128 px, a 4 x 4 grid, 1-block ResNet stages, 1 + 2 layers at d = 32, a
    1-layer BERT at 32 wide): the quick benchmark's and the tests' model; ``overrides`` replace fields."""
    options: dict[str, Any] = dict(
        image_size=128, dim=32, resnet_layers=[1, 1, 1, 1], resnet_widths=[8, 16, 16, 32], detr_layers=1,
        vl_layers=2, heads=2, ffn_dim=64, dropout=0.1, max_query_len=12, vocab_size=300,
        bert_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    return TransVGOptions(**{**options, **overrides})


class TacoOptions(StrictModel):
    """TaCo (defaults: MedRPG's ``max_image_lcpTriple``, [CLS] text feature, tau 0.1, 0.05 (e/E)^0.9)."""

    mode: TacoMode = Field("max_image_lcpTriple", description="none: plain TransVG")
    text_pool: TextPool = Field("cls", description="marker: every phrase marks its grounded span as 'text *span* text'")
    temperature: float = Field(0.1, gt=0)
    weight: float = Field(0.05, ge=0, description="loss weight reached at the last epoch")
    power: float = Field(0.9, gt=0, description="exponent of the (epoch / epochs) ramp")


class TransVG(nn.Module):
    """TransVG with the outputs TaCo needs.

    Called two ways:

    * ``model(image, image_mask, phrases) -> dict`` (inference, the grounding CLI):
      ``pred_box (B, 4)`` normalised ``cx, cy, w, h`` on the canvas, ``reg_attention (B, G*G)``
      head-averaged last-layer [REG] -> visual attention, ``tokens (B, N, D)`` the final VL tokens,
      ``attention (B, N, N)`` the last layer's head-averaged attention, ``text_mask (B, L)`` and
      ``visual_mask (B, G*G)`` (True = padding); ``N = 1 + L + G*G``.
    * ``model(batch) -> {"loss", "l1", "giou"[, "taco"]}`` (the trainer's contract) with the
      batch of ``accord_medrpg.data.collate_grounding``.

    Args:
        options: the architecture.
        taco: TaCo's options (training only).
        vocabulary: WordPiece tokens in id order (from the data or a BERT folder).
        bert_config: ``BertConfig`` keywords (``options.bert_config`` or a BERT folder's).
    """

    def __init__(self, options: TransVGOptions, taco: TacoOptions, vocabulary: Sequence[str],
                 bert_config: Mapping[str, Any]) -> None:
        super().__init__()
        self.options, self.taco = options, taco
        dim, grid = options.dim, options.grid
        self.visual = VisualEncoder(dim, options.resnet_layers, options.resnet_widths, options.resnet_train_from,
                                    options.detr_layers, options.heads, options.ffn_dim, options.dropout)
        self.text = TextEncoder(vocabulary, dict(bert_config), options.max_query_len)
        self.visu_proj = nn.Linear(dim, dim)
        self.text_proj = nn.Linear(self.text.width, dim)
        self.reg_token = nn.Embedding(1, dim)
        self.vl_pos_embed = nn.Embedding(1 + options.max_query_len + grid * grid, dim)
        self.vl_transformer = Encoder(options.vl_layers, dim, options.heads, options.ffn_dim, options.dropout)
        self.bbox_embed = ProjectionHead(dim, dim, 4, num_layers=3, batch_norm=False)  # Linear-ReLU x2, Linear
        #: TaCo's weight for the current step, set by the training task each step (0: off).
        self.taco_scale = 0.0

    def forward(self, image: torch.Tensor | Mapping[str, Any], image_mask: torch.Tensor | None = None,
                phrases: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        if isinstance(image, Mapping):
            return self.training_losses(image)
        if image_mask is None or phrases is None:
            raise TypeError("TransVG(image, image_mask, phrases): image_mask and phrases are required")
        return self.ground(image, image_mask, phrases)

    def ground(self, image: torch.Tensor, image_mask: torch.Tensor, phrases: Sequence[str]) -> dict[str, torch.Tensor]:
        """See the class: ``image (B, 3, S, S)``, ``image_mask (B, S, S)`` bool, ``phrases`` B strings."""
        size = self.options.image_size
        if image.ndim != 4 or image.shape[1:] != (3, size, size):
            raise ValueError(f"image must be (B, 3, {size}, {size}), got {tuple(image.shape)}")
        if image_mask.shape != (image.shape[0], size, size) or image_mask.dtype != torch.bool:
            raise ValueError(f"image_mask must be ({image.shape[0]}, {size}, {size}) bool, got "
                             f"{tuple(image_mask.shape)} {image_mask.dtype}")
        if len(phrases) != image.shape[0]:
            raise ValueError(f"got {len(phrases)} phrases for {image.shape[0]} images")
        visual, visual_mask = self.visual(image, image_mask)
        text, text_mask = self.text(phrases)
        batch = image.shape[0]
        sequence = torch.cat((self.reg_token.weight.expand(batch, 1, -1), self.text_proj(text),
                              self.visu_proj(visual)), dim=1)
        padding = torch.cat((torch.zeros(batch, 1, dtype=torch.bool, device=image.device), text_mask, visual_mask), 1)
        tokens, attention = self.vl_transformer(sequence, self.vl_pos_embed.weight[None], padding, need_weights=True)
        first_visual = 1 + self.options.max_query_len
        return {
            "pred_box": self.bbox_embed(tokens[:, 0]).sigmoid(),
            "reg_attention": attention[:, 0, first_visual:],
            "tokens": tokens,
            "attention": attention,
            "text_mask": text_mask,
            "visual_mask": visual_mask,
        }

    def training_losses(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``loss = l1 + giou + taco_scale * taco`` on a ``collate_grounding`` batch."""
        output = self.ground(batch["image"], batch["image_mask"], batch["phrase"])
        terms = box_losses(output["pred_box"], batch["box"])
        loss = terms["l1"] + terms["giou"]
        if self.taco.mode != "none":
            boxes = torch.cat((batch["box"][:, None], batch["negatives"]), dim=1)
            span = (self.text.tokenizer.marker_span(batch["phrase"]).to(boxes.device)
                    if self.taco.text_pool == "marker" else None)
            taco = taco_loss(output["tokens"], output["attention"], boxes, num_text=self.options.max_query_len,
                             temperature=self.taco.temperature, mode=self.taco.mode, text_pool=self.taco.text_pool,
                             text_mask=output["text_mask"], marker_span=span)
            terms["taco"] = taco.loss
            loss = loss + self.taco_scale * taco.loss
        return {"loss": loss, **terms}
