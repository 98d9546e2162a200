"""GEMINI's loss terms and warp against plain loop references (values and gradients), and the
stop-gradient routing of medssl §2.5."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

from accord_medssl.gemini.losses import (
    binary_cross_entropy_loss,
    box_sum,
    correspondence_loss,
    cross_entropy_loss,
    gss_loss,
    local_ncc_loss,
    masked_cosine_loss,
    restoration_loss,
    segmentation_loss,
    smoothness_loss,
    soft_dice_loss,
)
from accord_medssl.gemini.networks import GeminiNetwork, GeminiNetworkOptions
from accord_medssl.gemini.warp import validity_mask, warp



@pytest.fixture(autouse=True)
def _float64():
    """The loop references compare to 1e-10: every test here runs in float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# Small convolutions on a loaded machine run many times faster without OpenMP spinning.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def loop_warp(image: torch.Tensor, flow: torch.Tensor, mode: str) -> torch.Tensor:
    """out[b, c, x] = image[b, c, x + flow[b, :, x]] by (multi)linear or nearest interpolation, zeros outside."""
    spatial = image.shape[2:]
    out = torch.zeros_like(image)
    for b in range(image.shape[0]):
        for x in itertools.product(*map(range, spatial)):
            point = [x[i] + flow[(b, i, *x)] for i in range(len(spatial))]
            if mode == "nearest":
                corner = [int(torch.round(p)) for p in point]  # no ties in these tests
                if all(0 <= c < n for c, n in zip(corner, spatial)):
                    out[(b, slice(None), *x)] = image[(b, slice(None), *corner)]
                continue
            value = 0
            floors = [torch.floor(p) for p in point]
            for offsets in itertools.product((0, 1), repeat=len(spatial)):
                corner = [int(f) + o for f, o in zip(floors, offsets)]
                weight = 1
                for p, f, o in zip(point, floors, offsets):
                    weight = weight * ((p - f) if o else (1 - (p - f)))
                if all(0 <= c < n for c, n in zip(corner, spatial)):
                    value = value + weight * image[(b, slice(None), *corner)]
            out[(b, slice(None), *x)] = value
    return out


def loop_ncc(image, target, mask, window):
    """1 - sum(M cc) / denominator with window sums taken voxel by voxel."""
    dims = image.dim() - 2
    half = window // 2
    pad = [half] * (2 * dims)
    maps = [F.pad(m.mean(1), pad) for m in (image, target, image * image, target * target, image * target)]
    size = window**dims
    ccs = torch.zeros(image.shape[0], *image.shape[2:])
    for b in range(image.shape[0]):
        for x in itertools.product(*map(range, image.shape[2:])):
            box = (b, *[slice(i, i + window) for i in x])
            i_sum, j_sum, i2, j2, ij = (m[box].sum() for m in maps)
            ui, uj = i_sum / size, j_sum / size
            cross = ij - uj * i_sum - ui * j_sum + ui * uj * size
            ivar = i2 - 2 * ui * i_sum + ui * ui * size
            jvar = j2 - 2 * uj * j_sum + uj * uj * size
            ccs[(b, *x)] = cross * cross / (ivar * jvar + 1e-5)
    if mask is None:
        return 1 - ccs.mean()
    m = mask[:, 0]
    denominator = (m + 1e-6).sum() if dims == 3 else m.sum() + 1e-5
    return 1 - (ccs * m).sum() / denominator


def grads(fn, *tensors):
    tensors = [t.clone().requires_grad_(True) for t in tensors]
    value = fn(*tensors)
    return value.detach(), torch.autograd.grad(value, tensors)


def assert_same(fn, reference, *tensors, atol=1e-10):
    value, gradients = grads(fn, *tensors)
    expected, expected_gradients = grads(reference, *tensors)
    torch.testing.assert_close(value, expected, atol=atol, rtol=1e-8)
    for got, want in zip(gradients, expected_gradients):
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-7)


