"""MedRPG's model: TransVG (ResNet + DETR encoder, BERT, vision-language encoder, box MLP)."""

from accord_medrpg.models.layers import Encoder, EncoderLayer
from accord_medrpg.models.text import SPECIAL_TOKENS, PhraseTokenizer, TextEncoder, read_bert_folder, train_vocabulary
from accord_medrpg.models.transvg import TacoOptions, TransVG, TransVGOptions
from accord_medrpg.models.visual import FrozenBatchNorm2d, ResNetBackbone, VisualEncoder, sine_position_embedding

__all__ = [
    "SPECIAL_TOKENS",
    "Encoder",
    "EncoderLayer",
    "FrozenBatchNorm2d",
    "PhraseTokenizer",
    "ResNetBackbone",
    "TacoOptions",
    "TextEncoder",
    "TransVG",
    "TransVGOptions",
    "VisualEncoder",
    "read_bert_folder",
    "sine_position_embedding",
    "train_vocabulary",
]
