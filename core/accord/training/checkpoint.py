"""Training checkpoints: atomic writes, safe loading, RNG state, and safetensors weight export.

A checkpoint is one ``torch.save`` file ``<run_dir>/checkpoints/step_<8 digits>.pt`` holding only
tensors and plain Python values, so it loads with ``torch.load(weights_only=True)``; nothing in a
checkpoint can run code when it is read. Its keys:

* ``format`` / ``version``: ``"accord-checkpoint"`` and :data:`CHECKPOINT_VERSION`.
* ``step``: optimizer steps completed.
* ``data_position``: ``{"epoch", "batch"}``, the next global micro-batch to read.
* ``model``: the model ``state_dict`` (unwrapped from DDP). An EMA teacher that is a submodule is
  part of it.
* ``optimizer``, ``scheduler``: their ``state_dict``\\ s.
* ``rng``: one entry per rank, each ``{"torch", "cuda", "numpy", "python"}`` (``cuda``: the state
  of the rank's current CUDA device, ``None`` when CUDA was not used).
* ``world_size``: ranks of the run that wrote it.
* ``config``: the :class:`~accord.config.TrainerConfig` as a JSON-style dict.
* ``digest``: :func:`content_digest` of everything else, verified on every load (version 2).
* ``run``: what the run was (:func:`accord.runs.run_record`): ``config`` (the resolved run config),
  ``plugin``, ``plugin_version``, ``task``, ``model_factory`` (the registered model factory that
  rebuilds the model from that config) and ``accord_version``; :func:`accord.runs.load_run`
  rebuilds the model from it. ``None`` for checkpoints of a trainer built without a run (tests,
  low-level use) and for version-1 checkpoints, which predate it.

Writes go through :func:`accord.utils.files.write_atomically` (re-exported here): a temporary
``.step_<...>.<random>.tmp`` in the same directory, flushed and fsynced, renamed over the final name
and the directory fsynced, so a crash leaves either the old file set or the new one, never a
half-written ``step_*.pt``; temp files never match ``step_*.pt``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

import accord
from accord.errors import UserError
from accord.utils.files import TEMP_SUFFIX, write_atomically

__all__ = [
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "checkpoint_path",
    "list_checkpoints",
    "write_atomically",
    "content_digest",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_state",
    "latest_valid_checkpoint",
    "prune_checkpoints",
    "remove_temp_files",
    "build_checkpoint",
    "seed_everything",
    "derive_seed",
    "capture_rng_state",
    "restore_rng_state",
    "export_weights",
    "load_weights",
    "weights_metadata",
]

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 2
#: Versions this accord reads; version 1 differs only by having no ``run`` and ``digest`` entries.
_READABLE_VERSIONS = (1, CHECKPOINT_VERSION)
_FORMAT = "accord-checkpoint"
_REQUIRED_KEYS = ("step", "data_position", "model", "optimizer", "scheduler", "rng", "world_size", "config")
_NAME = re.compile(r"^step_(\d+)\.pt$")


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unreadable, unsafe, not an accord checkpoint, or does not fit the model.

    A :class:`~accord.errors.UserError`, so the CLI reports it as one line naming the file; also a
    ``ValueError``, which callers caught before that base existed.
    """


def checkpoint_path(directory: Path, step: int) -> Path:
    """The file name of the checkpoint written after ``step`` optimizer steps."""
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step_*.pt`` in ``directory``, oldest first; temp files never match."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def content_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a checkpoint's content: every entry but ``digest``, keys, plain values and tensor bytes.

    Computed over the loaded objects rather than the file's bytes, so it checks what training
    will use: a flipped byte inside a tensor's storage loads without complaint from torch's zip
    reader, but changes this digest.
    """
    digest = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}:".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, Mapping):
            digest.update(b"{")
            for key, item in value.items():
                if key != "digest":
                    digest.update(f"{key!r}:".encode())
                    visit(item)
            digest.update(b"}")
        elif isinstance(value, (list, tuple)):
            digest.update(b"[")
            for item in value:
                visit(item)
            digest.update(b"]")
        else:
            digest.update(f"{value!r};".encode())

    visit(state)
    return digest.hexdigest()


def save_checkpoint(state: Mapping[str, Any], path: Path) -> Path:
    """Atomically ``torch.save`` a checkpoint dict (see :func:`build_checkpoint`) to ``path``, with
    its :func:`content_digest` under ``digest``."""
    state = dict(state)
    state["digest"] = content_digest(state)
    return write_atomically(Path(path), lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)`` on the CPU and check its keys.

    Args:
        path: a ``step_*.pt`` file.

    Returns:
        The checkpoint dict (keys in the module docstring).

    Raises:
        CheckpointError: missing or truncated file, a pickle that would run code, or a file that
            is not an accord checkpoint; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a long how-to-bypass text; keep only the sentence naming the object.
        reason = re.search(r"WeightsUnpickler error: (Unsupported global.*?\.)(?=\s|$)", str(exc))
        if reason:
            raise CheckpointError(
                f"{path}: refused to load: it holds objects that weights_only loading does not allow "
                f"({reason.group(1)})"
            ) from exc
        raise CheckpointError(f"{path}: not a checkpoint: not a file written by torch.save") from exc
    except Exception as exc:
        # On arbitrary bytes torch's readers fail with any type (KeyError, IndexError, RuntimeError,
        # EOFError, ...): whatever they raise here is about the file, not a bug to trace.
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable, truncated or not a checkpoint ({detail})") from exc
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{path}: not an accord checkpoint (no format={_FORMAT!r} entry)")
    if state.get("version") not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint version {state.get('version')!r}, this accord reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))}"
        )
    state.setdefault("run", None)
    if state["version"] >= 2 and state.get("digest") != content_digest(state):
        raise CheckpointError(
            f"{path}: corrupt checkpoint: its content does not match the digest stored when it was written"
        )
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return state


def load_model_state(model: nn.Module, state_dict: Mapping[str, Any], path: Path, built_by: str) -> None:
    """``model.load_state_dict(state_dict)`` (strict), or a short error saying which entries differ.

    torch's own message lists every key, often hundreds of lines; this names at most three
    missing keys, three unexpected keys and three shape mismatches, with the totals.

    Args:
        model: the model to load into.
        state_dict: a checkpoint's ``model`` entry.
        path: the checkpoint, for the message.
        built_by: what built ``model``, for the message (e.g. ``"this run's model"``).

    Raises:
        CheckpointError: the keys or shapes differ; nothing was loaded.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    shapes = [
        f"{key} {tuple(state_dict[key].shape)} in the checkpoint, {tuple(value.shape)} in the model"
        for key, value in expected.items()
        if key in state_dict and isinstance(state_dict[key], torch.Tensor) and state_dict[key].shape != value.shape
    ]
    parts = [
        f"{len(found)} {label}: {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}"
        for label, found in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
        if found
    ]
    if parts:
        raise CheckpointError(f"{path}: its weights do not fit {built_by}; entries {'; '.join(parts)}")
    model.load_state_dict(state_dict)


