"""Anatomical embeddings of a whole volume (SAM-style global + local maps) and their file loader.

An :class:`AnatomyEmbedding` holds two voxel-embedding maps of one volume: a coarse ``global``
map (anatomical context; SAM's "coarse" read-out) and a fine ``local`` map (SAM's stride-2
"fine" map). Each has its own integer stride and covers the volume with ``ceil(S / stride)``
cells per axis (geometry in :mod:`accord_medssl.anatomy.grid`). They come either from
:class:`~accord_medssl.anatomy.AnatomyEmbeddingModel` (:func:`model_embedder`) or from
precomputed files (:func:`file_embedder`), e.g. exported from the original SAM.

Prepared embeddings (:class:`~accord_medssl.anatomy.miner.AnatomySearchIndex`) can be kept in an
**embedding store**: one ``<key>.anat`` file per volume (:func:`write_embedding_store`,
:func:`read_embedding_store`), memory-mapped so that a search reads only the pages it touches.
Layout, all little-endian:

- the magic ``b"\\x93ACCORDANAT"`` (11 bytes), ``uint32`` format version, ``uint32`` header length;
- a UTF-8 JSON header: the volume geometry and, per array, ``name``, ``dtype``, ``shape`` and byte
  ``offset`` from the start of the file;
- the raw C-order arrays, each starting at a multiple of 64 bytes.

Version 2 stores the local map in blocks of cells (the windows a search reads,
:class:`~accord_medssl.anatomy.miner.AnatomySearchIndex`); version 1 stored it as one C-order
array and is refused (rebuild it from its source).

A file of another version, a truncated one or one without the magic is refused with a message
naming it (delete it: :func:`~accord_medssl.anatomy.miner.store_embedder` rewrites it from its
source).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from accord.utils.checks import check_tensor
from accord.utils.files import write_atomically
from accord_medssl.anatomy.grid import check_stride, embedding_grid_shape

if TYPE_CHECKING:
    from accord_medssl.anatomy.miner import AnatomySearchIndex

__all__ = [
    "STORE_SUFFIX",
    "STORE_VERSION",
    "AnatomyEmbedding",
    "Embedder",
    "file_embedder",
    "load_anatomy_embedding",
    "load_embedding_volume",
    "read_embedding_store",
    "write_embedding_store",
]

#: File name suffix of embedding store files.
STORE_SUFFIX = ".anat"
#: The store format this code writes and reads; bump it when the layout or the prepared values change.
STORE_VERSION = 2
_MAGIC = b"\x93ACCORDANAT"
_PREFIX = struct.Struct("<II")  # version, header length
_ALIGNMENT = 64
_STORE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class AnatomyEmbedding:
    """Global and local embedding maps of one volume.

    Attributes:
        global_map: ``(C_g, *ceil(volume_shape / global_stride))``.
        local_map: ``(C_l, *ceil(volume_shape / local_stride))``.
        global_stride: voxels per global cell along each axis.
        local_stride: voxels per local cell along each axis.
        volume_shape: the embedded volume's spatial shape ``(D, H, W)``.

    Raises:
        ValueError: a map that is not 4-D or whose grid does not match its stride and the volume.
    """

    global_map: torch.Tensor
    local_map: torch.Tensor
    global_stride: tuple[int, int, int]
    local_stride: tuple[int, int, int]
    volume_shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        for name in ("global", "local"):
            embedding_map = getattr(self, f"{name}_map")
            stride = check_stride(getattr(self, f"{name}_stride"), f"{name}_stride")
            check_tensor(embedding_map, f"{name}_map", ndim=4, floating=True)
            expected = embedding_grid_shape(self.volume_shape, stride)
            if tuple(embedding_map.shape[1:]) != expected:
                raise ValueError(
                    f"{name}_map: grid {tuple(embedding_map.shape[1:])} does not match volume_shape "
                    f"{tuple(self.volume_shape)} at stride {stride} (expected {expected})"
                )


#: Returns the embedding of a volume: ``embedder(key, volume)`` with the volume's cache key (e.g.
#: its case name) and the volume ``(1, D, H, W)``; each uses what it needs. It may also return a
#: prepared :class:`~accord_medssl.anatomy.miner.AnatomySearchIndex` (an embedding store).
Embedder = Callable[[str, torch.Tensor], "AnatomyEmbedding | AnatomySearchIndex"]


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGNMENT) * _ALIGNMENT


def write_embedding_store(path: str | Path, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write one embedding store file (layout in the module docstring), atomically.

    Args:
        path: the ``.anat`` file; its directory is created.
        header: JSON-serialisable geometry (volume shape, strides).
        arrays: name -> float16 or float32 array, written C-order.

    Returns:
        ``path``.
    """
    entries, offset = [], 0
    for name, array in arrays.items():
        if array.dtype.name not in _STORE_DTYPES:
            raise ValueError(f"arrays[{name!r}]: expected one of {_STORE_DTYPES}, got {array.dtype}")
        entries.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape), "offset": offset})
        offset = _aligned(offset + array.nbytes)

    def encode(start: int) -> bytes:
        shifted = [{**entry, "offset": entry["offset"] + start} for entry in entries]
        return json.dumps({**header, "arrays": shifted}).encode("utf-8")

    # Offsets are absolute: find the aligned data start that also holds the header with them.
    start = _aligned(len(_MAGIC) + _PREFIX.size + len(encode(0)))
    while len(_MAGIC) + _PREFIX.size + len(encode(start)) > start:
        start += _ALIGNMENT
    text = encode(start)

    def write(handle) -> None:
        handle.write(_MAGIC + _PREFIX.pack(STORE_VERSION, len(text)) + text)
        for entry, array in zip(entries, arrays.values()):
            handle.seek(entry["offset"] + start)
            handle.write(np.ascontiguousarray(array).tobytes())

    return write_atomically(Path(path), write)


