"""Precision policy shared by accord's losses.

Half-precision inputs are upcast and autocast is disabled inside a loss, so softmax, normalisation,
log-sum-exp and reductions accumulate in fp32 even when the encoder runs under bf16 / fp16
autocast. :func:`autocast_disabled` is the one switch; :func:`float32_forward` applies it (plus the
upcast) to a whole ``forward``.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager
from typing import Any, Callable, Sequence, TypeVar

import torch
from torch import nn

__all__ = ["autocast_disabled", "float32_forward"]


def autocast_disabled(device: torch.device | str) -> AbstractContextManager[None]:
    """Context in which autocast is off on ``device``'s type, so matmuls run in the inputs' dtype."""
    device_type = device if isinstance(device, str) else device.type
    return torch.autocast(device_type=device_type, enabled=False)


_HALF_DTYPES = (torch.float16, torch.bfloat16)
_Forward = TypeVar("_Forward", bound=Callable[..., Any])


def _upcast(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _HALF_DTYPES else value
    if isinstance(value, (list, tuple)):
        return type(value)(_upcast(item) for item in value)
    return value


def _first_device_type(values: Sequence[Any]) -> str:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device.type
        if isinstance(value, (list, tuple)):
            found = _first_device_type(value)
            if found:
                return found
    return ""


def float32_forward(forward: _Forward) -> _Forward:
    """Decorate a loss ``forward`` to compute in at least fp32.

    fp16 / bf16 tensor arguments (also inside lists and tuples) are cast to fp32 and autocast is
    disabled for the body; fp32 and fp64 inputs are left alone (fp64 keeps ``gradcheck`` exact).
    """

    @functools.wraps(forward)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        device_type = _first_device_type([*args, *kwargs.values()]) or "cpu"
        with autocast_disabled(device_type):
            return forward(self, *_upcast(args), **{key: _upcast(value) for key, value in kwargs.items()})

    return wrapper  # type: ignore[return-value]
