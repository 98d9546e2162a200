"""DINO and iBOT losses against NumPy loop references written from the papers' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from accord.losses.distill import DINOLoss, IBOTPatchLoss


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _dino_reference(teacher, student, center, student_temp, teacher_temp, momentum):
    """DINO Algorithm 1: average H over cross-view pairs, then the centre EMA."""
    pair_losses = []
    for i, teacher_view in enumerate(teacher):
        teacher_probs = _softmax((teacher_view - center) / teacher_temp)
        for j, student_view in enumerate(student):
            if i == j:
                continue
            student_log_probs = _log_softmax(student_view / student_temp)
            per_sample = [-(teacher_probs[b] * student_log_probs[b]).sum() for b in range(len(teacher_view))]
            pair_losses.append(np.mean(per_sample))
    new_center = momentum * center + (1 - momentum) * np.concatenate(teacher).mean(axis=0)
    return np.mean(pair_losses), new_center


def _ibot_reference(teacher, student, mask, center, student_temp, teacher_temp, momentum):
    """iBOT Eq. 2: per-sample mean of token H over masked tokens (0 if none), mean over samples."""
    batch, tokens, _ = teacher.shape
    per_sample = []
    for b in range(batch):
        total, count = 0.0, 0
        for t in range(tokens):
            if mask is None or mask[b, t]:
                teacher_probs = _softmax((teacher[b, t] - center) / teacher_temp)
                total += -(teacher_probs * _log_softmax(student[b, t] / student_temp)).sum()
                count += 1
        per_sample.append(total / max(count, 1))
    new_center = momentum * center + (1 - momentum) * teacher.reshape(-1, teacher.shape[-1]).mean(axis=0)
    return np.mean(per_sample), new_center


@pytest.mark.parametrize(
    ("num_teacher", "num_student", "batch", "dim", "student_temp", "teacher_temp", "momentum"),
    [
        (2, 2, 3, 5, 0.1, 0.04, 0.9),
        (2, 4, 4, 7, 0.2, 0.07, 0.5),
        (1, 3, 2, 4, 1.0, 0.5, 0.0),
        (3, 5, 1, 3, 0.1, 0.01, 0.99),
    ],
)
def test_dino_matches_reference_over_steps(num_teacher, num_student, batch, dim, student_temp, teacher_temp, momentum):
    rng = np.random.default_rng(0)
    loss_fn = DINOLoss(
        dim, student_temperature=student_temp, teacher_temperature=teacher_temp, center_momentum=momentum
    )
    center = np.zeros(dim)
    for _ in range(3):
        teacher = [rng.normal(size=(batch, dim)) * 3 for _ in range(num_teacher)]
        student = [rng.normal(size=(batch, dim)) * 3 for _ in range(num_student)]
        expected, center = _dino_reference(teacher, student, center, student_temp, teacher_temp, momentum)
        loss = loss_fn([torch.tensor(v) for v in teacher], [torch.tensor(v) for v in student])
        assert loss.item() == pytest.approx(expected, rel=1e-6)  # centre buffer is fp32
        np.testing.assert_allclose(loss_fn.center.numpy(), center, rtol=1e-5, atol=1e-6)


def test_dino_teacher_temperature_warmup_follows_linear_schedule():
    rng = np.random.default_rng(1)
    loss_fn = DINOLoss(
        6, warmup_teacher_temperature=0.008, teacher_temperature=0.01, teacher_temperature_warmup_steps=30
    )
    assert loss_fn.teacher_temperature_at(0) == 0.008
    assert loss_fn.teacher_temperature_at(15) == pytest.approx(0.009)
    assert loss_fn.teacher_temperature_at(30) == 0.01
    assert loss_fn.teacher_temperature_at(100) == 0.01
    center = np.zeros(6)
    for step in (0, 10, 40):
        teacher = [rng.normal(size=(2, 6)) for _ in range(2)]
        student = [rng.normal(size=(2, 6)) for _ in range(3)]
        expected, center = _dino_reference(teacher, student, center, 0.1, loss_fn.teacher_temperature_at(step), 0.9)
        loss = loss_fn([torch.tensor(v) for v in teacher], [torch.tensor(v) for v in student], step=step)
        assert loss.item() == pytest.approx(expected, rel=1e-6)  # centre buffer is fp32
    with pytest.raises(ValueError, match="step"):
        loss_fn([torch.randn(2, 6)] * 2, [torch.randn(2, 6)] * 2)


def test_dino_stacked_views_equal_list_views():
    teacher, student = torch.randn(2, 3, 5), torch.randn(4, 3, 5)
    by_list = DINOLoss(5)(list(teacher), list(student))
    by_tensor = DINOLoss(5)(teacher, student)
    assert torch.equal(by_list, by_tensor)


def test_dino_uniform_teacher_and_student_give_log_out_dim():
    loss_fn = DINOLoss(16)
    loss = loss_fn(torch.full((2, 4, 16), 3.0), torch.zeros(5, 4, 16))
    assert loss.item() == pytest.approx(math.log(16), rel=1e-6)


def test_dino_gradcheck_and_teacher_gets_no_gradient():
    loss_fn = DINOLoss(4, teacher_temperature=0.3, student_temperature=0.2).eval()  # eval: fixed centre
    loss_fn.center.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    teacher = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    student = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: loss_fn(teacher, s), (student,))
    loss_fn(teacher, student).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_dino_centre_is_a_persistent_buffer_updated_only_in_training():
    loss_fn = DINOLoss(3, center_momentum=0.5)
    assert "center" in loss_fn.state_dict()
    teacher = torch.tensor([[[1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0]]])
    loss_fn.eval()(teacher, torch.randn(2, 1, 3))
    assert torch.equal(loss_fn.center, torch.zeros(3))
    loss_fn.train()(teacher, torch.randn(2, 1, 3))
    assert torch.allclose(loss_fn.center, torch.tensor([1.0, 1.0, 1.0]))
    restored = DINOLoss(3)
    restored.load_state_dict(loss_fn.state_dict())
    assert torch.equal(restored.center, loss_fn.center)


def test_dino_bf16_autocast_accumulates_in_fp32():
    teacher, student = torch.randn(2, 4, 32), torch.randn(3, 4, 32)
    teacher_bf16, student_bf16 = teacher.bfloat16(), student.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DINOLoss(32)(teacher_bf16, student_bf16)
    reference = DINOLoss(32)(teacher_bf16.float(), student_bf16.float())
    assert loss.dtype == torch.float32
    assert torch.equal(loss, reference)


@pytest.mark.parametrize(
    ("teacher", "student", "match"),
    [
        (torch.randn(2, 3, 4), torch.randn(2, 3, 5), "student_out.*out_dim=4"),
        (torch.randn(2, 3, 4), torch.randn(3, 2, 4), "student_out.*batch size 3"),
        (torch.randn(2, 3, 4), torch.randn(1, 3, 4), "student_out.*at least max"),
        (torch.randn(1, 3, 4), torch.randn(1, 3, 4), "student_out.*at least max"),
        (torch.randn(2, 0, 4), torch.randn(2, 0, 4), "teacher_out.*non-empty"),
        (torch.full((2, 3, 4), float("nan")), torch.randn(2, 3, 4), "teacher_out.*NaN"),
        (torch.randn(2, 3, 4), torch.full((2, 3, 4), float("inf")), "student_out.*NaN"),
        (torch.randn(3, 4), torch.randn(2, 3, 4), "teacher_out.*3-D"),
        ([], torch.randn(2, 3, 4), "teacher_out.*non-empty list"),
        ([torch.randn(3, 4), torch.randn(2, 4)], torch.randn(2, 3, 4), r"teacher_out\[1\].*shape"),
        (torch.randint(0, 3, (2, 3, 4)), torch.randn(2, 3, 4), "teacher_out.*floating"),
    ],
)
def test_dino_rejects_bad_input(teacher, student, match):
    with pytest.raises(ValueError, match=match):
        DINOLoss(4)(teacher, student)


@pytest.mark.parametrize("loss_cls", [DINOLoss, IBOTPatchLoss])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"student_temperature": 0.0}, "student_temperature"),
        ({"teacher_temperature": -0.1}, "teacher_temperature"),
        ({"warmup_teacher_temperature": 0.0, "teacher_temperature_warmup_steps": 3}, "warmup_teacher_temperature"),
        ({"warmup_teacher_temperature": 0.02}, "give both"),
        ({"teacher_temperature_warmup_steps": -1}, "teacher_temperature_warmup_steps"),
        ({"center_momentum": 1.5}, "center_momentum"),
        ({"out_dim": 0}, "out_dim"),
    ],
)
def test_distillation_losses_reject_bad_arguments(loss_cls, kwargs, match):
    kwargs = {"out_dim": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        loss_cls(**kwargs)


@pytest.mark.parametrize(
    ("batch", "tokens", "dim", "student_temp", "teacher_temp", "momentum", "use_mask"),
    [(2, 5, 6, 0.1, 0.04, 0.9, True), (3, 4, 3, 0.3, 0.1, 0.5, True), (2, 3, 4, 0.1, 0.01, 0.9, False)],
)
def test_ibot_matches_reference_over_steps(batch, tokens, dim, student_temp, teacher_temp, momentum, use_mask):
    rng = np.random.default_rng(2)
    loss_fn = IBOTPatchLoss(
        dim, student_temperature=student_temp, teacher_temperature=teacher_temp, center_momentum=momentum
    )
    center = np.zeros(dim)
    for _ in range(3):
        teacher = rng.normal(size=(batch, tokens, dim)) * 2
        student = rng.normal(size=(batch, tokens, dim)) * 2
        mask = rng.random((batch, tokens)) < 0.5 if use_mask else None
        if use_mask:
            mask[0] = False  # a sample without masked tokens contributes 0 but still counts
            mask[1, 0] = True
        expected, center = _ibot_reference(teacher, student, mask, center, student_temp, teacher_temp, momentum)
        loss = loss_fn(torch.tensor(teacher), torch.tensor(student), None if mask is None else torch.tensor(mask))
        assert loss.item() == pytest.approx(expected, rel=1e-6)  # centre buffer is fp32
        np.testing.assert_allclose(loss_fn.center.numpy(), center, rtol=1e-5, atol=1e-6)


def test_ibot_all_unmasked_batch_gives_zero_loss_attached_to_graph():
    student = torch.randn(2, 3, 4, requires_grad=True)
    loss = IBOTPatchLoss(4)(torch.randn(2, 3, 4), student, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_ibot_uniform_gives_log_out_dim_and_gradcheck():
    loss_fn = IBOTPatchLoss(8)
    assert loss_fn(torch.ones(2, 3, 8), torch.zeros(2, 3, 8)).item() == pytest.approx(math.log(8), rel=1e-6)
    loss_fn = IBOTPatchLoss(4, teacher_temperature=0.3).eval()
    teacher = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    student = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    assert torch.autograd.gradcheck(lambda s: loss_fn(teacher, s, mask), (student,))
    loss_fn(teacher, student, mask).backward()
    assert teacher.grad is None


@pytest.mark.parametrize(
    ("teacher", "student", "mask", "match"),
    [
        (torch.randn(2, 3, 4), torch.randn(2, 4, 4), None, "student_out.*teacher_out shape"),
        (torch.randn(2, 3, 5), torch.randn(2, 3, 5), None, "teacher_out.*out_dim=4"),
        (torch.randn(6, 4), torch.randn(6, 4), None, "teacher_out.*3-D"),
        (torch.randn(0, 3, 4), torch.randn(0, 3, 4), None, "teacher_out"),
        (torch.randn(2, 3, 4), torch.full((2, 3, 4), float("nan")), None, "student_out.*NaN"),
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), r"mask.*\(2, 3\)"),
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.ones(2, 3), "mask.*bool"),
    ],
)
def test_ibot_rejects_bad_input(teacher, student, mask, match):
    with pytest.raises(ValueError, match=match):
        IBOTPatchLoss(4)(teacher, student, mask)
