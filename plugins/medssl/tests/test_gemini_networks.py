"""GEMINI networks, deformation measures, the diffeomorphic option and the two-steps-per-iteration model."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import Dataset

from accord.config import TrainerConfig
from accord.training import Trainer
from accord_medssl.data.pairs import random_smooth_flow
from accord_medssl.gemini import GeminiModel, GeminiNetwork, GeminiNetworkOptions, GeminiOptions
from accord_medssl.gemini.losses import correspondence_loss, restoration_loss
from accord_medssl.gemini.warp import folding_stats, inverse_consistency_error, jacobian_determinant

TINY = {"channels": (8, 8, 16, 16, 16), "deformer_channels": (8, 8, 8, 8, 8)}


# Small convolutions on a loaded machine run many times faster without OpenMP spinning.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_reference_sizes_and_parameter_counts():
    """medssl §2.3: 23.54 M backbone, 0.53 M deformer, 24.08 M in total (3D)."""
    network = GeminiNetwork()
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert round(count(network.unet) / 1e6, 2) == 23.54
    assert round(count(network.deformer) / 1e6, 2) == 0.53
    assert round(count(network) / 1e6, 2) == 24.08


@pytest.mark.parametrize("dims,shape", [(2, (2, 1, 19, 22)), (3, (1, 1, 9, 12, 10))])
def test_shapes_at_any_size_and_swapped_inputs(dims, shape):
    torch.manual_seed(0)
    network = GeminiNetwork(GeminiNetworkOptions(spatial_dims=dims, out_channels=3, **TINY)).eval()
    a, b = torch.rand(shape), torch.rand(shape)
    f_a, f_b, flow_ab, flow_ba = network(a, b)
    assert f_a.shape == (shape[0], 8, *shape[2:]) and flow_ab.shape == (shape[0], dims, *shape[2:])
    # Both flows from the same deformer with the inputs swapped.
    torch.testing.assert_close(flow_ba, network.deformer(f_b, f_a))
    torch.testing.assert_close(network.register(a, b), flow_ab)
    assert network.task(a).shape == (shape[0], 3, *shape[2:])


def test_zero_initialised_flow_is_the_identity():
    network = GeminiNetwork(GeminiNetworkOptions(spatial_dims=2, flow_init="zero", **TINY))
    a = torch.rand(1, 1, 16, 16)
    assert torch.equal(network.register(a, a), torch.zeros(1, 2, 16, 16))


def test_jacobian_determinant_matches_loop():
    flow = torch.randn(1, 2, 6, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    det = jacobian_determinant(flow)
    for y, x in itertools.product(range(1, 5), range(1, 6)):
        j = torch.eye(2, dtype=torch.float64)
        for i in range(2):
            j[i, 0] += (flow[0, i, y + 1, x] - flow[0, i, y - 1, x]) / 2
            j[i, 1] += (flow[0, i, y, x + 1] - flow[0, i, y, x - 1]) / 2
        assert float(det[0, y - 1, x - 1]) == pytest.approx(float(torch.linalg.det(j)))
    volume = torch.zeros(1, 3, 5, 5, 5)
    volume[:, 0] = torch.arange(5.0).view(5, 1, 1) * 0.5  # stretch axis 0 by 1.5
    torch.testing.assert_close(jacobian_determinant(volume), torch.full((1, 3, 3, 3), 1.5))


def test_diffeomorphic_integration_does_not_fold_where_the_ddf_does():
    velocity = random_smooth_flow((48, 48), torch.Generator().manual_seed(3), max_fraction=0.35)[None]
    assert folding_stats(velocity)["folding_percent"] > 1.0  # used directly as a displacement: folds
    network = GeminiNetwork(GeminiNetworkOptions(spatial_dims=2, diffeomorphic=True, **TINY))
    displacement = network.deformer.integrate(velocity)
    stats = folding_stats(displacement)
    assert stats["folding_percent"] == 0.0 and stats["min_jacobian"] > 0


def test_inverse_consistency_error():
    shift = torch.zeros(1, 3, 8, 8, 8)
    shift[:, 1] = 2.0
    assert float(inverse_consistency_error(shift, -shift)) == pytest.approx(0.0, abs=1e-6)
    assert float(inverse_consistency_error(shift, shift)) == pytest.approx(4.0, abs=1e-5)
    zero = torch.zeros(1, 2, 6, 6)
    assert float(inverse_consistency_error(zero, zero)) == 0.0


class _Samples(Dataset):
    """Fixed GEMINI-MIP samples; records the order in which the trainer reads them."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.items = [{key: torch.rand(1, 12, 12, generator=generator) for key in ("image_a", "image_b", "corrupted_a")}
                      for _ in range(3)]
        self.order: list[int] = []

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.order.append(index)
        return self.items[index]


@pytest.mark.parametrize("optimizer_steps", ["two", "combined"])
def test_trainer_steps_equal_the_reference_update_sequence(tmp_path, optimizer_steps):
    """``two``: L1 step then L2 step on one Adam, both on the same sample; ``combined``: one step on L1 + L2."""
    options = GeminiOptions(network=GeminiNetworkOptions(spatial_dims=2, **TINY),
                            loss={"optimizer_steps": optimizer_steps, "window": 5})
    iterations = 2
    steps = iterations * (2 if optimizer_steps == "two" else 1)
    torch.manual_seed(0)
    model = GeminiModel(options)
    torch.manual_seed(0)
    reference = GeminiModel(options).network
    samples = _Samples()
    config = TrainerConfig(max_steps=steps, batch_size=1, lr=1e-3, schedule="constant", checkpoint_every=steps,
                           log_every=1)
    result = Trainer(config, tmp_path, seed=0).fit(model, samples)
    assert {"correspondence", "task", "folding_percent", "inverse_consistency"} <= set(result)

    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3, weight_decay=0.0)
    per_iteration = 2 if optimizer_steps == "two" else 1
    for iteration in range(iterations):
        batch = {key: value[None] for key, value in samples.items[samples.order[iteration * per_iteration]].items()}

        def step1() -> torch.Tensor:
            f_a, f_b, flow_ab, flow_ba = reference(batch["image_a"], batch["image_b"])
            return correspondence_loss(batch["image_a"], batch["image_b"], f_a, f_b, flow_ab, flow_ba, window=5)["loss"]

        def step2() -> torch.Tensor:
            return restoration_loss(reference.task(batch["corrupted_a"]), batch["image_a"])

        losses = [step1, step2] if optimizer_steps == "two" else [lambda: step1() + step2()]
        for loss in losses:
            optimizer.zero_grad(set_to_none=True)
            loss().backward()
            optimizer.step()
    for (name, trained), expected in zip(model.network.named_parameters(), reference.parameters()):
        torch.testing.assert_close(trained, expected, atol=1e-6, rtol=1e-5, msg=name)
