"""Superpixels per camera image: SLIC (SLidR) and class-level semantic maps (SuperFlow).

On disk, one directory per kind under ``<dataroot>/superpixels/<kind>/`` holds one uint8 PNG per
camera ``sample_data`` token (``<token>.png``, same size as the camera image) and a ``meta.json``
with the kind and ``num_ids``, the exclusive upper bound of the ids (the superpixel "size" the
losses offset ids by). Ids outside ``[0, num_ids)`` would silently leak into the next image's or
sample's id block in the pooled losses, so every reader validates them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from accord_superflow.data.schema import SEMANTIC_SUPERPIXEL_CLASSES

if TYPE_CHECKING:
    from accord_superflow.data.index import InfoIndex

__all__ = [
    "SUPERPIXELS_DIR",
    "META_FILE",
    "SEMANTIC_KIND",
    "SLIC_KIND",
    "SlicParams",
    "superpixel_dir",
    "write_superpixel_meta",
    "read_superpixel_meta",
    "save_superpixels",
    "load_superpixels",
    "load_semantic_superpixels",
    "slic_superpixels",
    "cached_slic_superpixels",
    "generate_slic_superpixels",
]

SUPERPIXELS_DIR = "superpixels"
META_FILE = "meta.json"
SEMANTIC_KIND = "semantic"
SLIC_KIND = "slic"


@dataclass(frozen=True)
class SlicParams:
    """``skimage.segmentation.slic`` settings; the defaults are SLidR's (MinkUNet variant)."""

    n_segments: int = 150
    compactness: float = 6.0
    sigma: float = 3.0


def superpixel_dir(dataroot: str | Path, kind: str) -> Path:
    return Path(dataroot) / SUPERPIXELS_DIR / kind


def write_superpixel_meta(directory: str | Path, kind: str, num_ids: int, **params: Any) -> None:
    """Create ``directory`` and its ``meta.json`` (``kind``, ``num_ids`` and generator settings)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).write_text(json.dumps({"kind": kind, "num_ids": num_ids, **params}, indent=1))


def read_superpixel_meta(directory: str | Path) -> dict[str, Any]:
    """The validated ``meta.json`` of a superpixel directory.

    Raises:
        ValueError: missing, unreadable, or ``num_ids`` not an integer in 1..256 (uint8 PNGs).
    """
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; expected {{'kind': ..., 'num_ids': ...}}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable JSON ({exc})") from None
    num_ids = meta.get("num_ids") if isinstance(meta, dict) else None
    if not isinstance(num_ids, int) or not 1 <= num_ids <= 256:
        raise ValueError(f"{path}: 'num_ids' must be an integer in 1..256, got {num_ids!r}")
    return meta


def save_superpixels(path: str | Path, ids: np.ndarray) -> None:
    """Write ``(H, W)`` integer ids in 0..255 as an 8-bit grayscale PNG."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.min() < 0 or ids.max() > 255:
        raise ValueError(f"{path}: superpixel ids must be a 2D array in 0..255, got shape {ids.shape}, "
                         f"range {ids.min()}..{ids.max()}")
    Image.fromarray(ids.astype(np.uint8), mode="L").save(path)


