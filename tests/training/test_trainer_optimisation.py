"""DINO-style optimisation options of the trainer: decay exemptions and schedule, clipping, freezing."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from accord.config import ConfigError, TrainerConfig, validate_config
from accord.training import CheckpointError, Trainer, learning_rate_at, load_checkpoint, weight_decay_at
from accord.training.optim import clip_gradients, parameter_groups

_spec = importlib.util.spec_from_file_location("toy_train", Path(__file__).with_name("toy_train.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)

#: Every option on: the toy student's output layer (``student.3``) is the "last layer".
DINO_OPTIONS = {
    "weight_decay": 0.04,
    "weight_decay_end": 0.4,
    "weight_decay_exempt_1d": True,
    "grad_clip_norm": 0.3,
    "grad_clip_mode": "per_tensor",
    "freeze_parameters": {"pattern": r"^student\.3\.", "steps": 6},
}


def _fit(run_dir: Path, model: nn.Module | None = None, dataset=None, **overrides: object) -> nn.Module:
    torch.manual_seed(1234)
    model = model or toy.ToyModel()
    Trainer(toy.toy_config(**overrides), run_dir, seed=0).fit(model, dataset or toy.ToyDataset())
    return model


def _checkpoint(run_dir: Path, step: int) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.pt")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class _LinearLoss(nn.Module):
    """``loss = sum_i <coefficient_i, parameter_i>``, so every gradient is its fixed coefficient."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
        generator = torch.Generator().manual_seed(0)
        self.coefficients = [torch.randn(p.shape, generator=generator) for p in self.net.parameters()]

    def forward(self, batch: object) -> dict[str, torch.Tensor]:
        return {"loss": sum((p * c).sum() for p, c in zip(self.net.parameters(), self.coefficients))}


def test_parameter_groups_put_biases_and_1d_parameters_in_an_undecayed_group() -> None:
    model = _LinearLoss()
    names = {id(p): name for name, p in model.named_parameters()}
    [everything] = parameter_groups(model, TrainerConfig())
    assert [names[id(p)] for p in everything["params"]] == list(dict(model.named_parameters()))
    decayed, exempt = parameter_groups(model, TrainerConfig(weight_decay_exempt_1d=True))
    assert [names[id(p)] for p in decayed["params"]] == ["net.0.weight", "net.2.weight"]
    assert [names[id(p)] for p in exempt["params"]] == ["net.0.bias", "net.1.weight", "net.1.bias"]
    assert "weight_decay" not in decayed and exempt["weight_decay"] == 0.0
    # A frozen teacher stays out of both groups.
    teacher_student = toy.ToyModel()
    toy_groups = parameter_groups(teacher_student, toy.toy_config(weight_decay_exempt_1d=True))
    assert {id(p) for g in toy_groups for p in g["params"]} == {id(p) for p in teacher_student.student.parameters()}


@pytest.mark.parametrize("exempt", [True, False])
def test_one_adamw_step_decays_exactly_the_non_exempt_parameters(tmp_path: Path, exempt: bool) -> None:
    lr, weight_decay = 0.1, 0.5
    model = _LinearLoss()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = TrainerConfig(max_steps=1, batch_size=2, lr=lr, weight_decay=weight_decay, schedule="constant",
                           weight_decay_exempt_1d=exempt, device="cpu")
    Trainer(config, tmp_path, seed=0).fit(model, torch.utils.data.TensorDataset(torch.zeros(4, 1)))
    for (name, p), gradient in zip(model.named_parameters(), model.coefficients):
        decay = 0.0 if exempt and name in {"net.0.bias", "net.1.weight", "net.1.bias"} else weight_decay
        # AdamW's first step: bias-corrected moments are g and g^2, so the update is g / (|g| + eps).
        expected = before[name] * (1 - lr * decay) - lr * gradient / (gradient.abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)


