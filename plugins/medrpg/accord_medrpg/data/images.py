"""Chest X-ray image files: PNG / JPEG through Pillow, DICOM through pydicom.

Every reader returns a grey image as ``float32 (H, W)`` in ``[0, 1]``, bright = dense (bone, fluid),
the way a radiologist reads it. DICOMs go through the modality LUT (rescale slope / intercept),
then the VOI LUT or window centre / width from their tags, and MONOCHROME1 images (where high
values are dark) are inverted. The writers serve the sample-data generator: DICOMs are written as
MIMIC stores them (16-bit, with windowing tags), optionally as MONOCHROME1.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from accord.errors import UserError
from accord.utils.files import write_atomically

__all__ = [
    "DICOM_SUFFIXES",
    "ImageReadError",
    "image_size",
    "read_image",
    "write_dicom",
    "write_image",
]

DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageReadError(UserError):
    """An image file is missing or cannot be decoded; the message names the file."""


def _is_dicom(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES


def read_image(path: str | Path, *, min_size: int | None = None) -> np.ndarray:
    """Read a chest X-ray as ``float32 (H, W)`` in ``[0, 1]`` (bright = dense).

    Args:
        path: a PNG / JPEG (8- or 16-bit grey, or RGB, which is converted to grey) or a DICOM.
        min_size: a JPEG may then be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, several
            times faster on a 3000-pixel MIMIC radiograph) while both sides stay at least this
            large; other formats are read whole. Callers map boxes by the size they get.

    Raises:
        ImageReadError: the file is missing or cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    try:
        return _read_dicom(path) if _is_dicom(path) else _read_raster(path, min_size)
    except ImageReadError:
        raise
    except Exception as exc:  # Pillow and pydicom raise many types for a corrupt file
        raise ImageReadError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc


def image_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` from the file's header, without decoding the pixels.

    Raises:
        ImageReadError: missing file, or a header that does not parse.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: image file not found")
    try:
        if _is_dicom(path):
            import pydicom

            header = pydicom.dcmread(path, stop_before_pixels=True)
            return int(header.Columns), int(header.Rows)
        from PIL import Image

        with Image.open(path) as image:
            return image.size
    except Exception as exc:
        raise ImageReadError(f"{path}: unreadable image header ({type(exc).__name__}: {exc})") from exc


def _read_raster(path: Path, min_size: int | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        if min_size is not None and image.format == "JPEG":
            image.draft("L", (min_size, min_size))
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float32)
            # 16-bit PNGs use the full uint16 range (MIMIC-CXR-JPG's PNG exports do); "I" is 32-bit
            # signed but Pillow uses it for 16-bit data too.
            return np.clip(array / 65535.0, 0.0, 1.0)
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = pydicom.dcmread(path)
    pixels = dataset.pixel_array
    if pixels.ndim != 2:
        raise ImageReadError(f"{path}: expected a single-frame grey DICOM, got pixel array of shape {pixels.shape}")
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    if "VOILUTSequence" in dataset or "WindowCenter" in dataset:
        values = apply_voi_lut(values, dataset, index=0).astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if "WindowCenter" in dataset and "VOILUTSequence" not in dataset:
        low, high = _window_output_range(dataset)
    scaled = (values - low) / max(high - low, 1e-12)
    if str(dataset.PhotometricInterpretation).strip() == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def _window_output_range(dataset) -> tuple[float, float]:
    """The range a VOI window maps onto (DICOM PS3.3 C.11.2.1.2, as pydicom's ``apply_windowing``):
    the stored range, or the modality LUT's, then through the rescale slope and intercept."""
    if dataset.get("ModalityLUTSequence"):
        low, high = 0.0, float(2 ** int(dataset.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(getattr(dataset, "PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2 ** int(dataset.BitsStored) - 1)
    else:
        low, high = float(-(2 ** (int(dataset.BitsStored) - 1))), float(2 ** (int(dataset.BitsStored) - 1) - 1)
    slope, intercept = dataset.get("RescaleSlope"), dataset.get("RescaleIntercept")
    if slope is not None and intercept is not None and not dataset.get("ModalityLUTSequence"):
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def write_image(path: str | Path, image: np.ndarray) -> Path:
    """Write a ``[0, 1]`` grey image as 8-bit PNG or JPEG (by suffix), atomically."""
    from PIL import Image

    path = Path(path)
    formats = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
    if path.suffix.lower() not in formats:
        raise ValueError(f"{path}: write_image writes .png, .jpg or .jpeg")
    pixels = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8), mode="L")
    buffer = io.BytesIO()
    pixels.save(buffer, format=formats[path.suffix.lower()], **({"quality": 95} if path.suffix != ".png" else {}))
    return write_atomically(path, lambda handle: handle.write(buffer.getvalue()))


def write_dicom(path: str | Path, image: np.ndarray, *, monochrome1: bool = False, patient_id: str = "synthetic",
                window: tuple[float, float] | None = None) -> Path:
    """Write a ``[0, 1]`` grey image as a 12-bit DICOM (Digital X-ray, explicit VR little endian).

    The stored values use the range ``[0, 4095]``. With ``window=(centre, width)`` (in stored
    units) the file carries a VOI window; the image is then scaled so that the window spans
    ``[0, 1]``: readers that apply the window see ``image`` back. ``monochrome1`` stores the values
    inverted with photometric interpretation MONOCHROME1.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    if window is None:
        stored = np.clip(image, 0, 1) * 4095.0
    else:
        centre, width = window
        stored = (centre - 0.5 * width) + np.clip(image, 0, 1) * width
    stored = np.clip(np.round(stored), 0, 4095).astype(np.uint16)
    if monochrome1:
        stored = (4095 - stored).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image, for presentation
    # Derived from the patient id and pixels, so the same image gives the same file (seeded sample data).
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[patient_id, stored.tobytes().hex()[:4096]])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.PatientID = patient_id
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = stored.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    dataset.RescaleIntercept, dataset.RescaleSlope = 0, 1
    if window is not None:
        centre, width = window
        # A MONOCHROME1 window is expressed on the stored (inverted) values.
        dataset.WindowCenter = 4095 - centre if monochrome1 else centre
        dataset.WindowWidth = width
    dataset.PixelData = stored.tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return write_atomically(path, lambda handle: handle.write(buffer.getvalue()))
