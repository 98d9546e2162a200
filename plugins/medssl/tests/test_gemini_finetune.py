"""``finetune`` with ``network: gemini_unet``: GEMINI's backbone from a ``gemini_pretrain`` checkpoint
(strictly) or random init, from the CLI through ``evaluate``; the errors; bit-exact reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from accord.cli import app
from accord.config import load_config
from accord.runs import load_run, run_task
from accord.training.checkpoint import load_checkpoint, save_checkpoint
from accord_medssl.finetune import (
    GEMINI_SEGMENTATION_FORMAT,
    FinetuneConfig,
    GeminiSegmentationNetwork,
    build_segmentation_network,
    gemini_initial_network,
)
from accord_medssl.gemini.tasks import GEMINI_TRAINER_DEFAULTS, GeminiPretrainConfig

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "medssl"
TINY_CHANNELS = [8, 8, 16, 16, 16]
# Tiny network, 24 x 24 x 16 crops (and sliding windows), two steps validated at the end.
TINY_FINETUNE = ["cache=memory", "crop_size=[24,24,16]", "trainer.max_steps=2", "trainer.validate_every=2",
                 "trainer.checkpoint_every=2", "trainer.log_every=1"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pretrained(msd_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint of one GEMINI-MIP iteration (two steps) with the tiny backbone."""
    run_dir = tmp_path_factory.mktemp("gemini_pretrain")
    run_task(GeminiPretrainConfig(
        plugin="medssl", task="gemini_pretrain", run_dir=run_dir, data=msd_root, cache="memory", size=(24, 24, 16),
        gemini={"normalisation": "ct_clip", "network": {"channels": TINY_CHANNELS, "deformer_channels": [8] * 5},
                "corruption": {"shuffle_blocks": 20}, "loss": {"window": 5}},
        trainer={**GEMINI_TRAINER_DEFAULTS, "max_steps": 2, "checkpoint_every": 2}))
    return run_dir / "checkpoints" / "step_00000002.pt"


def _config(msd_root: Path, run_dir: Path, *overrides: str) -> FinetuneConfig:
    return load_config(CONFIGS / "finetune_gemini.yaml", [f"data={msd_root}", f"run_dir={run_dir}", *TINY_FINETUNE,
                                                          *overrides])


def test_finetune_and_evaluate_from_a_gemini_checkpoint_through_the_cli(only_medssl, msd_root: Path, pretrained: Path,
                                                                        tmp_path: Path) -> None:
    runner = CliRunner()
    tuned_dir = tmp_path / "tuned"
    result = runner.invoke(app, ["run", str(CONFIGS / "finetune_gemini.yaml"), f"data={msd_root}",
                                 f"run_dir={tuned_dir}", f"checkpoint={pretrained}", *TINY_FINETUNE])
    assert result.exit_code == 0, result.output
    weights = tuned_dir / "best.safetensors"
    network, info = build_segmentation_network(weights)
    assert isinstance(network, GeminiSegmentationNetwork) and info["format"] == GEMINI_SEGMENTATION_FORMAT
    assert info["gemini_kwargs"] == {"num_classes": 7, "in_channels": 1, "channels": TINY_CHANNELS}
    assert info["intensity"] == "ct_clip" and info["initialisation"]["task"] == "gemini_pretrain"
    assert info["initialisation"]["checkpoint"] == str(pretrained.absolute())
    # The run's checkpoints record the resolved architecture: load_run rebuilds the network without the pretraining.
    run = load_run(tuned_dir / "checkpoints" / "step_00000002.pt")
    assert run.config.gemini_unet.channels == tuple(TINY_CHANNELS) and run.config.intensity == "ct_clip"
    assert isinstance(run.model.network, GeminiSegmentationNetwork)

    evaluate_dir = tmp_path / "evaluate"
    result = runner.invoke(app, ["run", str(CONFIGS / "evaluate.yaml"), f"data={msd_root}", f"run_dir={evaluate_dir}",
                                 f"checkpoint={weights}", "cache=memory"])
    assert result.exit_code == 0, result.output
    scores = json.loads((evaluate_dir / "results.json").read_text())
    assert scores["cases"] == 1 and set(scores["dice_per_class"]) == {
        "liver", "spleen", "kidney_right", "kidney_left", "spine", "aorta"}
    assert 0.0 <= scores["dice"] <= 1.0