def load_superpixels(path: str | Path, num_ids: int, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a superpixel PNG and validate it.

    Args:
        path: the PNG.
        num_ids: ids must lie in ``[0, num_ids)``.
        expected_size: ``(width, height)`` of the camera image it belongs to, if known.

    Returns:
        ``(H, W)`` int64 ids.

    Raises:
        ValueError: unreadable file, not 8-bit grayscale, wrong size, or an id out of range.
    """
    try:
        with Image.open(path) as image:
            image.load()
            mode, size, ids = image.mode, image.size, np.asarray(image, dtype=np.int64)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: unreadable superpixel image ({exc})") from None
    if mode != "L":
        raise ValueError(f"{path}: superpixels must be an 8-bit grayscale PNG (mode L), got mode {mode}")
    if expected_size is not None and tuple(size) != tuple(expected_size):
        raise ValueError(f"{path}: superpixel map is {size[0]}x{size[1]}, its camera image is "
                         f"{expected_size[0]}x{expected_size[1]}")
    if ids.size and ids.max() >= num_ids:
        raise ValueError(f"{path}: superpixel id {ids.max()} out of range; ids must be < {num_ids}")
    return ids


def load_semantic_superpixels(path: str | Path, expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a class-level superpixel PNG: ids index :data:`SEMANTIC_SUPERPIXEL_CLASSES` (0..16)."""
    return load_superpixels(path, len(SEMANTIC_SUPERPIXEL_CLASSES), expected_size)


def slic_superpixels(image: np.ndarray, params: SlicParams = SlicParams()) -> np.ndarray:
    """SLIC superpixels of one RGB image.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        params: SLIC settings.

    Returns:
        ``(H, W)`` uint8 ids starting at 0.

    Raises:
        ValueError: SLIC produced ``params.n_segments`` segments or more (the loss's id block would
            overflow); lower ``n_segments``.
    """
    from skimage.segmentation import slic

    ids = slic(image, n_segments=params.n_segments, compactness=params.compactness, sigma=params.sigma,
               start_label=0, channel_axis=-1)
    if ids.max() >= params.n_segments:
        raise ValueError(f"SLIC produced {ids.max() + 1} segments, more than n_segments={params.n_segments}")
    return ids.astype(np.uint8)


def cached_slic_superpixels(image_path: str | Path, sample_data_token: str, out_dir: str | Path,
                            params: SlicParams = SlicParams()) -> Path:
    """SLIC superpixels of one camera image, computed once and cached as ``out_dir/<token>.png``.

    The first call writes ``out_dir/meta.json`` with ``params``; a directory made with other
    parameters is refused rather than mixed, since its files would be reused silently.

    Args:
        image_path: the camera JPEG.
        sample_data_token: its camera ``sample_data`` token (the cache key of the image).
        out_dir: the SLIC directory, normally ``superpixel_dir(dataroot, "slic")``.
        params: SLIC settings.

    Returns:
        The PNG path.

    Raises:
        ValueError: ``out_dir`` holds superpixels made with other parameters, or SLIC fails.
    """
    out_dir = Path(out_dir)
    if (out_dir / META_FILE).is_file():
        meta = read_superpixel_meta(out_dir)
        if meta != _slic_meta(params):
            raise ValueError(f"{out_dir / META_FILE}: holds superpixels made with {meta}, not {_slic_meta(params)}; "
                             "use another directory for these parameters")
    else:
        write_superpixel_meta(out_dir, **_slic_meta(params))
    out_path = out_dir / f"{sample_data_token}.png"
    if not out_path.is_file():
        with Image.open(image_path) as image:
            rgb = np.asarray(image.convert("RGB"))
        try:
            ids = slic_superpixels(rgb, params)
        except ValueError as exc:
            raise ValueError(f"{image_path}: {exc}") from None
        # Write then rename, so an interrupted run never leaves a truncated PNG in the cache.
        partial = out_path.with_suffix(".partial.png")
        save_superpixels(partial, ids)
        partial.replace(out_path)
    return out_path


def generate_slic_superpixels(dataroot: str | Path, index: InfoIndex, out_dir: str | Path | None = None,
                              params: SlicParams = SlicParams()) -> list[Path]:
    """SLIC superpixels for every camera image of an info index (cached per image).

    Args:
        dataroot: the nuScenes root the index's paths are relative to.
        index: keyframes whose camera images to segment.
        out_dir: defaults to ``<dataroot>/superpixels/slic``.
        params: SLIC settings.

    Returns:
        The PNG paths, keyframe by keyframe in camera order.
    """
    dataroot = Path(dataroot)
    out_dir = superpixel_dir(dataroot, SLIC_KIND) if out_dir is None else Path(out_dir)
    return [cached_slic_superpixels(dataroot / camera.path, camera.sample_data_token, out_dir, params)
            for keyframe in index.keyframes for camera in keyframe.cameras.values()]


def _slic_meta(params: SlicParams) -> dict[str, Any]:
    return {"kind": SLIC_KIND, "num_ids": params.n_segments, **asdict(params)}