def read_embedding_store(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Memory-map the arrays of a store file written by :func:`write_embedding_store`.

    The maps are copy-on-write: writing to them never changes the file.

    Returns:
        ``(header, arrays)``: the JSON header without its array table, and name -> memory map.

    Raises:
        ValueError: a missing file, no magic (not a store file, e.g. an old ``.npy``), another
            format version, a bad header, or arrays past the end of the file (truncated).
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{file}: anatomy-embedding store file not found")
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(len(_MAGIC) + _PREFIX.size)
        if len(prefix) < len(_MAGIC) + _PREFIX.size or prefix[: len(_MAGIC)] != _MAGIC:
            raise ValueError(f"{file}: not an accord anatomy-embedding store (no {_MAGIC!r} magic); "
                             "delete it to have it rebuilt from its source")
        version, length = _PREFIX.unpack(prefix[len(_MAGIC):])
        if version != STORE_VERSION:
            raise ValueError(f"{file}: embedding store format version {version}, this accord reads version "
                             f"{STORE_VERSION}; delete the file to have it rebuilt from its source")
        try:
            header = json.loads(handle.read(length).decode("utf-8"))
            entries = header.pop("arrays")
            # One mapping of the whole file, the arrays views into it: a mapping holds a file
            # descriptor, and a miner keeps hundreds of stores open.
            mapping = np.memmap(file, dtype=np.uint8, mode="c")
            arrays = {}
            for entry in entries:
                dtype = np.dtype(entry["dtype"])
                if dtype.name not in _STORE_DTYPES:
                    raise ValueError(f"array {entry['name']!r} has dtype {dtype}")
                shape = tuple(int(value) for value in entry["shape"])
                end = int(entry["offset"]) + dtype.itemsize * int(np.prod(shape))
                if end > size:
                    raise ValueError(f"array {entry['name']!r} ends at byte {end}, the file has {size} (truncated?)")
                arrays[entry["name"]] = mapping[int(entry["offset"]):end].view(dtype).reshape(shape)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"{file}: corrupt anatomy-embedding store: {error}") from None
    return header, arrays


