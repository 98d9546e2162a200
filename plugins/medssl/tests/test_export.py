"""``accord export --format monai``: Alice checkpoints to SwinUNETR weights that MONAI loads strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR
from safetensors import safe_open
from safetensors.torch import load_file

from accord.config import save_resolved
from accord.runs import run_record
from accord.training.checkpoint import build_checkpoint, capture_rng_state, checkpoint_path, save_checkpoint
from accord_medssl.anatomy import AnatomyEmbeddingPretraining
from accord_medssl.export import export_monai
from accord_medssl.weights import sidecar_path
from accord_medssl.finetune import FinetuneConfig, initial_network
from accord_medssl.tasks import AlicePretraining, PretrainConfig


def _pretraining_run(run_dir: Path, data: Path, model: torch.nn.Module, **config: object) -> Path:
    """A pretraining run directory as the pretrain task leaves it: config.yaml and one checkpoint that
    records its run."""
    cfg = PretrainConfig(plugin="medssl", task="pretrain", data=data, run_dir=run_dir, **config)
    save_resolved(cfg, run_dir)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = build_checkpoint(
        step=7, data_position={"epoch": 0, "batch": 0}, model=model, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0), rng=[capture_rng_state()],
        config=cfg.trainer.model_dump(mode="json"), run=run_record(cfg, f"medssl.{cfg.method}"),
    )
    return save_checkpoint(state, checkpoint_path(run_dir / "checkpoints", 7))


@pytest.fixture(scope="module")
def alice_checkpoint(
    msd_root: Path, tmp_path_factory: pytest.TempPathFactory, tiny_alice: dict
) -> tuple[Path, AlicePretraining]:
    torch.manual_seed(0)
    model = AlicePretraining(PretrainConfig(plugin="medssl", task="pretrain", data=msd_root, alice=tiny_alice).alice)
    with torch.no_grad():  # a teacher that differs from the student, as after training
        model.teacher.teacher.backbone.swin_unetr.swinViT.patch_embed.proj.weight.add_(1.0)
    run_dir = tmp_path_factory.mktemp("alice")
    checkpoint = _pretraining_run(run_dir, msd_root, model, method="alice", alice=tiny_alice, mining={"embeddings": run_dir})
    return checkpoint, model



def test_cli_export_loads_strictly_into_a_fresh_monai_swin_unetr(only_medssl, alice_checkpoint, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from accord.cli import app

    checkpoint, model = alice_checkpoint
    out = tmp_path / "alice.safetensors"
    result = CliRunner().invoke(app, ["export", str(checkpoint), "--format", "monai", "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads(sidecar_path(out).read_text())
    assert info["step"] == 7 and info["weights"] == "student"
    network = SwinUNETR(**info["swin_unetr_kwargs"])
    network.load_state_dict(load_file(out), strict=True)
    for name, value in model.student.backbone.swin_unetr.state_dict().items():
        torch.testing.assert_close(network.state_dict()[name], value)
    with safe_open(str(out), framework="pt") as handle:  # the file alone also carries the kwargs
        assert json.loads(handle.metadata()["swin_unetr_kwargs"]) == info["swin_unetr_kwargs"]


def test_export_to_pt_is_a_plain_state_dict_for_weights_only_loading(alice_checkpoint, tmp_path: Path) -> None:
    checkpoint, _ = alice_checkpoint
    out = export_monai(checkpoint, tmp_path / "alice.pt")
    kwargs = json.loads(sidecar_path(out).read_text())["swin_unetr_kwargs"]
    SwinUNETR(**kwargs).load_state_dict(torch.load(out, weights_only=True), strict=True)


def test_export_names_what_is_wrong_with_other_checkpoints(only_medssl, msd_root: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from accord.cli import app

    anatomy = _pretraining_run(tmp_path / "anatomy", msd_root, AnatomyEmbeddingPretraining(), method="anatomy_embedding")
    result = CliRunner().invoke(app, ["export", str(anatomy), "--format", "monai", "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 2
    assert f"error: {anatomy}: written by a medssl.pretrain run of method 'anatomy_embedding'" in result.output
    assert "expected a medssl.pretrain run of method 'alice'" in result.output
    state = torch.load(anatomy, weights_only=True)
    state.update(version=1, run=None)
    del state["digest"]
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="the checkpoint does not record its run config"):
        export_monai(tmp_path / "old.pt", tmp_path / "x.pt")


def test_a_moved_checkpoint_exports_without_its_run_folder(alice_checkpoint, tmp_path: Path) -> None:
    checkpoint, _ = alice_checkpoint
    alone = tmp_path / "alone.pt"
    alone.write_bytes(checkpoint.read_bytes())
    out = export_monai(alone, tmp_path / "alice.pt")
    assert json.loads(sidecar_path(out).read_text())["swin_unetr_kwargs"]["feature_size"] == 12


def test_finetuning_starts_from_the_pretrained_backbone(alice_checkpoint, msd_root: Path) -> None:
    checkpoint, model = alice_checkpoint
    cfg = FinetuneConfig(plugin="medssl", task="finetune", data=msd_root, checkpoint=checkpoint, crop_size=(32, 32, 32))
    network, backbone, provenance = initial_network(cfg, num_classes=7)
    assert backbone.feature_size == 12 and network.out.conv.conv.out_channels == 7  # architecture from the checkpoint
    assert provenance["initialisation"]["step"] == 7
    pretrained = model.student.backbone.swin_unetr.state_dict()
    for name, value in network.state_dict().items():
        if name.startswith("out."):
            assert value.shape[0] == 7
        else:
            torch.testing.assert_close(value, pretrained[name])
    teacher, _, _ = initial_network(cfg.model_copy(update={"pretrained_weights": "teacher"}), num_classes=7)
    torch.testing.assert_close(
        teacher.swinViT.patch_embed.proj.weight, model.teacher.teacher.backbone.swin_unetr.swinViT.patch_embed.proj.weight
    )


def test_a_run_without_a_method_is_described_without_one() -> None:
    from accord_medssl.weights import run_description

    assert run_description({"plugin": "core", "task": "pretrain", "config": {"seed": 0}}) == "a core.pretrain run"
    assert run_description({"plugin": "medssl", "task": "pretrain", "config": {"method": "alice"}}) == (
        "a medssl.pretrain run of method 'alice'")
