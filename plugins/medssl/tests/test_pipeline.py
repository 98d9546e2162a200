"""CT preprocessing (window, orientation, spacing, metadata) and the three cache modes."""

from __future__ import annotations

import logging
import os
import shutil
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from accord_medssl.data import build_dataset, decathlon_items, nifti_folder_items, preprocessing


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def test_window_maps_minus_125_to_0_and_225_to_1_and_clips(tmp_path: Path) -> None:
    hu = np.array([-1000, -125, 50, 225, 1000], dtype=np.int16).reshape(5, 1, 1) * np.ones((1, 2, 2), np.int16)
    item = {"image": _write(tmp_path / "ct.nii.gz", hu, np.eye(4))}
    image = preprocessing(with_label=False)(item)["image"]
    assert image.shape == (1, 5, 2, 2) and image.dtype == torch.float32
    assert torch.allclose(image[0, :, 0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_pipeline_reorients_to_ras_and_keeps_geometry_in_the_meta(msd_root: Path, phantom_spec) -> None:
    item = decathlon_items(msd_root)[0]
    out = preprocessing(hu_window=None)(item)
    image, label = out["image"], out["label"]
    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    assert torch.equal(image.affine, label.affine)
    assert torch.allclose(image.pixdim.float(), torch.tensor(phantom_spec.spacing))
    assert image.meta["filename_or_obj"] == item["image"]
    assert label.dtype == torch.uint8
    # The voxels were moved, not just relabelled: nibabel's canonical reorientation agrees.
    canonical = nib.as_closest_canonical(nib.load(item["image"]))
    assert np.array_equal(image[0].numpy(), np.asanyarray(canonical.dataobj).astype(np.float32))
    assert np.allclose(image.affine.numpy(), canonical.affine)


def test_spacing_resamples_to_the_expected_grid(msd_root: Path, phantom_spec) -> None:
    target = (3.0, 3.0, 4.0)
    out = preprocessing(spacing=target)(decathlon_items(msd_root)[0])
    expected = tuple(round(n * s / t) for n, s, t in zip(phantom_spec.shape, phantom_spec.spacing, target, strict=True))
    assert out["image"].shape[1:] == out["label"].shape[1:] == expected
    assert torch.allclose(out["image"].pixdim.float(), torch.tensor(target))
    # Nearest-neighbour labels stay label ids.
    assert set(out["label"].unique().tolist()) <= set(range(7))


def _forbid_nifti_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every NIfTI decode raise (the cache still stats the sources to see they are unchanged)."""

    def decode(*args, **kwargs):
        raise AssertionError("a NIfTI file was decoded")

    monkeypatch.setattr(LoadImage, "__call__", decode)


def test_disk_cache_second_pass_never_touches_the_nifti_files(
    msd_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = shutil.copytree(msd_root, tmp_path / "data")
    cache_dir = tmp_path / "cache"
    items = decathlon_items(data)
    cold = build_dataset(items, cache="disk", cache_dir=cache_dir)
    first = [cold[index] for index in range(len(items))]
    assert len(list(cache_dir.iterdir())) == len(items)
    _forbid_nifti_decoding(monkeypatch)
    dataset = build_dataset(items, cache="disk", cache_dir=cache_dir)
    for index, expected in enumerate(first):
        cached = dataset[index]
        assert torch.equal(cached["image"], expected["image"]) and torch.equal(cached["label"], expected["label"])
        assert torch.equal(cached["image"].affine, expected["image"].affine)


def test_disk_cache_serves_what_the_pipeline_computes(msd_root: Path, tmp_path: Path) -> None:
    items = decathlon_items(msd_root)[:1]
    plain = build_dataset(items, cache="none")[0]
    for dataset in (build_dataset(items, cache="disk", cache_dir=tmp_path),) * 2:  # cold, then warm
        cached = dataset[0]
        for key in ("image", "label"):
            assert torch.equal(cached[key], plain[key]) and cached[key].dtype == plain[key].dtype
            assert torch.equal(cached[key].affine, plain[key].affine)
            assert torch.equal(cached[key].pixdim, plain[key].pixdim)
            assert cached[key].meta["filename_or_obj"] == plain[key].meta["filename_or_obj"]
            assert np.array_equal(cached[key].meta["spatial_shape"], plain[key].meta["spatial_shape"])


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["edited", "copied with its mtime"])
def test_disk_cache_rereads_a_replaced_source_file(msd_root: Path, tmp_path: Path, keep_mtime: bool) -> None:
    source = nib.load(decathlon_items(msd_root)[0]["image"])
    voxels = np.asanyarray(source.dataobj)
    # Uncompressed, so that the replacement has the very same size.
    item = {"image": _write(tmp_path / "ct.nii", voxels, source.affine)}
    before = build_dataset([item], cache="disk", cache_dir=tmp_path / "cache")[0]["image"]
    stat = os.stat(item["image"])
    time.sleep(0.05)  # file times tick with the kernel's coarse clock (a few ms)
    _write(tmp_path / "ct.nii", np.ascontiguousarray(voxels[::-1]), source.affine)
    assert os.stat(item["image"]).st_size == stat.st_size
    if keep_mtime:  # cp -p, rsync -a: only the change time tells
        os.utime(item["image"], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = build_dataset([item], cache="disk", cache_dir=tmp_path / "cache")[0]["image"]
    assert torch.equal(after, torch.flip(before, dims=[1]))
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the entry was replaced, not added


class _PlantedPayload:
    """Pickles to a call that creates ``marker``: what an attacker would plant in a cache directory."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_planted_pickle_in_the_cache_is_never_executed(msd_root: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    items = decathlon_items(msd_root)[:1]
    cache_dir, marker = tmp_path / "cache", tmp_path / "code-ran"
    # A live payload: its pickle calls pathlib's touch when unpickled freely (checked without running it).
    torch.save({"volume": _PlantedPayload(marker)}, tmp_path / "probe.pt")
    with zipfile.ZipFile(tmp_path / "probe.pt") as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"pathlib" in pickled and b"touch" in pickled and not marker.exists()

    expected = build_dataset(items, cache="disk", cache_dir=cache_dir)[0]["image"]
    (entry,) = cache_dir.iterdir()
    for planted in (entry, cache_dir / "0123abcd.pt"):  # in place of the entry, and beside it
        shutil.copy(tmp_path / "probe.pt", planted)
    with caplog.at_level(logging.WARNING, logger="accord_medssl.data.pipeline"):
        served = build_dataset(items, cache="disk", cache_dir=cache_dir)[0]["image"]
    assert not marker.exists()
    assert torch.equal(served, expected)
    assert [record.getMessage().split(" (")[0] for record in _pipeline_records(caplog)] == [
        f"{entry}: not a valid disk-cache entry"
    ]


def test_a_corrupt_cache_entry_is_rebuilt_with_a_warning(msd_root: Path, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    items = decathlon_items(msd_root)[:1]
    expected = build_dataset(items, cache="disk", cache_dir=tmp_path)[0]["image"]
    (entry,) = tmp_path.iterdir()
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="accord_medssl.data.pipeline"):
        assert torch.equal(build_dataset(items, cache="disk", cache_dir=tmp_path)[0]["image"], expected)
    (warning,) = _pipeline_records(caplog)
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith(f"{entry}: not a valid disk-cache entry (")
    assert warning.getMessage().endswith("); rebuilding it")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="accord_medssl.data.pipeline"):
        build_dataset(items, cache="disk", cache_dir=tmp_path)[0]
    assert not _pipeline_records(caplog)  # rebuilt: read back without complaint


def _pipeline_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The pipeline's own log records (MONAI logs once per process when pydicom lacks a GPU decoder)."""
    return [record for record in caplog.records if record.name == "accord_medssl.data.pipeline"]


def test_disk_cache_keys_on_the_preprocessing_settings(msd_root: Path, tmp_path: Path) -> None:
    items = decathlon_items(msd_root)[:1]
    native = build_dataset(items, cache="disk", cache_dir=tmp_path)[0]
    coarse = build_dataset(items, cache="disk", cache_dir=tmp_path, spacing=(3.0, 3.0, 4.0))[0]
    assert len(list(tmp_path.iterdir())) == 2
    assert coarse["image"].shape != native["image"].shape


def test_memory_and_uncached_datasets_agree(msd_root: Path) -> None:
    items = decathlon_items(msd_root)[:2]
    memory = build_dataset(items, cache="memory")
    plain = build_dataset(items, cache="none")
    for index in range(len(items)):
        assert torch.equal(memory[index]["image"], plain[index]["image"])


def test_unlabeled_folder_items_and_augmentation(msd_root: Path) -> None:
    from monai.transforms import RandSpatialCropd

    items = nifti_folder_items(msd_root / "imagesTs")
    dataset = build_dataset(items, cache="memory", augment=[RandSpatialCropd("image", roi_size=(16, 16, 16))])
    sample = dataset[0]
    assert set(sample) == {"image"} and sample["image"].shape == (1, 16, 16, 16)


def test_build_dataset_rejects_bad_arguments(msd_root: Path) -> None:
    labelled = decathlon_items(msd_root)[:1]
    unlabelled = decathlon_items(msd_root, "test")
    with pytest.raises(ValueError, match="mix labelled and unlabelled"):
        build_dataset(labelled + unlabelled, cache="none")
    with pytest.raises(ValueError, match="needs cache_dir"):
        build_dataset(labelled, cache="disk")
    with pytest.raises(ValueError, match="cache must be"):
        build_dataset(labelled, cache="ram")


def _augmented(items: list[dict[str, str]], seed: int):
    from monai.transforms import RandFlipd, RandSpatialCropd

    augment = [RandSpatialCropd("image", roi_size=(8, 8, 8), random_size=False), RandFlipd("image", prob=0.5)]
    return build_dataset(items, cache="memory", augment=augment, seed=seed)


def test_augmentation_follows_the_global_numpy_stream_that_checkpoints_save(msd_root: Path) -> None:
    """In the main process the crops follow NumPy's global RNG (seeded from the run seed, saved in every
    checkpoint): same seed, same crops; a restored state continues them as a resumed run must."""
    item = nifti_folder_items(msd_root / "imagesTs")[0]
    dataset = _augmented([item], 0)

    def draws(count: int) -> list[torch.Tensor]:
        return [dataset[0]["image"].as_tensor() for _ in range(count)]

    np.random.seed(0)
    first = draws(4)
    np.random.seed(0)
    head = draws(2)
    saved = np.random.get_state()
    tail = draws(2)
    np.random.seed(1)
    other = draws(4)
    np.random.set_state(saved)
    resumed = draws(2)
    assert all(torch.equal(a, b) for a, b in zip(first, head + tail))
    assert all(torch.equal(a, b) for a, b in zip(tail, resumed))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert not all(torch.equal(first[0], later) for later in first[1:])  # each access draws anew


def test_dataloader_workers_and_epochs_draw_their_own_reproducible_augmentations(msd_root: Path) -> None:
    # Four copies of one volume: identical crops would mean identical random streams.
    dataset = _augmented(nifti_folder_items(msd_root / "imagesTs")[:1] * 4, seed=0)

    def two_epochs(loader_seed: int) -> list[list[torch.Tensor]]:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(loader_seed),
            collate_fn=lambda rows: rows[0]["image"].as_tensor(),
        )
        return [list(loader) for _ in range(2)]

    first, again = two_epochs(5), two_epochs(5)
    assert all(torch.equal(a, b) for epoch, rerun in zip(first, again) for a, b in zip(epoch, rerun))
    epoch_1, epoch_2 = first
    assert not torch.equal(epoch_1[0], epoch_1[1])  # indices 0 and 1 are read by different workers
    assert not all(torch.equal(a, b) for a, b in zip(epoch_1, epoch_2))