def test_weight_decay_follows_a_cosine_over_the_run_and_is_logged(tmp_path: Path) -> None:
    config = toy.toy_config(max_steps=9, **DINO_OPTIONS)
    start, end, last = 0.04, 0.4, 8

    def cosine(step: int) -> float:
        return end + (start - end) * (1 + math.cos(math.pi * step / last)) / 2

    assert weight_decay_at(0, config) == start and weight_decay_at(last, config) == end
    assert weight_decay_at(4, config) == pytest.approx(cosine(4)) == pytest.approx(0.22)
    assert weight_decay_at(20, config) == end
    assert [weight_decay_at(s, toy.toy_config(weight_decay=0.1)) for s in (0, 5, 11)] == [0.1] * 3

    _fit(tmp_path, max_steps=9, **{**DINO_OPTIONS, "freeze_parameters": None})
    assert [r["weight_decay"] for r in _metrics(tmp_path)] == pytest.approx([cosine(s) for s in range(9)])
    decayed, exempt = _checkpoint(tmp_path, 9)["optimizer"]["param_groups"]
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (end, 0.0)


def test_per_tensor_clipping_matches_a_plain_loop_and_differs_from_global(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    parameters = [nn.Parameter(torch.zeros(shape)) for shape in [(4, 3), (3,), (2, 2, 2), (5,)]]
    gradients = [torch.randn(p.shape, generator=generator) * scale for p, scale in zip(parameters, [5, 0.1, 2, 0.01])]
    expected = [g.clone() for g in gradients]
    for gradient in expected:  # DINO's clip_gradients
        coefficient = 1.0 / (gradient.norm(2) + 1e-6)
        if coefficient < 1:
            gradient.mul_(coefficient)
    for parameter, gradient in zip(parameters, gradients):
        parameter.grad = gradient.clone()
    clip_gradients(parameters, 1.0, "per_tensor")
    for parameter, reference in zip(parameters, expected):
        torch.testing.assert_close(parameter.grad, reference, rtol=1e-6, atol=0)
    assert sum(torch.equal(p.grad, g) for p, g in zip(parameters, gradients)) == 2  # the small ones

    for parameter, gradient in zip(parameters, gradients):
        parameter.grad = gradient.clone()
    clip_gradients(parameters, 1.0, "global")
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in parameters])) == pytest.approx(1.0)

    per_tensor = _fit(tmp_path / "per_tensor", max_steps=3, grad_clip_norm=0.05, grad_clip_mode="per_tensor")
    global_norm = _fit(tmp_path / "global", max_steps=3, grad_clip_norm=0.05)
    assert not torch.equal(per_tensor.student[0].weight, global_norm.student[0].weight)


