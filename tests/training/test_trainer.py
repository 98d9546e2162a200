"""In-process trainer behaviour: schedules, accumulation, resume rules, non-finite losses, logging."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

import pytest
import torch

from accord.training import (
    CheckpointError,
    NonFiniteLossError,
    Trainer,
    ema_momentum_at,
    learning_rate_at,
    load_checkpoint,
    micro_batch_size,
)
from accord.training.checkpoint import list_checkpoints
from accord.training.optim import build_optimizer

_spec = importlib.util.spec_from_file_location("toy_train", Path(__file__).with_name("toy_train.py"))
toy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toy)


def _fit(run_dir: Path, model: torch.nn.Module | None = None, **overrides: object) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(1234)
    model = model or toy.ToyModel()
    return model, Trainer(toy.toy_config(**overrides), run_dir, seed=0).fit(model, toy.ToyDataset())


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_warmup_cosine_and_constant_learning_rates_at_known_steps(tmp_path: Path) -> None:
    config = toy.toy_config(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    assert [learning_rate_at(s, config) for s in (0, 2, 4)] == [0.0, 0.5, 1.0]
    assert learning_rate_at(9, config) == pytest.approx(0.55)  # halfway through the cosine
    assert learning_rate_at(14, config) == 0.1
    constant = toy.toy_config(lr=1.0, warmup_steps=2, schedule="constant")
    assert [learning_rate_at(s, constant) for s in (0, 1, 2, 50)] == [0.0, 0.5, 1.0, 1.0]

    _fit(tmp_path, lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14, optimizer="sgd")
    logged = [record["lr"] for record in _metrics(tmp_path)]
    assert logged == pytest.approx([learning_rate_at(s, config) for s in range(14)])


def test_ema_momentum_follows_the_cosine_schedule(tmp_path: Path) -> None:
    model, _ = _fit(tmp_path / "ema", ema_momentum=0.9, ema_momentum_end=0.99, max_steps=6)
    config = toy.toy_config(ema_momentum=0.9, ema_momentum_end=0.99, max_steps=6)
    assert model.momenta == [ema_momentum_at(s, config) for s in range(6)]
    assert model.momenta[0] == 0.9 and model.momenta[-1] == 0.99
    assert model.momenta == sorted(model.momenta)
    without, _ = _fit(tmp_path / "none", ema_momentum=None, max_steps=3)
    assert without.momenta == []


def test_frozen_teacher_is_not_optimized() -> None:
    model = toy.ToyModel()
    optimizer = build_optimizer(model, toy.toy_config())
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.student.parameters()}


def test_grad_accumulation_matches_the_full_batch(tmp_path: Path) -> None:
    full, _ = _fit(tmp_path / "full", batch_size=8, grad_accum_steps=1)
    accumulated, _ = _fit(tmp_path / "accum", batch_size=8, grad_accum_steps=2)
    for a, b in zip(full.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_batch_size_must_split_over_ranks_and_micro_batches(tmp_path: Path) -> None:
    expected = "batch_size 30 is not divisible by world_size 4 x grad_accum_steps 2 = 8"
    with pytest.raises(ValueError, match=expected):
        micro_batch_size(30, 4, 2)
    with pytest.raises(ValueError, match="batch_size 9 is not divisible by world_size 1 x grad_accum_steps 2"):
        _fit(tmp_path, batch_size=9, grad_accum_steps=2)


def test_non_finite_loss_stops_without_touching_the_last_good_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(NonFiniteLossError, match=r"step 5: loss=nan, fit=nan, consistency=\d") as failed:
        _fit(tmp_path, toy.ToyModel(nan_from_call=5), checkpoint_every=1, keep_last=3)
    assert failed.value.step == 5 and math.isnan(failed.value.terms["fit"])
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 3, 4]
    last_good = tmp_path / "checkpoints" / "step_00000004.pt"
    before = last_good.read_bytes()

    # Resuming into the same divergence fails at the same step and leaves the file as it was.
    with pytest.raises(NonFiniteLossError, match="step 5:.*step_00000004.pt"):
        _fit(tmp_path, toy.ToyModel(nan_from_call=1), checkpoint_every=1, keep_last=3)
    assert last_good.read_bytes() == before
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [2, 3, 4]


def test_resume_skips_a_corrupt_newest_checkpoint_and_matches_an_uninterrupted_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    uninterrupted, _ = _fit(tmp_path / "reference")
    run_dir = tmp_path / "run"
    _fit(run_dir)  # checkpoints at 4, 8, 12
    newest = run_dir / "checkpoints" / "step_00000012.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    (run_dir / "checkpoints" / ".step_00000012.pt.99.tmp").write_bytes(b"torn write")
    with caplog.at_level(logging.WARNING):
        resumed, result = _fit(run_dir)
    assert "step_00000012.pt" in caplog.text
    assert resumed.forward_calls == 4  # steps 9..12 only
    assert _same_weights(resumed, uninterrupted)
    assert [r["step"] for r in _metrics(run_dir)] == list(range(1, 13))
    assert result["step"] == 12 and result["checkpoint"] == str(newest)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_00000004.pt",
        "step_00000008.pt",
        "step_00000012.pt",
    ]


def test_resume_from_an_explicit_path_and_never_refuses_existing_checkpoints(tmp_path: Path) -> None:
    uninterrupted, _ = _fit(tmp_path)
    resumed, _ = _fit(tmp_path, resume=tmp_path / "checkpoints" / "step_00000008.pt")
    assert resumed.forward_calls == 4 and _same_weights(resumed, uninterrupted)
    with pytest.raises(CheckpointError, match="resume is 'never' but .* already holds checkpoints"):
        _fit(tmp_path, resume="never")
    with pytest.raises(CheckpointError, match="not found"):
        _fit(tmp_path, resume=tmp_path / "nope.pt")


def test_metrics_lines_checkpoint_contents_and_loss_plot(tmp_path: Path) -> None:
    _, result = _fit(tmp_path, max_steps=7, log_every=2, checkpoint_every=3, keep_last=2)
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 6, 7]
    assert set(records[0]) == {"step", "lr", "loss", "fit", "consistency", "samples_per_s", "time"}
    assert result["step"] == 7 and result["loss"] == records[-1]["loss"]
    assert (tmp_path / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [6, 7]
    state = load_checkpoint(result["checkpoint"])
    assert state["step"] == 7 and state["data_position"] == {"epoch": 1, "batch": 2}  # 5 batches/epoch
    assert "teacher.0.weight" in state["model"] and state["config"]["max_steps"] == 7
    assert state["world_size"] == 1 and set(state["rng"][0]) == {"torch", "cuda", "numpy", "python"}


def test_a_finished_run_resumes_to_its_final_result_without_training(tmp_path: Path) -> None:
    trained, first = _fit(tmp_path, max_steps=5)
    again, second = _fit(tmp_path, max_steps=5)
    assert again.forward_calls == 0 and _same_weights(again, trained)
    assert second == first


def test_worker_processes_feed_the_same_batches(tmp_path: Path) -> None:
    in_process, _ = _fit(tmp_path / "main", max_steps=6)
    with_workers, _ = _fit(tmp_path / "workers", max_steps=6, num_workers=2)
    assert _same_weights(in_process, with_workers)


def test_bf16_autocast_runs_on_cpu(tmp_path: Path) -> None:
    _, result = _fit(tmp_path, precision="bf16", max_steps=3)
    assert math.isfinite(result["loss"])


def test_deterministic_mode_is_switched_on(tmp_path: Path) -> None:
    try:
        _fit(tmp_path, deterministic=True, max_steps=3)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_model_output_contract_is_checked(tmp_path: Path) -> None:
    class NoLoss(toy.ToyModel):
        def forward(self, batch):
            return {"fit": super().forward(batch)["fit"]}

    with pytest.raises(TypeError, match="including 'loss'"):
        _fit(tmp_path, NoLoss())


def test_missing_tensorboard_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes find_spec/import behave as if tensorboard were not installed.
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(RuntimeError, match=r"pip install 'accord\[tensorboard\]'"):
        _fit(tmp_path, tensorboard=True)


def test_tensorboard_events_are_written(tmp_path: Path) -> None:
    _fit(tmp_path, tensorboard=True, max_steps=3)
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
