"""Image readers: PNG / JPEG through Pillow, DICOM through pydicom (modality LUT, window, MONOCHROME1)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

from accord_medrpg.data import ImageReadError, image_size, read_image, write_dicom, write_image


@pytest.fixture
def ramp() -> np.ndarray:
    return np.tile(np.linspace(0, 1, 40, dtype=np.float32), (30, 1))  # (H=30, W=40)


@pytest.mark.parametrize("monochrome1", [False, True])
@pytest.mark.parametrize("window", [None, (2000.0, 1500.0)])
def test_dicom_round_trip_is_bright_for_dense(tmp_path, ramp, monochrome1, window) -> None:
    path = write_dicom(tmp_path / "x.dcm", ramp, monochrome1=monochrome1, window=window)
    stored = pydicom.dcmread(path)
    assert stored.PhotometricInterpretation == ("MONOCHROME1" if monochrome1 else "MONOCHROME2")
    if monochrome1:  # stored inverted: the dense (bright) right edge has low stored values
        assert stored.pixel_array[0, -1] < stored.pixel_array[0, 0]
    np.testing.assert_allclose(read_image(path), ramp, atol=2e-3)
    assert image_size(path) == (40, 30)


@pytest.mark.parametrize("window", [None, (2000.0, 1500.0)])
def test_dicom_rescale_slope_and_intercept_are_applied(tmp_path, ramp, window) -> None:
    path = write_dicom(tmp_path / "x.dcm", ramp, window=window)
    dataset = pydicom.dcmread(path)
    dataset.RescaleSlope, dataset.RescaleIntercept = 2, -1000  # values become 2 * stored - 1000
    if window is not None:  # the same window on the rescaled values
        dataset.WindowCenter, dataset.WindowWidth = 2 * window[0] - 1000, 2 * window[1]
    dataset.save_as(path)
    np.testing.assert_allclose(read_image(path), ramp, atol=2e-3)


def test_png_jpeg_and_16_bit_png(tmp_path, ramp) -> None:
    np.testing.assert_allclose(read_image(write_image(tmp_path / "x.png", ramp)), ramp, atol=1 / 255)
    np.testing.assert_allclose(read_image(write_image(tmp_path / "x.jpg", ramp)), ramp, atol=0.02)
    Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "x16.png")
    np.testing.assert_allclose(read_image(tmp_path / "x16.png"), ramp, atol=1e-4)
    Image.fromarray(np.stack([np.round(ramp * 255).astype(np.uint8)] * 3, -1)).save(tmp_path / "rgb.png")
    assert read_image(tmp_path / "rgb.png").shape == (30, 40)


def test_missing_and_corrupt_files_name_the_file(tmp_path) -> None:
    with pytest.raises(ImageReadError, match="nope.png: image file not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageReadError, match="bad.jpg: unreadable image"):
        read_image(tmp_path / "bad.jpg")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 300)
    with pytest.raises(ImageReadError, match="bad.dcm: unreadable image"):
        read_image(tmp_path / "bad.dcm")
    with pytest.raises(ImageReadError, match="bad.dcm: unreadable image header"):
        image_size(tmp_path / "bad.dcm")


def test_large_jpeg_decodes_at_a_reduced_scale_that_keeps_min_size(tmp_path) -> None:
    image = np.tile(np.linspace(0, 1, 512, dtype=np.float32), (400, 1))
    path = write_image(tmp_path / "big.jpg", image)
    assert read_image(path, min_size=100).shape == (100, 128)  # 1/4 scale: both sides still >= 100
    assert read_image(path, min_size=300).shape == (400, 512)  # 1/2 would make 200 < 300
    assert read_image(write_image(tmp_path / "big.png", image), min_size=100).shape == (400, 512)
