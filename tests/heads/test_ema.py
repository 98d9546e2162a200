"""EMA teacher: update formula, frozen parameters, buffers copied, mode semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accord.heads.ema import EMATeacher
from accord.heads.mlp import DINOHead


def _student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def _perturb(module: nn.Module) -> None:
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param))
    module.train()(torch.randn(8, 3))  # moves the BatchNorm running statistics


def test_update_matches_hand_computation_and_copies_buffers():
    student = _student()
    ema = EMATeacher(student)
    before = {name: p.clone() for name, p in ema.teacher.named_parameters()}
    _perturb(student)
    ema.update(student, momentum=0.75)
    for name, param in student.named_parameters():
        expected = 0.75 * before[name] + 0.25 * param.detach()
        torch.testing.assert_close(dict(ema.teacher.named_parameters())[name], expected)
    for name, buffer in student.named_buffers():
        assert torch.equal(dict(ema.teacher.named_buffers())[name], buffer)


def test_momentum_one_keeps_teacher_and_zero_copies_student():
    student = _student()
    ema = EMATeacher(student)
    before = {name: p.clone() for name, p in ema.teacher.named_parameters()}
    _perturb(student)
    ema.update(student, momentum=1.0)
    for name, param in ema.teacher.named_parameters():
        assert torch.equal(param, before[name])
    ema.update(student, momentum=0.0)
    for (name, param), student_param in zip(ema.teacher.named_parameters(), student.parameters()):
        assert torch.equal(param, student_param), name


def test_teacher_is_frozen_detached_copy_and_follows_module_mode():
    student = _student()
    ema = EMATeacher(student)
    assert all(not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in student.parameters())
    assert all(t is not s for t, s in zip(ema.teacher.parameters(), student.parameters()))
    inputs = torch.randn(5, 3)
    # Train mode: BatchNorm uses the batch statistics, like the student's train-mode forward.
    out = ema(inputs)
    assert not out.requires_grad
    torch.testing.assert_close(out, student.train()(inputs).detach())
    # Eval mode: running statistics, which update() copies from the student.
    ema.update(student, momentum=1.0)
    ema.eval()
    assert not ema.teacher.training
    torch.testing.assert_close(ema(inputs), student.eval()(inputs).detach())
    assert any(name.startswith("teacher.") for name in ema.state_dict())


def test_ema_of_a_weight_normalised_dino_head():
    head = DINOHead(4, 6, 8, 3)
    ema = EMATeacher(head)
    with torch.no_grad():
        for param in head.parameters():
            if param.requires_grad:
                param.add_(1.0)
    ema.update(head, momentum=0.0)
    inputs = torch.randn(2, 4)
    torch.testing.assert_close(ema(inputs), head(inputs))


def test_rejects_bad_momentum_and_mismatched_student():
    ema = EMATeacher(_student())
    with pytest.raises(ValueError, match="momentum"):
        ema.update(_student(), momentum=1.5)
    with pytest.raises(ValueError, match="momentum"):
        ema.update(_student(), momentum=-0.1)
    with pytest.raises(ValueError, match="student: parameters differ"):
        ema.update(nn.Linear(3, 2), momentum=0.9)
    other = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match="student: parameter '0.weight' has shape"):
        ema.update(other, momentum=0.9)
    with pytest.raises(ValueError, match="student: expected an nn.Module"):
        EMATeacher("not a module")