@pytest.mark.parametrize("shape", [(2, 2, 5, 6), (1, 3, 4, 5, 3)])
@pytest.mark.parametrize("penalty", ["l2", "l1"])
def test_smoothness_matches_loop(shape, penalty):
    flow = torch.randn(shape, generator=torch.Generator().manual_seed(0))

    def reference(f):
        dims = f.dim() - 2
        total = 0
        for axis in range(dims):
            n = f.shape[2 + axis]
            terms = [(f.select(2 + axis, i + 1) - f.select(2 + axis, i)) for i in range(n - 1)]
            values = torch.stack([t.square() if penalty == "l2" else t.abs() for t in terms])
            total = total + values.sum() / values.numel()
        return total / dims

    assert_same(lambda f: smoothness_loss(f, penalty), reference, flow)
    assert float(smoothness_loss(torch.full(shape, 3.7), penalty)) == 0.0


@pytest.mark.parametrize("shape", [(2, 2, 5, 6), (1, 2, 4, 5, 3)])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_warp_matches_loop_reference_and_monai(shape, mode):
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(shape, generator=generator)
    flow = 1.7 * torch.randn((shape[0], len(shape) - 2, *shape[2:]), generator=generator)
    if mode == "bilinear":
        assert_same(lambda i, f: warp(i, f, mode).sum(), lambda i, f: loop_warp(i, f, mode).sum(), image, flow)
    torch.testing.assert_close(warp(image, flow, mode), loop_warp(image, flow, mode))
    # MONAI's Warp: channel i of the DDF displaces spatial axis i, in voxels (the "correct" convention).
    torch.testing.assert_close(Warp(mode=mode, padding_mode="zeros")(image, flow), loop_warp(image, flow, mode))


@pytest.mark.parametrize("shape", [(1, 1, 6, 7), (1, 2, 4, 5, 6)])
def test_zero_flow_conventions(shape):
    image = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    zero = torch.zeros((shape[0], len(shape) - 2, *shape[2:]))
    # Identity up to the rounding of grid_sample's coordinate normalisation (no half-voxel shift).
    torch.testing.assert_close(warp(image, zero), image, atol=1e-12, rtol=0)
    assert torch.equal(warp(image, zero, "nearest"), image)
    assert torch.equal(validity_mask(zero), torch.ones_like(image[:, :1]))
    # The reference's align_corners mismatch: a zero flow resamples (half a voxel towards the centre).
    shrunk = warp(image, zero, convention="reference")
    assert not torch.allclose(shrunk, image)
    n = torch.tensor(shape[2:], dtype=torch.float64)
    # Its sampling point for voxel p is p * n / (n - 1) - 0.5, which the loop warp reproduces as a flow.
    grid = torch.stack(torch.meshgrid(*[torch.arange(int(s), dtype=torch.float64) for s in shape[2:]], indexing="ij"))
    equivalent = grid * (n / (n - 1) - 1).view(-1, *[1] * (len(shape) - 2)) - 0.5
    torch.testing.assert_close(shrunk, loop_warp(image, equivalent[None].expand_as(zero), "bilinear"))


