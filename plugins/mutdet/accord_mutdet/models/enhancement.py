"""MutDet's mutual enhancement module: SAM-decoder-style two-way blocks between objects and memory."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TwoWayBlock", "MutualEnhancement"]


class TwoWayBlock(nn.Module):
    """One two-way block (spec §5): post-norm residuals, no positional encodings.

    1. ``O = LN1(O + SelfAttn(O))``
    2. ``O = LN2(O + CrossAttn(q=O, kv=F))`` (objects read the detector memory)
    3. ``O = LN3(O + MLP(O))``
    4. ``F = LN4(F + CrossAttn(q=F, kv=O))`` (the memory reads the objects)

    Padded object slots are masked as keys; an image without objects leaves its memory unchanged
    (step 4 has nothing to read).

    Args:
        dim: feature width.
        num_heads: attention heads.
        mlp_dim: hidden width of the object MLP (MutDet: 2048).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.object_to_memory = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.memory_to_object = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU(inplace=True), nn.Linear(mlp_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, objects: torch.Tensor, memory: torch.Tensor, object_padding: torch.Tensor,
                memory_padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``objects (B, N, D)``, ``memory (B, M, D)``, ``object_padding (B, N)`` True = padding,
        ``memory_padding (B, M)`` True = invalid token -> updated ``(objects, memory)``."""
        has_objects = ~object_padding.all(dim=1)  # (B,)
        # A fully padded key set would make softmax NaN: unmask those rows, their result is discarded.
        keys_padding = object_padding & has_objects[:, None]
        attended = self.self_attn(objects, objects, objects, key_padding_mask=keys_padding, need_weights=False)[0]
        objects = self.norms[0](objects + attended)
        attended = self.object_to_memory(objects, memory, memory, key_padding_mask=memory_padding,
                                         need_weights=False)[0]
        objects = self.norms[1](objects + attended)
        objects = self.norms[2](objects + self.mlp(objects))
        read = self.memory_to_object(memory, objects, objects, key_padding_mask=keys_padding, need_weights=False)[0]
        updated = self.norms[3](memory + read)
        memory = torch.where(has_objects[:, None, None], updated, memory)
        return objects, memory


class MutualEnhancement(nn.Module):
    """``depth`` two-way blocks: ``(O, F) -> (O_enh, F_enh)`` (MutDet: depth 3, 8 heads, MLP 2048)."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TwoWayBlock(dim, num_heads, mlp_dim) for _ in range(depth))

    def forward(self, objects: torch.Tensor, memory: torch.Tensor, object_padding: torch.Tensor,
                memory_padding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """See :class:`TwoWayBlock`; shapes are kept."""
        for block in self.blocks:
            objects, memory = block(objects, memory, object_padding, memory_padding)
        return objects, memory