def test_frozen_parameters_stay_fixed_for_their_steps_then_train(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    initial = {k: v.clone() for k, v in toy.ToyModel().state_dict().items()}
    freeze = {"pattern": r"^student\.3\.", "steps": 3}
    _fit(tmp_path, max_steps=5, warmup_steps=0, weight_decay=0.1, freeze_parameters=freeze,
         checkpoint_every=1, keep_last=5)
    states = {step: _checkpoint(tmp_path, step) for step in range(1, 6)}
    for step in (1, 2, 3):
        model = states[step]["model"]
        assert torch.equal(model["student.3.weight"], initial["student.3.weight"]), step
        assert torch.equal(model["student.3.bias"], initial["student.3.bias"]), step
        assert not torch.equal(model["student.0.weight"], initial["student.0.weight"]), step
    assert not torch.equal(states[4]["model"]["student.3.weight"], initial["student.3.weight"])
    assert not torch.equal(states[4]["model"]["student.3.bias"], initial["student.3.bias"])
    # Skipped by the optimizer (no gradient), they have no Adam moments until they are released.
    assert sorted(states[3]["optimizer"]["state"]) == [0, 1] and sorted(states[4]["optimizer"]["state"]) == [0, 1, 2, 3]


def test_freeze_pattern_must_compile_and_match_a_trainable_parameter(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as bad_regex:
        validate_config(TrainerConfig, {"freeze_parameters": {"pattern": "last_layer(", "steps": 2}}, "cfg.yaml")
    assert bad_regex.value.lines == [
        "cfg.yaml: freeze_parameters.pattern: not a valid regular expression: missing ), unterminated subpattern "
        "at position 10 (got 'last_layer(')"
    ]
    with pytest.raises(ConfigError, match=r"freeze_parameters.steps: Input should be greater than or equal to 1"):
        validate_config(TrainerConfig, {"freeze_parameters": {"pattern": "x", "steps": 0}}, "cfg.yaml")
    expected = r"pattern 'last_layer' matches no trainable parameter of ToyModel \(names look like: student.0.weight"
    with pytest.raises(ValueError, match=expected):
        _fit(tmp_path / "a", freeze_parameters={"pattern": "last_layer", "steps": 2})
    # The EMA teacher is not trained, so matching only its parameters is an error too.
    with pytest.raises(ValueError, match=r"pattern '\^teacher' matches no trainable parameter"):
        _fit(tmp_path / "b", freeze_parameters={"pattern": "^teacher", "steps": 2})


def test_resume_with_every_option_on_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"

    def run(run_dir: Path, **overrides: object) -> None:
        stochastic = toy.ToyModel(dropout=0.2)
        _fit(run_dir, stochastic, toy.ToyDataset(noise=0.1), **DINO_OPTIONS, **overrides)

    run(reference)
    # Step 4 is inside the 6 frozen steps: the resumed run must also release them at step 7.
    run(resumed, resume=reference / "checkpoints" / "step_00000004.pt")
    expected, actual = _checkpoint(reference, 12), _checkpoint(resumed, 12)
    for name, tensor in expected["model"].items():
        assert torch.equal(actual["model"][name], tensor), name
    assert actual["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    for index, state in expected["optimizer"]["state"].items():
        assert all(torch.equal(actual["optimizer"]["state"][index][k], v) for k, v in state.items()), index

    def history(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in ("time", "samples_per_s")} for r in _metrics(run_dir)]

    assert history(resumed) == history(reference)[4:]


def test_resuming_into_different_parameter_groups_is_a_clear_error(tmp_path: Path) -> None:
    _fit(tmp_path, max_steps=4)
    with pytest.raises(CheckpointError, match=r"step_00000004.pt: its optimizer state does not fit .*trainer.weight_decay_exempt_1d"):
        _fit(tmp_path, max_steps=8, weight_decay_exempt_1d=True)


def test_lr_multipliers_scale_the_step_of_matching_parameters_under_the_schedule(tmp_path: Path) -> None:
    lr, steps = 0.1, 3
    model = _LinearLoss()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = TrainerConfig(max_steps=steps, batch_size=2, lr=lr, min_lr=0.01, optimizer="sgd", sgd_momentum=0.0,
                           lr_multipliers={r"^net\.2\.": 10.0, r"\.bias$": 0.5}, device="cpu")
    Trainer(config, tmp_path, seed=0).fit(model, torch.utils.data.TensorDataset(torch.zeros(4, 1)))
    # Plain SGD on a linear loss: each parameter moves by -(sum of the scheduled lrs) * multiplier * gradient.
    scheduled = sum(learning_rate_at(step, config) for step in range(steps))
    assert scheduled < steps * lr  # the cosine does decay
    multipliers = {"net.0.weight": 1.0, "net.0.bias": 0.5, "net.1.weight": 1.0, "net.1.bias": 0.5, "net.2.weight": 10.0}
    for (name, p), gradient in zip(model.named_parameters(), model.coefficients):
        torch.testing.assert_close(p.detach(), before[name] - scheduled * multipliers[name] * gradient,
                                   rtol=1e-5, atol=1e-6, msg=name)
    # The logged lr is group 0's: the base rate.
    assert _metrics(tmp_path)[-1]["lr"] == pytest.approx(learning_rate_at(steps - 1, config))


def test_lr_multiplier_groups_combine_with_decay_exemptions() -> None:
    model = _LinearLoss()
    names = {id(p): name for name, p in model.named_parameters()}
    groups = parameter_groups(model, TrainerConfig(lr=1.0, weight_decay_exempt_1d=True, lr_multipliers={"^net\\.2": 3}))
    described = [(g["lr"], g.get("weight_decay"), [names[id(p)] for p in g["params"]]) for g in groups]
    assert described == [(1.0, None, ["net.0.weight"]), (1.0, 0.0, ["net.0.bias", "net.1.weight", "net.1.bias"]),
                         (3.0, None, ["net.2.weight"])]


def test_lr_multiplier_errors_name_the_pattern(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lr_multipliers: 'head\(': not a valid regular expression"):
        validate_config(TrainerConfig, {"lr_multipliers": {"head(": 2}}, "cfg.yaml")
    with pytest.raises(ConfigError, match=r"lr_multipliers: 'head': the learning-rate multiplier must be > 0"):
        validate_config(TrainerConfig, {"lr_multipliers": {"head": 0}}, "cfg.yaml")
    with pytest.raises(ValueError, match=r"trainer.lr_multipliers pattern '\^head' matches no trainable parameter"):
        parameter_groups(_LinearLoss(), TrainerConfig(lr_multipliers={"^head": 2}))


def test_step_schedule_drops_the_lr_like_torch_multisteplr() -> None:
    config = TrainerConfig(max_steps=10, lr=0.5, schedule="step", lr_drop_steps=[3, 6], lr_drop_factor=0.1)
    parameter = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([parameter], lr=0.5)
    reference = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 6], gamma=0.1)
    for step in range(10):
        assert learning_rate_at(step, config) == pytest.approx(optimizer.param_groups[0]["lr"]), step
        optimizer.step()
        reference.step()
    with pytest.raises(ValueError, match="lr_drop_steps is set but schedule is 'cosine'"):
        TrainerConfig(max_steps=10, lr_drop_steps=[3])
    with pytest.raises(ValueError, match="must be increasing positive step counts"):
        TrainerConfig(max_steps=10, schedule="step", lr_drop_steps=[6, 3])


@pytest.mark.parametrize("schedule", ["step", "cosine", "constant"])
def test_warmup_start_factor_rises_like_torch_linearlr(schedule: str) -> None:
    """Warm-up from lr/3 (mmcv's ``warmup_ratio``) equals torch's ``LinearLR(start_factor=1/3)``."""
    config = TrainerConfig(max_steps=12, lr=0.3, schedule=schedule, warmup_steps=4, warmup_start_factor=1 / 3,
                           **({"lr_drop_steps": [8]} if schedule == "step" else {}))
    parameter = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([parameter], lr=0.3)
    reference = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / 3, total_iters=4)
    for step in range(4):
        assert learning_rate_at(step, config) == pytest.approx(optimizer.param_groups[0]["lr"]), step
        optimizer.step()
        reference.step()
    assert learning_rate_at(4, config) == pytest.approx(0.3)
    assert learning_rate_at(0, config.model_copy(update={"warmup_start_factor": 0.0})) == 0.0


def test_trainer_for_epochs_counts_optimizer_steps_of_whole_batches() -> None:
    """10 samples, batch 2, 2 micro-batches per step: 5 micro-batches -> 2 steps per epoch."""
    from accord.training import trainer_for_epochs

    trainer = TrainerConfig(batch_size=2, grad_accum_steps=2, schedule="step")
    resolved, per_epoch = trainer_for_epochs(trainer, epochs=3, samples=10, lr_drop_epochs=[2])
    assert (per_epoch, resolved.max_steps, resolved.lr_drop_steps) == (2, 6, [4])
    assert trainer_for_epochs(trainer.model_copy(update={"grad_accum_steps": 1}), 3, 11)[0].max_steps == 15
    with pytest.raises(ValueError, match=r"train.jsonl: 3 training samples do not fill one batch of "
                                         r"trainer.batch_size=2 x grad_accum_steps=2"):
        trainer_for_epochs(trainer, 3, 3, source="train.jsonl")
    with pytest.raises(ValueError, match="not both"):
        trainer_for_epochs(trainer.model_copy(update={"lr_drop_steps": [3]}), 3, 10, lr_drop_epochs=[2])
