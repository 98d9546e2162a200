"""Real processes: SIGKILL mid-run then resume is bit-exact; 2-rank torchrun DDP matches one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from accord.training import load_checkpoint
from accord.training.checkpoint import list_checkpoints

TOY_SCRIPT = Path(__file__).with_name("toy_train.py")
MAX_STEPS = 24
RUN_ARGS = [f"max_steps={MAX_STEPS}", "checkpoint_every=3", "--stochastic"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(command: list[str], timeout: float = 120) -> None:
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"


def _toy(run_dir: Path, *args: str, launcher: tuple[str, ...] = (sys.executable,)) -> list[str]:
    return [*launcher, str(TOY_SCRIPT), str(run_dir), *args]


def _final(run_dir: Path, step: int = MAX_STEPS) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.pt")


def _loss_history(run_dir: Path) -> list[tuple[int, float, float, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["fit"], r["consistency"]) for r in records]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tmp_path: Path) -> None:
    reference, victim = tmp_path / "reference", tmp_path / "victim"
    _run(_toy(reference, *RUN_ARGS))

    # The per-step sleep keeps the victim busy long after its third checkpoint appears, so the kill
    # lands mid-training however slowly the poll loop runs.
    process = subprocess.Popen(
        _toy(victim, *RUN_ARGS, "--step-sleep", "0.1"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    try:
        while not any(step >= 9 for step, _ in list_checkpoints(victim / "checkpoints")):
            assert process.poll() is None, f"victim exited early:\n{process.stderr.read()}"
            assert time.monotonic() < deadline, "victim wrote no checkpoint past step 9 in 120 s"
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    killed_at = list_checkpoints(victim / "checkpoints")[-1][0]
    assert 9 <= killed_at < MAX_STEPS

    _run(_toy(victim, *RUN_ARGS, "resume=auto"))

    expected, resumed = _final(reference), _final(victim)
    for name, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    for index, state in expected["optimizer"]["state"].items():
        assert all(torch.equal(resumed["optimizer"]["state"][index][k], v) for k, v in state.items())
    assert _loss_history(victim) == _loss_history(reference)


#: The DINO-style options (trainer overrides): frozen gradients are dropped after DDP's all-reduce.
DINO_ARGS = (
    "weight_decay=0.04",
    "weight_decay_end=0.4",
    "weight_decay_exempt_1d=true",
    "grad_clip_mode=per_tensor",
    r"freeze_parameters={pattern: '^student\.3\.', steps: 3}",
)


@pytest.mark.dist
@pytest.mark.parametrize("options", [(), DINO_ARGS], ids=["defaults", "dino_optimisation"])
def test_two_rank_torchrun_matches_a_single_process_on_the_same_global_batch(
    tmp_path: Path, options: tuple[str, ...]
) -> None:
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    _run(_toy(single, "batch_size=8", *options))
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone")
    # 8 = 2 ranks x 2 micro-batches x 2 samples: also exercises no_sync accumulation under DDP.
    _run(_toy(ddp, "batch_size=8", "grad_accum_steps=2", *options, launcher=torchrun), timeout=180)

    expected, distributed = _final(single, 12), _final(ddp, 12)
    assert distributed["world_size"] == 2 and len(distributed["rng"]) == 2
    for name, tensor in expected["model"].items():
        torch.testing.assert_close(distributed["model"][name], tensor, atol=1e-6, rtol=0, msg=name)
    assert [step for step, *_ in _loss_history(ddp)] == list(range(1, 13))  # rank 0 writes alone


@pytest.mark.dist
def test_two_rank_torchrun_validates_on_rank_zero_and_calls_back_on_every_rank(tmp_path: Path) -> None:
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone")
    _run(_toy(tmp_path, "batch_size=8", "validate_every=5", "--hooks", launcher=torchrun), timeout=180)

    events = [[json.loads(line) for line in (tmp_path / f"events_rank{rank}.jsonl").read_text().splitlines()]
              for rank in (0, 1)]
    assert [(event["hook"], event["step"]) for event in events[0]] == [
        ("train_start", 0), ("checkpoint", 4), ("validation", 5), ("step", 5), ("checkpoint", 8), ("validation", 10),
        ("step", 10), ("validation", 12), ("step", 12), ("checkpoint", 12), ("train_end", 12),
    ]
    assert events[1] == events[0]  # rank 1 sees rank 0's validation metrics
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    validations = [record for record in records if "val/mse" in record]
    assert [record["step"] for record in validations] == [5, 10, 12]
    assert [record["step"] for record in records if "probe/miou" in record] == [0, 6, 12]
    best = min(validations, key=lambda record: record["val/mse"])
    kept = json.loads((tmp_path / "best.pt.score.json").read_text())
    assert (kept["step"], kept["score"]) == (best["step"], pytest.approx(best["val/mse"]))
