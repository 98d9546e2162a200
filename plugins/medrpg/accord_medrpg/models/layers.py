"""DETR-style transformer encoder layers that also return their head-averaged attention.

``nn.TransformerEncoderLayer`` cannot add a positional embedding to queries and keys only (DETR adds
it to Q and K in every layer, never to V) and does not return attention weights, hence this small
layer around ``nn.MultiheadAttention``. Parameter names follow DETR / TransVG (``self_attn``,
``linear1``, ``linear2``, ``norm1``, ``norm2``) so their checkpoints load key for key.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EncoderLayer", "Encoder"]


class EncoderLayer(nn.Module):
    """Post-norm encoder layer: ``x = norm1(x + attn(x + pos, x + pos, x)); x = norm2(x + ffn(x))``.

    Args:
        dim: token width.
        heads: attention heads.
        ffn_dim: hidden width of the feed-forward block (ReLU).
        dropout: dropout on attention weights, the attention output and the feed-forward block.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor | None, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Args: x ``(B, N, D)``, pos ``(B|1, N, D)``, padding_mask ``(B, N)`` bool (True = ignore).

        Returns:
            ``(x (B, N, D), attention (B, N, N) or None)``; the attention is averaged over heads
            after softmax and after attention dropout (as the reference's MHA), row = query.
        """
        query = x + pos
        attended, attention = self.self_attn(query, query, x, key_padding_mask=padding_mask,
                                             need_weights=need_weights, average_attn_weights=True)
        x = self.norm1(x + self.dropout1(attended))
        x = self.norm2(x + self.dropout2(self.linear2(self.dropout(torch.relu(self.linear1(x))))))
        return x, attention


class Encoder(nn.Module):
    """A stack of :class:`EncoderLayer` (xavier-initialised); returns the last layer's attention.

    Args:
        num_layers: layers (0 returns the input unchanged and no attention).
        dim, heads, ffn_dim, dropout: see :class:`EncoderLayer`.
    """

    def __init__(self, num_layers: int, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn_dim, dropout) for _ in range(num_layers))
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, padding_mask: torch.Tensor | None = None, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(tokens (B, N, D), last-layer head-averaged attention (B, N, N) or None)``."""
        attention = None
        for index, layer in enumerate(self.layers):
            x, attention = layer(x, pos, padding_mask, need_weights and index == len(self.layers) - 1)
        return x, attention