def load_embedding_volume(
    path: str | Path, channels: int | None = None, grid_shape: Sequence[int] | None = None
) -> torch.Tensor:
    """Read one embedding map stored channel-first, ``(C, D, H, W)``, from ``.npy`` or NIfTI.

    NIfTI files must hold the array in the same ``(C, D, H, W)`` order (channel first, not in the
    4th "time" axis); their affine is ignored, the grid is defined by the volume and the stride.

    Args:
        path: a ``.npy``, ``.nii`` or ``.nii.gz`` file.
        channels: the expected ``C``, if known.
        grid_shape: the expected ``(D, H, W)``, if known.

    Returns:
        A float32 tensor ``(C, D, H, W)``.

    Raises:
        ValueError: an unknown suffix, or an array that is not 4-D or has another shape; the
            message names the file.
    """
    file = Path(path)
    name = file.name.lower()
    if name.endswith(".npy"):
        array = np.load(file)
    elif name.endswith((".nii", ".nii.gz")):
        import nibabel

        array = np.asarray(nibabel.load(file).dataobj)
    else:
        raise ValueError(f"{file}: expected a .npy, .nii or .nii.gz embedding file")
    if array.ndim != 4:
        raise ValueError(f"{file}: expected a 4-D (C, D, H, W) embedding, got shape {array.shape}")
    if channels is not None and array.shape[0] != channels:
        raise ValueError(f"{file}: expected {channels} channels in dim 0 of (C, D, H, W), got shape {array.shape}")
    if grid_shape is not None and tuple(array.shape[1:]) != tuple(grid_shape):
        raise ValueError(f"{file}: expected the grid {tuple(grid_shape)} in (C, D, H, W), got shape {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def load_anatomy_embedding(
    global_path: str | Path,
    local_path: str | Path,
    volume_shape: Sequence[int],
    global_stride: int | Sequence[int],
    local_stride: int | Sequence[int],
) -> AnatomyEmbedding:
    """Read a volume's global and local maps and check their grids against the volume.

    Args:
        global_path: the global map file, ``(C_g, *ceil(volume_shape / global_stride))``.
        local_path: the local map file, ``(C_l, *ceil(volume_shape / local_stride))``.
        volume_shape: spatial shape of the volume the maps describe.
        global_stride: stride of the global map.
        local_stride: stride of the local map.

    Returns:
        The embedding.

    Raises:
        ValueError: a file whose shape does not fit (the message names the file).
    """
    shape = tuple(volume_shape)
    global_strides = check_stride(global_stride, "global_stride")
    local_strides = check_stride(local_stride, "local_stride")
    return AnatomyEmbedding(
        global_map=load_embedding_volume(global_path, grid_shape=embedding_grid_shape(shape, global_strides)),
        local_map=load_embedding_volume(local_path, grid_shape=embedding_grid_shape(shape, local_strides)),
        global_stride=global_strides,
        local_stride=local_strides,
        volume_shape=shape,
    )


def file_embedder(
    directory: str | Path,
    global_stride: int | Sequence[int],
    local_stride: int | Sequence[int],
    suffix: str = ".npy",
) -> Embedder:
    """An :data:`Embedder` reading ``{directory}/{key}_global{suffix}`` and ``{key}_local{suffix}``.

    Args:
        directory: folder of the precomputed maps.
        global_stride: stride of every global map.
        local_stride: stride of every local map.
        suffix: ``.npy``, ``.nii`` or ``.nii.gz``.

    Returns:
        ``embedder(key, volume)``; the volume only provides the shape to validate against.
    """
    root = Path(directory)

    def embed(key: str, volume: torch.Tensor) -> AnatomyEmbedding:
        return load_anatomy_embedding(
            root / f"{key}_global{suffix}",
            root / f"{key}_local{suffix}",
            tuple(volume.shape[-3:]),
            global_stride,
            local_stride,
        )

    return embed