def test_bilinear_mask_is_fractional_at_the_border():
    flow = torch.zeros(1, 2, 5, 5)
    flow[:, 1] = 0.5  # half a voxel to the right: the last column samples half outside
    nearest, bilinear = validity_mask(flow, "nearest"), validity_mask(flow, "bilinear")
    assert torch.all(bilinear[..., -1] == 0.5) and torch.all(bilinear[..., :-1] == 1)
    assert set(nearest.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("shape,window", [((2, 1, 6, 7), 3), ((1, 2, 9, 8), 9), ((1, 1, 4, 5, 6), 3)])
@pytest.mark.parametrize("masked", [False, True])
def test_local_ncc_matches_loop(shape, window, masked):
    generator = torch.Generator().manual_seed(3)
    image, target = torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
    mask = (torch.rand((shape[0], 1, *shape[2:]), generator=generator) > 0.3).double() if masked else None
    assert_same(lambda i, j: local_ncc_loss(i, j, mask, window), lambda i, j: loop_ncc(i, j, mask, window), image, target)


def test_separable_box_sum_equals_the_grouped_conv():
    x = torch.rand(2, 3, 11, 12, 13, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(box_sum(x, 9), box_sum(x, 9, method="conv"))
    image, target = x[:, :1], x[:, 1:2]
    torch.testing.assert_close(local_ncc_loss(image, target), local_ncc_loss(image, target, method="conv"))


def test_ncc_of_an_image_with_itself_and_fp32():
    image = torch.rand(1, 1, 10, 11, 12, generator=torch.Generator().manual_seed(5))
    assert float(local_ncc_loss(image, image, torch.ones_like(image))) == pytest.approx(0.0, abs=1e-4)
    half = local_ncc_loss(image.half(), image.half())  # computed in fp32 from half-precision inputs
    assert half.dtype == torch.float32 and float(half) == pytest.approx(0.0, abs=1e-3)


def test_masked_cosine_matches_loop():
    generator = torch.Generator().manual_seed(6)
    a, b = torch.randn(2, 4, 3, 5, generator=generator), torch.randn(2, 4, 3, 5, generator=generator)
    mask = (torch.rand(2, 1, 3, 5, generator=generator) > 0.4).double()

    def reference(a, b):
        total = 0
        for n, y, x in itertools.product(range(2), range(3), range(5)):
            u, v = a[n, :, y, x], b[n, :, y, x]
            total = total + mask[n, 0, y, x] * (u @ v) / (u.norm() * v.norm())
        return 1 - total / mask.sum()

    assert_same(lambda a, b: masked_cosine_loss(a, b, mask), reference, a, b)
    assert float(masked_cosine_loss(a, a, mask)) == pytest.approx(0.0, abs=1e-12)


def test_gss_gradient_routing():
    """0.1 branch: gradient to both features, none to the flow; 1.0 branch: to the flow only."""
    generator = torch.Generator().manual_seed(7)
    f_a, f_b = torch.randn(1, 4, 6, 6, generator=generator), torch.randn(1, 4, 6, 6, generator=generator)
    flow = torch.randn(1, 2, 6, 6, generator=generator)
    mask = validity_mask(flow)
    for feature_weight, flow_weight in ((0.1, 0.0), (0.0, 1.0)):
        leaves = [t.clone().requires_grad_(True) for t in (f_a, f_b, flow)]
        loss = gss_loss(*leaves[:2], leaves[2], mask, feature_weight, flow_weight)
        ga, gb, gflow = torch.autograd.grad(loss, leaves, allow_unused=True, materialize_grads=True)
        if flow_weight == 0:
            assert ga.abs().sum() > 0 and gb.abs().sum() > 0 and gflow.abs().sum() == 0
        else:
            assert ga.abs().sum() == 0 and gb.abs().sum() == 0 and gflow.abs().sum() > 0
    # The weights are the reference's 0.1 and 1.0 and the branches add up.
    leaves = [t.clone().requires_grad_(True) for t in (f_a, f_b, flow)]
    expected = 0.1 * masked_cosine_loss(warp(f_a, flow), f_b, mask) + masked_cosine_loss(warp(f_a, flow), f_b, mask)
    torch.testing.assert_close(gss_loss(*leaves, mask), expected)


def test_flow_branch_reaches_the_backbone_through_the_flow():
    torch.manual_seed(0)
    options = GeminiNetworkOptions(spatial_dims=2, channels=(8, 8, 16, 16, 16), deformer_channels=(8, 8, 8, 8, 8))
    network = GeminiNetwork(options).double()
    a, b = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    f_a, f_b, flow_ab, _ = network(a, b)
    mask = validity_mask(flow_ab)
    backbone = list(network.unet.parameters())
    deformer = list(network.deformer.parameters())
    flow_only = gss_loss(f_a, f_b, flow_ab, mask, feature_weight=0.0, flow_weight=1.0)
    grads_flow = torch.autograd.grad(flow_only, backbone + deformer, retain_graph=True)
    assert all(g.abs().sum() > 0 for g in grads_flow[len(backbone):])
    assert sum(g.abs().sum() for g in grads_flow[: len(backbone)]) > 0  # via phi = D(f_a, f_b)
    feature_only = gss_loss(f_a, f_b, flow_ab, mask, feature_weight=0.1, flow_weight=0.0)
    grads_feature = torch.autograd.grad(feature_only, backbone + deformer, allow_unused=True, materialize_grads=True)
    assert all(g.abs().sum() == 0 for g in grads_feature[len(backbone):])
    assert sum(g.abs().sum() for g in grads_feature[: len(backbone)]) > 0


def test_correspondence_total_and_identity_terms():
    generator = torch.Generator().manual_seed(8)
    a, b = torch.rand(1, 1, 10, 10, 10, generator=generator), torch.rand(1, 1, 10, 10, 10, generator=generator)
    f_a, f_b = torch.randn(1, 4, 10, 10, 10, generator=generator), torch.randn(1, 4, 10, 10, 10, generator=generator)
    flow_ab, flow_ba = torch.randn(1, 3, 10, 10, 10, generator=generator), torch.randn(1, 3, 10, 10, 10, generator=generator)
    terms = correspondence_loss(a, b, f_a, f_b, flow_ab, flow_ba)
    m_ab, m_ba = validity_mask(flow_ab), validity_mask(flow_ba)
    smooth = smoothness_loss(flow_ab) + smoothness_loss(flow_ba)
    gss = gss_loss(f_a, f_b, flow_ab, m_ab) + gss_loss(f_b, f_a, flow_ba, m_ba)
    ncc = local_ncc_loss(warp(a, flow_ab), b, m_ab) + local_ncc_loss(warp(b, flow_ba), a, m_ba)
    torch.testing.assert_close(terms["loss"], 0.4 * smooth + 0.8 * gss + 1.0 * ncc)
    # Identical images and features under zero flows: every term vanishes.
    zero = torch.zeros_like(flow_ab)
    same = correspondence_loss(a, a, f_a, f_a, zero, zero)
    assert float(same["smooth"]) == 0.0 and float(same["gss"]) == pytest.approx(0.0, abs=1e-12)
    assert float(same["ncc"]) == pytest.approx(0.0, abs=1e-3)


def test_task_losses_match_the_reference_formulas():
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(2, 3, 4, 5, 6, generator=generator)
    labels = torch.randint(0, 3, (2, 4, 5, 6), generator=generator)
    one_hot = F.one_hot(labels, 3).movedim(-1, 1).double()

    def reference(z):
        p = torch.softmax(z, 1)
        ce = -(one_hot * torch.log(p + 1e-6)).sum() / one_hot.numel()
        dice = torch.stack([
            (2 * (one_hot[b, c] * p[b, c]).sum() + 1) / ((one_hot[b, c] ** 2).sum() + (p[b, c] ** 2).sum() + 1)
            for b in range(2) for c in range(3)
        ]).mean()
        return 100 * (ce + 1 - dice)

    assert_same(lambda z: segmentation_loss(z, one_hot), reference, logits)
    masks = (torch.rand(2, 3, 8, 8, generator=generator) > 0.5).double()
    logits_2d = torch.randn(2, 3, 8, 8, generator=generator)

    def reference_2d(z):
        p = torch.sigmoid(z)
        bce = -(masks * torch.log(p + 1e-6) + (1 - masks) * torch.log(1 - p + 1e-6)).sum() / masks.numel()
        return 100 * (bce + soft_dice_loss(p, masks))

    assert_same(lambda z: segmentation_loss(z, masks, "sigmoid"), reference_2d, logits_2d)
    assert float(cross_entropy_loss(one_hot, one_hot)) == pytest.approx(0.0, abs=1e-5)
    assert float(binary_cross_entropy_loss(masks, masks)) == pytest.approx(0.0, abs=1e-5)
    restored, target = torch.rand(1, 1, 4, 4, generator=generator), torch.rand(1, 1, 4, 4, generator=generator)
    torch.testing.assert_close(restoration_loss(restored, target), 100 * ((restored - target) ** 2).mean())
