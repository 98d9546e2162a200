"""The shared loss precision policy: upcast half inputs, no autocast inside a loss."""

import torch
from torch import nn

from accord.losses.precision import autocast_disabled, float32_forward


class _Recorder(nn.Module):
    @float32_forward
    def forward(self, first, pair, scale=None):
        return first @ first.T, [t.dtype for t in pair], scale.dtype


def test_autocast_disabled_keeps_fp32_matmuls_under_bf16_autocast() -> None:
    a = torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a.T).dtype == torch.bfloat16
        with autocast_disabled(a.device):
            assert (a @ a.T).dtype == torch.float32


def test_float32_forward_upcasts_half_inputs_also_in_lists_and_keywords() -> None:
    half = torch.randn(4, 3, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        product, pair_dtypes, scale_dtype = _Recorder()(half, [half, half.half()], scale=half)
    assert product.dtype == torch.float32
    assert pair_dtypes == [torch.float32, torch.float32]
    assert scale_dtype == torch.float32


def test_float32_forward_leaves_fp64_alone_for_gradcheck() -> None:
    double = torch.randn(2, 3, dtype=torch.float64)
    product, pair_dtypes, _ = _Recorder()(double, (double,), scale=double)
    assert product.dtype == torch.float64 and pair_dtypes == [torch.float64]
