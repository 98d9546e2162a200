"""GEMINI from the CLI on generated registration pairs, the corruption transforms, and a short
training run that improves the warped-label Dice."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from accord.cli import app
from accord_medssl.data.pairs import random_smooth_flow, synth_pairs
from accord_medssl.gemini import GeminiModel, GeminiOptions
from accord_medssl.gemini.corruption import (
    CorruptionOptions,
    RandBezierIntensity,
    RandInPaint,
    RandLocalPixelShuffle,
    RandOutPaint,
    genesis_corruption,
)
from accord_medssl.gemini.warp import warp

TINY_NETWORK = {"channels": [8, 8, 16, 16, 16], "deformer_channels": [8, 8, 8, 8, 8]}


# Small convolutions on a loaded machine run many times faster without OpenMP spinning.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pairs_synth_writes_consistent_flows(tmp_path):
    root = synth_pairs(tmp_path / "pairs", num_cases=2, shape=(16, 16, 12))
    template = np.asarray(nib.load(root / "template" / "label.nii.gz").dataobj)
    flow = np.asarray(nib.load(root / "flows" / "pair_001.nii.gz").dataobj)
    label = np.asarray(nib.load(root / "labelsTr" / "pair_001.nii.gz").dataobj)
    assert flow.shape == (16, 16, 12, 3) and np.abs(flow).max() > 0.5
    rebuilt = warp(torch.from_numpy(template.astype(np.float32))[None, None],
                   torch.from_numpy(flow).permute(3, 0, 1, 2)[None], "nearest")[0, 0]
    assert np.array_equal(rebuilt.numpy().astype(np.uint8), label)
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 2


def test_pretrain_and_register_from_the_cli(tmp_path, only_medssl):
    root = synth_pairs(tmp_path / "pairs", num_cases=2, shape=(16, 16, 12))
    config = tmp_path / "gemini.yaml"
    config.write_text(
        f"plugin: medssl\ntask: gemini_pretrain\nrun_dir: {tmp_path / 'run'}\ndata: {root}\nsize: [16, 16, 12]\n"
        f"gemini:\n  normalisation: ct_clip\n  network: {json.dumps(TINY_NETWORK)}\n"
        "  corruption: {shuffle_blocks: 20}\n  loss: {window: 5}\n"
        "trainer: {max_steps: 4, checkpoint_every: 4}\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == 4
    assert {"ncc", "gss", "smooth", "task", "folding_percent", "inverse_consistency"} <= set(records[-1])
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000004.pt"
    register = tmp_path / "register.yaml"
    register.write_text(
        f"plugin: medssl\ntask: register\nrun_dir: {tmp_path / 'reg'}\ncheckpoint: {checkpoint}\n"
        f"fixed: {root / 'imagesTr' / 'pair_000.nii.gz'}\nmoving: {root / 'imagesTr' / 'pair_001.nii.gz'}\n"
        f"moving_label: {root / 'labelsTr' / 'pair_001.nii.gz'}\nfixed_label: {root / 'labelsTr' / 'pair_000.nii.gz'}\n"
    )
    result = runner.invoke(app, ["run", str(register)])
    assert result.exit_code == 0, result.output
    outcome = json.loads((tmp_path / "reg" / "results.json").read_text())
    assert nib.load(outcome["flow"]).shape == (16, 16, 12, 3)
    assert nib.load(outcome["warped_label"]).shape == (16, 16, 12)
    assert set(outcome["dice_after"]) and set(outcome["dice_before"])
    assert 0 <= outcome["folding_percent"] <= 100
    # The backbone exports and loads strictly into GeminiUNet, giving the trained model's features.
    exported = tmp_path / "unet.safetensors"
    result = runner.invoke(app, ["export", str(checkpoint), "--format", "gemini_unet", "--out", str(exported)])
    assert result.exit_code == 0, result.output
    from accord.runs import load_run
    from accord_medssl.gemini.export import load_gemini_unet

    unet, info = load_gemini_unet(exported)
    assert info["step"] == 4 and info["kwargs"]["channels"] == TINY_NETWORK["channels"]
    image = torch.rand(1, 1, 16, 16, 12)
    torch.testing.assert_close(unet.eval()(image), load_run(checkpoint).model.network.unet(image))


def test_odd_steps_are_refused_with_two_optimizer_steps(tmp_path):
    from accord_medssl.gemini.tasks import GEMINI_TRAINER_DEFAULTS, GeminiPretrainConfig

    with pytest.raises(ValueError, match="trainer.max_steps is 3"):
        GeminiPretrainConfig(plugin="medssl", task="gemini_pretrain", data=tmp_path, size=(8, 8, 8),
                             trainer={**GEMINI_TRAINER_DEFAULTS, "max_steps": 3})


def test_a_few_dozen_steps_improve_the_warped_label_dice():
    """GEMINI's correspondence step alone aligns a deformed pair (2D, zero-initialised deformer)."""
    n = 24
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij"))
    label = ((grid**2).sum(0) < 0.35).float()[None, None]
    template = 0.4 * label + 0.05 * torch.sin(6 * grid[0])[None, None]
    generator = torch.Generator().manual_seed(0)
    flows = [random_smooth_flow((n, n), generator, 0.15)[None] for _ in range(2)]
    images = [warp(template, flow) for flow in flows]
    labels = [warp(label, flow, "nearest") for flow in flows]

    def dice(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(2 * (a * b).sum() / (a.sum() + b.sum()))

    torch.manual_seed(0)
    model = GeminiModel(GeminiOptions(network={"spatial_dims": 2, "flow_init": "zero", **TINY_NETWORK},
                                      loss={"optimizer_steps": "combined", "window": 5}))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = {"image_a": images[0], "image_b": images[1], "corrupted_a": images[0]}
    for _ in range(24):
        optimizer.zero_grad()
        model(batch)["correspondence"].backward()
        optimizer.step()
    with torch.no_grad():
        flow = model.network.register(images[0], images[1])
    assert dice(warp(labels[0], flow, "nearest"), labels[1]) > dice(labels[0], labels[1]) + 0.02


def test_corruption_transforms():
    image = torch.rand(1, 20, 20, 20, generator=torch.Generator().manual_seed(0))
    shuffle = RandLocalPixelShuffle(prob=1.0, num_blocks=200)
    shuffle.set_random_state(0)
    large = torch.rand(1, 40, 40, 40, generator=torch.Generator().manual_seed(0))  # blocks up to 2 voxels per axis
    shuffled = shuffle(large)
    assert not torch.equal(shuffled, large)
    assert torch.equal(shuffled.flatten().sort().values, large.flatten().sort().values)  # a permutation

    bezier = RandBezierIntensity(prob=1.0)
    bezier.set_random_state(1)
    mapped = bezier(image)
    order = image.flatten().argsort()
    assert torch.all(mapped.flatten()[order].diff() >= -1e-6)  # monotone
    assert 0 <= float(mapped.min()) and float(mapped.max()) <= 1

    inpaint = RandInPaint(continue_prob=1.0, max_boxes=5)
    inpaint.set_random_state(2)
    painted = inpaint(image)
    changed = (painted != image)[0]
    assert changed.any()
    assert not changed[:3].any() and not changed[-3:].any()  # at least 3 voxels from the border
    assert torch.equal(RandOutPaint(prob=0.0)(image), image)
    assert not torch.equal(RandOutPaint(prob=1.0)(image), image)

    corrupt = genesis_corruption(CorruptionOptions(shuffle_blocks=50))
    corrupt.set_random_state(seed=7)
    first = corrupt(image)
    corrupt.set_random_state(seed=7)
    assert torch.equal(corrupt(image), first)


def test_speed_measurements_on_tiny_inputs():
    from accord_medssl.gemini.benchmark import iteration_speed, ncc_speed

    ncc = ncc_speed(size=12, window=9, repeats=1, device="cpu")
    assert ncc["loss_difference"] < 1e-5 and ncc["separable"]["median_s"] > 0
    options = GeminiOptions(network={"spatial_dims": 2, **TINY_NETWORK}, corruption={"shuffle_blocks": 1})
    iteration = iteration_speed(2, size=16, batch_size=2, steps=1, options=options, device="cpu")
    assert iteration["shape"] == "2x1x16x16" and iteration["iteration"]["median_s"] > 0


def test_semisup_trains_and_scores_the_test_cases(tmp_path, msd_root):
    from accord.runs import run_task
    from accord_medssl.gemini.tasks import GEMINI_TRAINER_DEFAULTS, GeminiSemisupConfig

    cfg = GeminiSemisupConfig(
        plugin="medssl", task="semisup", run_dir=tmp_path / "semi", data=msd_root, size=(16, 16, 12),
        labelled_cases=1, gemini={"normalisation": "ct_clip", "network": TINY_NETWORK, "corruption": None,
                                  "loss": {"window": 5}},
        trainer={**GEMINI_TRAINER_DEFAULTS, "max_steps": 4, "checkpoint_every": 4})
    result = run_task(cfg)
    assert result["labelled_cases"] == 1 and result["test_cases"] == 1
    assert set(result["dice_per_class"]) == {"liver", "spleen", "kidney_right", "kidney_left", "spine", "aorta"}
    assert json.loads((tmp_path / "semi" / "results.json").read_text())["dice_per_class"] == result["dice_per_class"]
    assert result["task"] > 0 and "ncc" in result


@pytest.mark.parametrize("task", ["gemini_pretrain", "semisup"])
def test_gemini_tasks_rerun_and_resume_bit_exact(task, tmp_path, msd_root):
    from accord.testing.reruns import assert_reruns_are_bit_exact
    from accord_medssl.gemini.tasks import GEMINI_TRAINER_DEFAULTS, GeminiPretrainConfig, GeminiSemisupConfig

    gemini = {"normalisation": "ct_clip", "network": TINY_NETWORK, "loss": {"window": 5},
              "corruption": {"shuffle_blocks": 20} if task == "gemini_pretrain" else None}
    trainer = {**GEMINI_TRAINER_DEFAULTS, "max_steps": 8, "checkpoint_every": 4}
    extra = {"labelled_cases": 1} if task == "semisup" else {}
    config_class = GeminiPretrainConfig if task == "gemini_pretrain" else GeminiSemisupConfig
    assert_reruns_are_bit_exact(
        lambda run_dir: config_class(plugin="medssl", task=task, run_dir=run_dir, data=msd_root, size=(16, 16, 12),
                                     gemini=gemini, trainer=trainer, **extra),
        tmp_path)