def test_the_backbone_starts_from_the_checkpoint_and_the_head_is_new(msd_root: Path, pretrained: Path,
                                                                     tmp_path: Path) -> None:
    cfg = _config(msd_root, tmp_path, f"checkpoint={pretrained}")
    network, options, intensity, initialisation = gemini_initial_network(cfg, num_classes=7)
    model_state = load_checkpoint(pretrained)["model"]
    unet = network.unet.state_dict()
    assert unet and all(torch.equal(value, model_state[f"network.unet.{key}"]) for key, value in unet.items())
    assert network.head.out_channels == 7 and options.channels == tuple(TINY_CHANNELS) and intensity == "ct_clip"
    assert initialisation["initialisation"]["step"] == 2
    # Random init: the reference widths unless set, ct_clip (GVSL's CT normalisation).
    scratch = _config(msd_root, tmp_path, "checkpoint=null")
    network, options, intensity, initialisation = gemini_initial_network(scratch, num_classes=3)
    assert options.channels == (32, 64, 128, 256, 512) and intensity == "ct_clip"
    assert initialisation == {"initialisation": {"checkpoint": None}}


def test_a_checkpoint_that_does_not_match_is_refused_naming_the_keys(msd_root: Path, pretrained: Path,
                                                                     tmp_path: Path) -> None:
    wider = _config(msd_root, tmp_path, f"checkpoint={pretrained}", "gemini_unet={channels: [8, 8, 16, 16, 32]}")
    with pytest.raises(ValueError, match=rf"{pretrained}: its GEMINI backbone does not fit gemini_unet .*: shapes "
                                         r"\(checkpoint vs gemini_unet\) \['downs.3.convs.conv_0.conv.weight "
                                         r"\(16, 16, 3, 3, 3\) vs \(32, 16, 3, 3, 3\)'"):
        gemini_initial_network(wider, num_classes=7)
    state = load_checkpoint(pretrained)
    del state["model"]["network.unet.inc.conv_0.conv.weight"]
    state["model"]["network.unet.extra"] = torch.zeros(1)
    broken = tmp_path / "broken.pt"
    save_checkpoint(state, broken)
    with pytest.raises(ValueError, match=r"broken.pt: its GEMINI backbone does not fit .*: missing keys "
                                         r"\['inc.conv_0.conv.weight'\]; unexpected keys \['extra'\]$"):
        gemini_initial_network(_config(msd_root, tmp_path, f"checkpoint={broken}"), num_classes=7)


def test_checkpoints_of_other_runs_and_mixed_sections_are_refused(only_medssl, msd_root: Path, pretrained: Path,
                                                                  tmp_path: Path) -> None:
    tuned = run_task(_config(msd_root, tmp_path / "tuned", "checkpoint=null", "gemini_unet={channels: [8, 8, 8, 8, 8]}"))
    with pytest.raises(ValueError, match=r"written by a medssl.finetune run; network gemini_unet fine-tunes the backbone "
                                         r"of a medssl gemini_pretrain or semisup checkpoint"):
        gemini_initial_network(_config(msd_root, tmp_path, f"checkpoint={tuned['checkpoint']}"), num_classes=7)
    # A GEMINI checkpoint for the SwinUNETR is another method's.
    swin = load_config(CONFIGS / "finetune.yaml", [f"data={msd_root}", f"checkpoint={pretrained}"])
    with pytest.raises(ValueError, match="written by a medssl.gemini_pretrain run, expected a medssl.pretrain run"):
        run_task(swin.model_copy(update={"run_dir": tmp_path / "swin", "cache": "memory"}))
    with pytest.raises(ValueError, match="gemini_unet: set, but network is swin_unetr"):
        load_config(CONFIGS / "finetune.yaml", [f"data={msd_root}", "checkpoint=null",
                                                "gemini_unet={channels: [8, 8, 8, 8, 8]}"])
    with pytest.raises(ValueError, match="backbone: a SwinUNETR architecture, but network is gemini_unet"):
        _config(msd_root, tmp_path, "checkpoint=null", "backbone={feature_size: 12}")


@pytest.mark.slow
def test_gemini_finetune_reruns_and_resumes_bit_exact(msd_root: Path, pretrained: Path, tmp_path: Path) -> None:
    from accord.testing.reruns import assert_reruns_are_bit_exact

    assert_reruns_are_bit_exact(
        lambda run_dir: _config(msd_root, run_dir, f"checkpoint={pretrained}", "trainer.max_steps=4",
                                "trainer.validate_every=4", "trainer.checkpoint_every=2", "trainer.keep_last=2"),
        tmp_path)
