"""AliceModel: the trainer contract, loss composition, gradient routing and the EMA teacher."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from accord_medssl.alice import AliceModel, AliceOptions

TINY_BACKBONE = {
    "feature_size": 12,
    "depths": (1, 1, 1, 1),
    "num_heads": (1, 2, 4, 8),
    "window_size": 4,
    "norm_name": "batch",
}


def tiny_options(**overrides: object) -> AliceOptions:
    sizes = {
        "out_dim": 32,
        "head_hidden_dim": 32,
        "head_bottleneck_dim": 16,
        "casa_hidden_dim": 32,
        "casa_num_heads": 4,
    }
    return AliceOptions(backbone=TINY_BACKBONE, **{**sizes, **overrides})


def view_pair(batch_size: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "query": torch.rand(batch_size, 1, 32, 32, 32, generator=generator),
        "anchor": torch.rand(batch_size, 1, 32, 32, 32, generator=generator),
    }


def test_forward_backward_batch_two() -> None:
    torch.manual_seed(0)
    model = AliceModel(tiny_options())
    terms = model(view_pair())
    assert set(terms) == {"loss", "dino", "token", "reconstruction"}
    assert all(value.ndim == 0 and torch.isfinite(value) for value in terms.values())
    # The reference's weights: 1, 1 and 10 / 2.
    torch.testing.assert_close(terms["loss"], terms["dino"] + terms["token"] + 5 * terms["reconstruction"])
    terms["loss"].backward()
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert not any(name.startswith("teacher.") for name, _ in trainable)
    assert all(p.grad is None for p in model.teacher.parameters())
    # Both centres moved away from zero in training mode.
    assert model.dino_loss.center.abs().sum() > 0 and model.token_loss.center.abs().sum() > 0


def test_masked_token_loss_and_full_reconstruction_options() -> None:
    torch.manual_seed(1)
    model = AliceModel(tiny_options(token_loss_tokens="masked", reconstruction_voxels="all", mask_block_size=8))
    model.eval()
    with torch.no_grad():
        terms = model(view_pair(batch_size=1))
    assert all(torch.isfinite(value) for value in terms.values())
    assert model.dino_loss.center.abs().sum() == 0  # eval mode leaves the centres alone


def test_momentum_update_moves_the_teacher_towards_the_student() -> None:
    torch.manual_seed(0)
    model = AliceModel(tiny_options())
    with torch.no_grad():
        for parameter in model.student.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.01)
    name = "backbone.swin_unetr.swinViT.patch_embed.proj.weight"
    student = dict(model.student.named_parameters())[name].detach().clone()
    teacher_before = dict(model.teacher.teacher.named_parameters())[name].detach().clone()
    model.momentum_update(0.9)
    teacher_after = dict(model.teacher.teacher.named_parameters())[name]
    torch.testing.assert_close(teacher_after, 0.9 * teacher_before + 0.1 * student)
    assert (teacher_after - student).norm() < (teacher_before - student).norm()
    assert int(model.optimizer_steps) == 1


def test_teacher_temperature_warms_up_with_the_optimizer_steps() -> None:
    model = AliceModel(tiny_options(teacher_temperature_warmup_steps=2))
    assert model.dino_loss.teacher_temperature_at(int(model.optimizer_steps)) == pytest.approx(0.008)
    model.momentum_update(0.996)
    assert model.token_loss.teacher_temperature_at(int(model.optimizer_steps)) == pytest.approx(0.009)
    model.momentum_update(0.996)
    assert model.dino_loss.teacher_temperature_at(int(model.optimizer_steps)) == pytest.approx(0.01)


def test_bad_batches_and_options_raise() -> None:
    model = AliceModel(tiny_options())
    with pytest.raises(ValueError, match="batch"):
        model({"query": torch.rand(2, 1, 32, 32, 32)})
    with pytest.raises(ValueError, match=r"batch\['anchor'\]"):
        model({"query": torch.rand(2, 1, 32, 32, 32), "anchor": torch.rand(1, 1, 32, 32, 32)})
    with pytest.raises(ValueError, match=r"batch\['query'\]"):
        model({"query": torch.rand(1, 32, 32, 32), "anchor": torch.rand(1, 32, 32, 32)})
    with pytest.raises(ValidationError, match="casa_num_heads"):
        tiny_options(casa_num_heads=5)
    with pytest.raises(ValidationError, match="unknown_option"):
        AliceOptions(unknown_option=1)
