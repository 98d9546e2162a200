"""Input validation shared by losses, matchers and heads.

Every check raises ``ValueError`` with one message that names the argument, what was expected and
what was given, so bad input never broadcasts silently into a wrong result.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = [
    "check_tensor",
    "check_same_shape",
    "check_positive",
    "check_finite",
    "check_index_range",
]


def check_tensor(
    tensor: object,
    name: str,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    min_rows: int = 1,
    floating: bool | None = None,
) -> torch.Tensor:
    """Check type, rank, shape and emptiness of a tensor argument.

    Args:
        tensor: the value to check.
        name: the argument name used in error messages.
        ndim: allowed number(s) of dimensions.
        shape: expected shape; ``None`` entries match any size. Implies ``ndim``.
        min_rows: minimum size of dim 0 (``0`` allows empty tensors).
        floating: require a floating (``True``) or integer (``False``) dtype.

    Returns:
        The tensor, unchanged.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if tensor.ndim not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(tensor.shape)}")
    if shape is not None and any(
        want is not None and got != want for want, got in zip(shape, tensor.shape)
    ):
        pretty = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name}: expected shape {pretty}, got {tuple(tensor.shape)}")
    if tensor.ndim > 0 and tensor.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} row(s), got shape {tuple(tensor.shape)}")
    if floating is True and not tensor.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {tensor.dtype}")
    if floating is False and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        raise ValueError(f"{name}: expected an integer tensor, got dtype {tensor.dtype}")
    return tensor


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    """Require two tensors to have exactly the same shape (no broadcasting)."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_positive(value: float, name: str) -> float:
    """Require a strictly positive finite number (temperatures, scales)."""
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return value


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """Require every element to be finite (no NaN / Inf features)."""
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{name}: contains {bad} NaN/Inf value(s); features must be finite")


def check_index_range(index: torch.Tensor, name: str, upper: int, lower: int = 0) -> None:
    """Require integer indices/labels in ``[lower, upper)``."""
    if index.numel() and (int(index.min()) < lower or int(index.max()) >= upper):
        raise ValueError(
            f"{name}: values must be in [{lower}, {upper}), got min {int(index.min())} "
            f"max {int(index.max())}"
        )
