"""Make spconv's CPU build train on a CPU-only torch.

spconv's sparse-conv ops ask for the current CUDA stream on every call
(``spconv.pytorch.ops.get_current_stream``), including on CPU paths such as
``indice_conv_backward``. On a CPU-only torch ``torch.cuda.current_stream()`` raises, so the
forward pass of a SubM conv works but its backward fails. The CPU kernels ignore the stream
handle, so stream 0 (the default-stream handle) is what they should receive. This module is the
one place that patches it; everything in :mod:`accord_superflow.models` that touches spconv imports
it first.
"""

from __future__ import annotations

import torch

__all__ = ["ensure_spconv_cpu_support"]


def _default_stream_handle() -> int:
    return 0


def ensure_spconv_cpu_support() -> None:
    """Patch ``spconv.pytorch.ops.get_current_stream`` when torch has no CUDA (idempotent)."""
    if torch.cuda.is_available():
        return
    import spconv.pytorch.ops as spconv_ops

    spconv_ops.get_current_stream = _default_stream_handle


ensure_spconv_cpu_support()
