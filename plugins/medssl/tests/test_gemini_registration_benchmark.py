"""The GEMINI registration benchmark on its three generated sets (3D phantom pairs, 2D chest X-rays,
the MNI152 template: real anatomy), and the MNI152 registration cases it generates."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from accord.benchmarking import benchmark_config, find_benchmark, run_benchmark
from accord_medssl.data.pairs import mni152_template, synth_mni152
from accord_medssl.gemini.benchmark import _mean_dice, _registration_sets
from accord_medssl.gemini.warp import warp

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_mni152_template_keeps_grey_and_white_matter_and_its_place(tmp_path):
    image, label, affine = mni152_template((24, 28, 24))
    assert image.shape == label.shape == (24, 28, 24) and 0 <= image.min() and image.max() <= 1
    counts = np.bincount(label.ravel(), minlength=3)
    assert counts[1] > 0.1 * counts[2] and counts[2] > 0.1 * counts[1]  # both tissues survive the resampling
    # The first and last voxel centres stay where nilearn's 2 mm grid has them.
    assert np.allclose(affine[:3, 3], [-98, -134, -72]) and np.allclose(affine @ [23, 27, 23, 1], [98, 98, 116, 1])
    root = synth_mni152(tmp_path / "mni", num_cases=2, shape=(24, 28, 24))
    flow = torch.from_numpy(nib.load(root / "flows" / "pair_001.nii.gz").get_fdata(dtype=np.float32)).movedim(-1, 0)
    case = nib.load(root / "labelsTr" / "pair_001.nii.gz").get_fdata()
    expected = warp(torch.from_numpy(label.astype(np.float32))[None, None], flow[None], "nearest")[0, 0]
    assert np.array_equal(case, expected.numpy()) and not np.array_equal(case, label)
    assert json.loads((root / "dataset.json").read_text())["labels"] == {
        "0": "background", "1": "grey matter", "2": "white matter"}


def test_mean_dice_of_mask_stacks():
    a = torch.zeros(3, 4, 4)
    b = torch.zeros(3, 4, 4)
    a[0, :2], b[0, :1] = 1, 1  # Dice 2 * 4 / (8 + 4)
    a[1], b[1] = 1, 1  # Dice 1; structure 2 absent from both: not counted
    assert _mean_dice(a, b) == pytest.approx((8 / 12 + 1) / 2)


def test_registration_benchmark_on_pairs_cxr_and_mni152(tmp_path, only_medssl):
    component = find_benchmark("medssl", "gemini_registration")
    cfg = benchmark_config(component, quick=True, out=tmp_path / "bench", options=[
        "seeds=[0]", "num_cases=2", "iterations=1", "shape=[16,16,8]", "cxr_size=16", "mni_shape=[12,16,12]",
        "shuffle_blocks=2"])
    result = run_benchmark(component, cfg)
    rows = result.tables[0].rows
    assert [row[:2] for row in rows] == [[name, variant] for name in ("pairs", "cxr", "mni152")
                                         for variant in ("ddf", "diffeomorphic")]
    for record in result.rows:
        assert 0 < record["dice_before"] <= 1 and 0 < record["dice_after"] <= 1
        assert 0 <= record["folding_percent"] <= 100 and record["inverse_consistency"] >= 0
    assert result.plots[0].name == "registration.png" and result.plots[0].stat().st_size > 0
    assert "mni152: 2 cases of 12x16x12" in result.notes[0]
    # --data: a chest X-ray folder (or an MSD dataset) is the one set scored, at the configured size.
    for name, size in (("cxr", (16, 16)), ("mni152", (16, 16, 8))):
        sets = _registration_sets(cfg.model_copy(update={"data": tmp_path / "bench" / "data" / name}))
        assert [(cases.name, cases.size) for cases in sets] == [(name, size)]
        assert sets[0].images[0].shape == (1, *size) and sets[0].labels[0].shape[1:] == size
