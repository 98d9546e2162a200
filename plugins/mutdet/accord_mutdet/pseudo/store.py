"""Per-image pseudo-label files ``<id>.npz``, the hand-over from step 1 to pretraining.

Keys (row-aligned): ``boxes`` float32 ``(N, 5)`` le90 in original image pixels, ``embeddings``
float32 ``(N, D)`` unit-norm object embeddings (D = 256 by default), ``pseudo_class`` int64
``(N,)`` the spherical k-means cluster of each embedding, ``score`` float32 ``(N,)`` the proposal
source's confidence. An image without proposals has ``N = 0`` (embeddings ``(0, D)``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from accord.utils.files import write_atomically

PSEUDO_KEYS = ("boxes", "embeddings", "pseudo_class", "score")


def write_pseudo_labels(path: Path, boxes: np.ndarray, embeddings: np.ndarray, pseudo_class: np.ndarray,
                        score: np.ndarray) -> Path:
    """Write one pseudo-label file atomically (a half-written file is never seen, so runs can resume)."""
    arrays = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 5),
              "embeddings": np.asarray(embeddings, np.float32),
              "pseudo_class": np.asarray(pseudo_class, np.int64).reshape(-1),
              "score": np.asarray(score, np.float32).reshape(-1)}
    n = len(arrays["boxes"])
    if any(len(value) != n for value in arrays.values()):
        raise ValueError(f"{path}: pseudo-label arrays must have one row per box ({n}), got "
                         + ", ".join(f"{k} {len(v)}" for k, v in arrays.items()))
    return write_npz(path, arrays)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` through :func:`accord.utils.files.write_atomically`."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_atomically(Path(path), lambda handle: handle.write(buffer.getvalue()))


def read_pseudo_labels(path: Path) -> dict[str, np.ndarray]:
    """Read and validate one pseudo-label file (ValueError naming the file and key otherwise)."""
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in PSEUDO_KEYS}
    except KeyError as exc:
        raise ValueError(f"{path}: pseudo-label file lacks key {exc}; expected {', '.join(PSEUDO_KEYS)}") from exc
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable pseudo-label file ({exc})") from exc
    n = len(arrays["boxes"])
    if arrays["boxes"].shape != (n, 5) or any(len(arrays[k]) != n for k in PSEUDO_KEYS) or arrays["embeddings"].ndim != 2:
        raise ValueError(f"{path}: expected boxes (N, 5), embeddings (N, D), pseudo_class (N,), score (N,); got "
                         + ", ".join(f"{k} {arrays[k].shape}" for k in PSEUDO_KEYS))
    arrays["boxes"] = arrays["boxes"].astype(np.float32)
    arrays["embeddings"] = arrays["embeddings"].astype(np.float32)
    return arrays