def latest_valid_checkpoint(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that loads, skipping broken ones with a warning.

    Returns:
        ``(path, state)``, or ``None`` when there is no loadable checkpoint.
    """
    for _, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
    return None


def prune_checkpoints(directory: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns the deleted paths."""
    stale = [path for _, path in list_checkpoints(directory)[:-keep_last]]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def remove_temp_files(directory: Path) -> None:
    """Delete temporary files left by a writer that was killed mid-write."""
    if Path(directory).is_dir():
        for path in Path(directory).glob(f".*{TEMP_SUFFIX}"):
            path.unlink(missing_ok=True)


def build_checkpoint(
    *,
    step: int,
    data_position: Mapping[str, int],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: list[dict[str, Any]],
    config: Mapping[str, Any],
    run: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the checkpoint dict; a DDP-wrapped ``model`` is unwrapped first.

    Args:
        step: optimizer steps completed.
        data_position: ``{"epoch", "batch"}`` of the next micro-batch.
        model: the trained model (plain or DDP-wrapped).
        optimizer: its optimizer.
        scheduler: its learning-rate scheduler.
        rng: :func:`capture_rng_state` of every rank, indexed by rank.
        config: the trainer config as a JSON-style dict.
        run: the run record (see the module docstring), or ``None``.
    """
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return {
        "format": _FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": int(step),
        "data_position": {"epoch": int(data_position["epoch"]), "batch": int(data_position["batch"])},
        "model": module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        "world_size": len(rng),
        "config": dict(config),
        "run": dict(run) if run is not None else None,
    }


# --- random number generators ------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device), and make
    CPU convolutions reproducible.

    oneDNN's convolution backward otherwise sums weight gradients across threads in a varying order
    (two same-seed runs of a 3D CNN drift apart in the last float bits); its deterministic mode costs
    about 2% there, unlike ``trainer.deterministic``, which also makes unsupported ops raise.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.mkldnn.deterministic = True


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. ``(seed, rank, epoch)``)."""
    word = np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1, np.uint64)[0]
    return int(word) >> 1  # a non-negative int64 is accepted by every seeding API


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (``weights_only``-loadable).

    NumPy's key array and Python's state tuple are stored as int64 tensors because
    ``weights_only`` loading accepts no NumPy objects.
    """
    np_algorithm, np_keys, np_pos, np_has_gauss, np_cached_gauss = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # Only the current device: each rank drives one GPU, and touching the others would create
        # a CUDA context on every GPU of the node.
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "numpy": {
            "algorithm": str(np_algorithm),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached_gauss),
        },
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss_next,
        },
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["algorithm"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate(
        (python_state["version"], tuple(python_state["internal"].tolist()), python_state["gauss_next"])
    )


# --- weights export ----------------------------------------------------------------------------


def _unshared(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no shared storage, which safetensors requires (tied weights)."""
    out: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"model state entry {name!r} is a {type(value).__name__}, not a tensor")
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if storage in seen_storages else tensor
        seen_storages.add(storage)
    return out


def export_weights(checkpoint: Path | str | Mapping[str, Any], out_path: Path | str) -> Path:
    """Write a checkpoint's model ``state_dict`` as a safetensors file.

    The header metadata holds ``format="pt"``, ``accord_version``, ``step``, the trainer
    ``config`` and the ``run`` record (JSON; ``null`` when the checkpoint has none).

    Args:
        checkpoint: a checkpoint path or an already loaded checkpoint dict.
        out_path: the ``.safetensors`` file to write (atomically).

    Returns:
        ``out_path``.
    """
    from safetensors.torch import save

    state = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    metadata = {
        "format": "pt",
        "accord_version": accord.__version__,
        "step": str(state["step"]),
        "config": json.dumps(state["config"], sort_keys=True),
        "run": json.dumps(state.get("run"), sort_keys=True),
    }
    payload = save(_unshared(state["model"]), metadata=metadata)
    return write_atomically(Path(out_path), lambda handle: handle.write(payload))


def load_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """Read a safetensors weights file (from :func:`export_weights`) into a CPU ``state_dict``."""
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def weights_metadata(path: Path | str) -> dict[str, str]:
    """The header metadata of a safetensors weights file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
