"""CASA: shapes, the shared cross-attention layer, and gradient only on the student side."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accord.heads import EMATeacher
from accord_medssl.alice import CASA


def test_shapes_and_target_equals_the_shared_layer() -> None:
    torch.manual_seed(0)
    casa = CASA(dim=64, num_heads=8, hidden_dim=128).eval()
    queries, student_keys, teacher_keys = torch.randn(2, 4, 64), torch.randn(2, 32, 64), torch.randn(2, 32, 64)
    student_aligned, teacher_aligned = casa(queries, student_keys, teacher_keys)
    assert student_aligned.shape == teacher_aligned.shape == (2, 4, 64)
    torch.testing.assert_close(student_aligned, casa.cross_attend(queries, student_keys))
    torch.testing.assert_close(teacher_aligned, casa.cross_attend(queries, teacher_keys))


def test_gradient_reaches_student_and_casa_but_never_the_teacher() -> None:
    torch.manual_seed(0)
    student = nn.Linear(16, 32)
    teacher = EMATeacher(student)
    casa = CASA(dim=32, num_heads=4, hidden_dim=64)
    tokens = torch.randn(2, 12, 16)
    student_tokens = student(tokens)
    teacher_tokens = teacher(tokens)
    student_aligned, teacher_aligned = casa(student_tokens[:, :4], student_tokens, teacher_tokens)
    assert not teacher_aligned.requires_grad
    (student_aligned.square().mean() + teacher_aligned.square().mean()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is not None for p in casa.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_bad_inputs_raise() -> None:
    casa = CASA(dim=32, num_heads=4, hidden_dim=64)
    with pytest.raises(ValueError, match="queries"):
        casa(torch.randn(2, 4, 16), torch.randn(2, 8, 32), torch.randn(2, 8, 32))
    with pytest.raises(ValueError, match="student_keys"):
        casa(torch.randn(2, 4, 32), torch.randn(3, 8, 32), torch.randn(3, 8, 32))
    with pytest.raises(ValueError, match="teacher_keys"):
        casa(torch.randn(2, 4, 32), torch.randn(2, 8, 32), torch.randn(2, 9, 32))
    with pytest.raises(ValueError, match="num_heads"):
        CASA(dim=30, num_heads=4)
