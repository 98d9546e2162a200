"""CASA: Alice's conditional anatomical semantic alignment (the "CAFA" of arXiv v1), medssl §1.6.

One post-norm transformer cross-attention layer without self-attention:

    h   = LayerNorm(Q + Dropout(MHA(Q, KV, KV)))
    out = LayerNorm(h + Dropout(W_2 ReLU(W_1 h)))

with bias-free query/key/value/output projections. Alice applies the *same* layer twice per view,
with the student's encoder-token head outputs as queries in both:

- ``z_s = CA(Q = student encoder tokens, KV = student decoder tokens)``, the prediction;
- ``z_t = CA(Q = student encoder tokens, KV = teacher decoder tokens)``, the target.

The target is detached in the reference loss, so CASA and the student learn only through ``z_s``;
here it is computed under ``torch.no_grad()`` (the same values, without building a graph), and the
teacher never receives gradient. The reference's unused ``projection_*`` layers (8.9 M parameters,
§1.13 bug 9) are not built.
"""

from __future__ import annotations

import torch
from torch import nn

from accord.utils.checks import check_tensor

__all__ = ["CASA"]


class CASA(nn.Module):
    """Cross-attention alignment of encoder-token queries to decoder-token keys.

    Args:
        dim: token width ``K`` (the head output size; 512 in Alice).
        num_heads: attention heads; ``dim`` must be a multiple (8 heads of 64 in Alice).
        hidden_dim: feed-forward width (2048 in Alice).
        dropout: attention and residual dropout (0.1 in Alice).

    Shape:
        - ``queries``: ``(B, T_q, K)``; ``student_keys``, ``teacher_keys``: ``(B, T_k, K)``.
        - Outputs: two ``(B, T_q, K)`` tensors.

    Example:
        >>> casa = CASA(dim=64, num_heads=8, hidden_dim=128)
        >>> z_s, z_t = casa(torch.randn(2, 8, 64), torch.randn(2, 64, 64), torch.randn(2, 64, 64))
        >>> z_s.shape, z_t.requires_grad
        (torch.Size([2, 8, 64]), False)
    """

    def __init__(self, dim: int, num_heads: int = 8, hidden_dim: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads: must divide dim={dim}, got {num_heads}")
        self.dim = dim
        # Scaled dot-product attention with 1/sqrt(dim / num_heads), as the reference's 1/sqrt(d_k).
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, bias=False, batch_first=True)
        self.attention_dropout = nn.Dropout(dropout)
        self.attention_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feed_forward = nn.Sequential(nn.Linear(dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, dim))
        self.feed_forward_dropout = nn.Dropout(dropout)
        self.feed_forward_norm = nn.LayerNorm(dim, eps=1e-6)

    def cross_attend(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """One cross-attention layer ``CA(queries, keys)``: ``(B, T_q, K)``, ``(B, T_k, K)`` -> ``(B, T_q, K)``."""
        attended, _ = self.attention(queries, keys, keys, need_weights=False)
        hidden = self.attention_norm(queries + self.attention_dropout(attended))
        return self.feed_forward_norm(hidden + self.feed_forward_dropout(self.feed_forward(hidden)))

    def forward(
        self, queries: torch.Tensor, student_keys: torch.Tensor, teacher_keys: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned student prediction and (gradient-free) target tokens.

        Args:
            queries: the student's encoder-token head outputs.
            student_keys: the student's decoder-token head outputs.
            teacher_keys: the teacher's decoder-token head outputs for the same (unmasked) view.

        Returns:
            ``(z_s, z_t)``; ``z_t`` carries no gradient.

        Raises:
            ValueError: wrong ranks, widths or batch sizes.
        """
        check_tensor(queries, "queries", shape=(None, None, self.dim), floating=True)
        check_tensor(student_keys, "student_keys", shape=(queries.shape[0], None, self.dim), floating=True)
        check_tensor(teacher_keys, "teacher_keys", shape=tuple(student_keys.shape), floating=True)
        student_aligned = self.cross_attend(queries, student_keys)
        with torch.no_grad():
            teacher_aligned = self.cross_attend(queries, teacher_keys)
        return student_aligned, teacher_aligned
