"""The run contract: one seed per run applied by the platform, and self-describing checkpoints."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from accord.config import ConfigError, TrainerConfig, validate_config
from accord.runs import load_run, record_config, run_task
from accord.testing.reruns import assert_reruns_are_bit_exact
from accord.toy.data import synth_shapes
from accord.toy.tasks import FinetuneConfig, PretrainConfig
from accord.training import CheckpointError, Trainer, load_checkpoint
from accord.training.checkpoint import save_checkpoint
from accord.training.progress import read_metrics


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_shapes(tmp_path_factory.mktemp("data") / "shapes", per_class=4)


def _pretrain(shapes: Path, run_dir: Path, seed: int, steps: int = 3) -> PretrainConfig:
    trainer = TrainerConfig(max_steps=steps, batch_size=8, lr=1e-3, schedule="constant", checkpoint_every=steps,
                            log_every=1)
    return PretrainConfig(plugin="core", task="pretrain", run_dir=run_dir, data=shapes, seed=seed, trainer=trainer)


def _final_weights(result: dict) -> dict[str, torch.Tensor]:
    return load_checkpoint(result["checkpoint"])["model"]


def test_same_seed_is_bit_identical_and_another_seed_changes_init_and_data_order(shapes: Path, tmp_path: Path) -> None:
    first = run_task(_pretrain(shapes, tmp_path / "a", seed=5))
    again = run_task(_pretrain(shapes, tmp_path / "b", seed=5))
    other = run_task(_pretrain(shapes, tmp_path / "c", seed=6))
    for key, value in _final_weights(first).items():
        assert torch.equal(value, _final_weights(again)[key]), key
    assert [r["loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl")] == [
        r["loss"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")
    ]
    assert any(not torch.equal(v, _final_weights(other)[k]) for k, v in _final_weights(first).items())


def test_the_seed_alone_changes_the_batch_order(tmp_path: Path) -> None:
    """Same model init, same data: two run seeds draw different batches (the trainer's data order
    derives from the run seed, not from a second seed of its own)."""

    class RecordBatches(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[list[int]] = []

        def forward(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            self.seen.append(batch[0].tolist())
            return {"loss": self.weight * 0 + batch[0].float().mean()}

    orders = {}
    for seed in (0, 0, 1):
        model = RecordBatches()
        config = TrainerConfig(max_steps=4, batch_size=4, schedule="constant", checkpoint_every=100)
        Trainer(config, tmp_path / f"run{len(orders)}", seed=seed).fit(
            model, torch.utils.data.TensorDataset(torch.arange(32)))
        orders[len(orders)] = model.seen
    assert orders[0] == orders[1]
    assert orders[0] != orders[2]


def test_trainer_seed_is_refused_with_a_pointer_to_the_run_seed() -> None:
    with pytest.raises(ConfigError, match="trainer.seed was removed: set the run's top-level 'seed'"):
        validate_config(PretrainConfig, {"plugin": "core", "task": "pretrain", "data": ".", "trainer": {"seed": 3}},
                        source="pretrain.yaml")


def test_checkpoint_records_its_run(shapes: Path, tmp_path: Path) -> None:
    result = run_task(_pretrain(shapes, tmp_path / "run", seed=2))
    record = load_checkpoint(result["checkpoint"])["run"]
    assert record["plugin"] == "core" and record["task"] == "pretrain"
    assert record["model_factory"] == "core.simclr" and record["model_options"] == {}
    assert record["config"]["seed"] == 2 and record["config"]["trainer"]["max_steps"] == 3
    assert record["plugin_version"] and record["accord_version"]


def test_load_run_rebuilds_the_model_without_the_run_folder_or_the_data(shapes: Path, tmp_path: Path) -> None:
    data = shutil.copytree(shapes, tmp_path / "data")
    result = run_task(_pretrain(data, tmp_path / "run", seed=1))
    moved = tmp_path / "elsewhere.pt"
    shutil.copy(result["checkpoint"], moved)
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(data)
    loaded = load_run(moved)
    assert loaded.step == 3 and loaded.record["model_factory"] == "core.simclr"
    assert isinstance(loaded.config, PretrainConfig) and loaded.config.seed == 1
    trained = load_checkpoint(moved)["model"]
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert not loaded.model.training


def test_load_run_passes_model_options(shapes: Path, tmp_path: Path) -> None:
    trainer = TrainerConfig(max_steps=1, batch_size=4, schedule="constant")
    result = run_task(FinetuneConfig(plugin="core", task="finetune", run_dir=tmp_path, data=shapes, trainer=trainer))
    loaded = load_run(result["checkpoint"])
    assert loaded.record["model_options"] == {"num_classes": 4}
    assert loaded.model.head.out_features == 4


def test_checkpoint_without_a_run_record_is_a_clear_error(tmp_path: Path) -> None:
    config = TrainerConfig(max_steps=1, batch_size=2, schedule="constant")
    model = torch.nn.Linear(1, 1)

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = model

        def forward(self, batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
            return {"loss": self.layer(batch[0]).pow(2).mean()}

    result = Trainer(config, tmp_path, seed=0).fit(Wrapper(), torch.utils.data.TensorDataset(torch.ones(4, 1)))
    with pytest.raises(CheckpointError, match="does not describe its run"):
        load_run(result["checkpoint"])


def test_version_1_checkpoints_still_resume_but_do_not_describe_their_run(shapes: Path, tmp_path: Path) -> None:
    result = run_task(_pretrain(shapes, tmp_path / "run", seed=0))
    state = load_checkpoint(result["checkpoint"])
    state["version"] = 1
    del state["run"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    assert load_checkpoint(old)["run"] is None
    with pytest.raises(CheckpointError, match=f"{old}: the checkpoint does not describe its run"):
        load_run(old)


def test_load_run_names_an_uninstalled_plugin(shapes: Path, tmp_path: Path) -> None:
    result = run_task(_pretrain(shapes, tmp_path / "run", seed=0))
    state = load_checkpoint(result["checkpoint"])
    state["run"] = {**state["run"], "plugin": "notinstalled", "model_factory": "notinstalled.detector"}
    foreign = save_checkpoint(state, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match=f"{foreign}: plugin 'notinstalled' is not installed"):
        load_run(foreign)


def test_exported_safetensors_carry_the_run_record(shapes: Path, tmp_path: Path) -> None:
    from accord.training import export_weights, weights_metadata

    result = run_task(_pretrain(shapes, tmp_path / "run", seed=0))
    out = export_weights(result["checkpoint"], tmp_path / "w.safetensors")
    assert json.loads(weights_metadata(out)["run"])["model_factory"] == "core.simclr"


def test_a_corrupted_tensor_byte_is_detected_and_resume_falls_back(shapes: Path, tmp_path: Path) -> None:
    """A flipped byte inside a tensor's storage loads without complaint from torch's zip reader;
    the stored digest catches it, and resume takes the previous good checkpoint."""
    from accord.training.checkpoint import latest_valid_checkpoint, list_checkpoints

    cfg = _pretrain(shapes, tmp_path / "run", seed=0, steps=4).model_copy(
        update={"trainer": TrainerConfig(max_steps=4, batch_size=8, schedule="constant", checkpoint_every=2)})
    run_task(cfg)
    (_, older), (_, newest) = list_checkpoints(tmp_path / "run" / "checkpoints")
    state = torch.load(newest, weights_only=True)
    name = next(k for k, v in state["model"].items() if v.numel() > 8)
    raw = bytearray(newest.read_bytes())
    needle = state["model"][name].reshape(-1)[:4].numpy().tobytes()
    offset = raw.find(needle)
    assert offset > 0
    raw[offset] ^= 0xFF
    newest.write_bytes(bytes(raw))
    assert not torch.equal(torch.load(newest, weights_only=True)["model"][name], state["model"][name])
    with pytest.raises(CheckpointError, match=f"{newest}: corrupt checkpoint"):
        load_checkpoint(newest)
    path, _ = latest_valid_checkpoint(tmp_path / "run" / "checkpoints")
    assert path == older


def test_a_failed_run_with_another_config_keeps_the_record_of_the_existing_checkpoints(
    shapes: Path, tmp_path: Path
) -> None:
    run_task(_pretrain(shapes, tmp_path / "run", seed=5))
    record = (tmp_path / "run" / "config.yaml").read_text()
    changed = _pretrain(shapes, tmp_path / "run", seed=5)
    changed.trainer.resume = "never"  # fails before training: the run dir already holds checkpoints
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        run_task(changed)
    assert (tmp_path / "run" / "config.yaml").read_text() == record
    [aside] = (tmp_path / "run").glob("config.*.yaml")
    assert "resume: never" in aside.read_text()
    load_run(tmp_path / "run" / "checkpoints" / "step_00000003.pt")


def test_the_same_config_or_an_empty_run_dir_writes_config_yaml(shapes: Path, tmp_path: Path) -> None:
    cfg = _pretrain(shapes, tmp_path / "run", seed=5)
    assert record_config(cfg) == tmp_path / "run" / "config.yaml"  # no checkpoints yet
    run_task(cfg)
    assert record_config(cfg) == tmp_path / "run" / "config.yaml"  # identical config
    assert not list((tmp_path / "run").glob("config.*.yaml"))


def test_a_junk_file_among_the_checkpoints_is_skipped_with_a_warning_on_resume(
    shapes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_task(_pretrain(shapes, tmp_path / "run", seed=5))
    junk = tmp_path / "run" / "checkpoints" / "step_00000004.pt"
    junk.write_bytes(b"hello world\n")  # torch.load raises KeyError on it
    with caplog.at_level(logging.WARNING):
        result = run_task(_pretrain(shapes, tmp_path / "run", seed=5, steps=5))
    assert f"skipping checkpoint {junk}" in caplog.text and "not a checkpoint" in caplog.text
    assert load_checkpoint(result["checkpoint"])["step"] == 5


def test_resuming_into_a_changed_model_names_a_few_differing_entries(shapes: Path, tmp_path: Path) -> None:
    run_task(_pretrain(shapes, tmp_path / "run", seed=5))
    wider = _pretrain(shapes, tmp_path / "run", seed=5, steps=5)
    wider.model.width = 16
    with pytest.raises(CheckpointError) as caught:
        run_task(wider)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'run' / 'checkpoints' / 'step_00000003.pt'}: its weights do not fit")
    assert "of another shape" in message and "in the checkpoint" in message
    assert "\n" not in message and len(message) < 800


def test_toy_pretraining_reruns_and_resumes_bit_exact(shapes: Path, tmp_path: Path) -> None:
    def config(run_dir: Path) -> PretrainConfig:
        trainer = TrainerConfig(max_steps=4, batch_size=8, lr=1e-3, warmup_steps=1, checkpoint_every=2)
        return PretrainConfig(plugin="core", task="pretrain", run_dir=run_dir, data=shapes, seed=3, trainer=trainer)

    assert_reruns_are_bit_exact(config, tmp_path)
