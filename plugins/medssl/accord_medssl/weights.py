"""Weights in and out of medssl runs: pretrained backbones from checkpoints, and MONAI weights files.

Training code loads weights from here; :mod:`accord_medssl.export` only exports.

A *MONAI weights file* is what ``monai.networks.nets.SwinUNETR`` loads strictly:

a plain SwinUNETR ``state_dict`` plus the constructor arguments that build the matching network:

- ``FILE.safetensors`` (safetensors; the metadata header repeats the JSON below, one JSON string per
  key), or any other suffix: ``torch.save`` of the plain tensor dict (loads with ``weights_only=True``);
- ``FILE.<suffix>.json`` next to it: ``{"swin_unetr_kwargs": {...}, ...provenance}``.

Loading it in plain MONAI::

    kwargs = json.load(open("alice.safetensors.json"))["swin_unetr_kwargs"]
    net = SwinUNETR(**kwargs)
    net.load_state_dict(safetensors.torch.load_file("alice.safetensors"), strict=True)

``accord export CKPT --format monai --out FILE`` (:func:`export_monai`) writes one from an Alice
pretraining checkpoint; the ``finetune`` task writes its best segmentation network the same way.
A pretraining checkpoint describes its run (``state["run"]``, see :func:`accord.runs.load_run`):
the architecture comes from the resolved run config stored in it (:func:`pretraining_options`),
so a checkpoint file is enough, without its run folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from monai.networks.nets import SwinUNETR

from accord.training import load_checkpoint
from accord.training.checkpoint import write_atomically
from accord_medssl.alice import AliceOptions
from accord_medssl.models import SwinUNETRBackboneOptions, monai_state_dict

__all__ = [
    "ALICE_BACKBONE_PREFIXES",
    "alice_backbone",
    "build_swin_unetr",
    "load_monai_weights",
    "pretraining_options",
    "save_monai_weights",
    "sidecar_path",
]

#: Where the SwinUNETR weights sit in an Alice checkpoint's model state: the student network, or
#: the EMA teacher's copy of it.
ALICE_BACKBONE_PREFIXES = {
    "student": "student.backbone.swin_unetr.",
    "teacher": "teacher.teacher.backbone.swin_unetr.",
}


def pretraining_options(checkpoint: str | Path, method: str, state: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``method`` section of the run config stored in a medssl pretraining checkpoint.

    Args:
        checkpoint: a ``step_*.pt`` of a medssl ``pretrain`` run.
        method: the method the run must have trained (``"alice"`` or ``"anatomy_embedding"``); its
            options section has the same name.
        state: the checkpoint, if already loaded.

    Returns:
        The section as a plain dict (validate it with the method's options model).

    Raises:
        ValueError: a checkpoint without a run record (written before checkpoints described their
            run), or of another plugin, task or method.
    """
    record = (state if state is not None else load_checkpoint(checkpoint))["run"]
    if not record:
        raise ValueError(
            f"{checkpoint}: the checkpoint does not record its run config (written by an accord older than checkpoint "
            "version 2); rerun the pretraining, or rebuild the model from that run's config.yaml by hand"
        )
    config = record["config"]
    if (record["plugin"], record["task"], config.get("method")) != ("medssl", "pretrain", method):
        raise ValueError(f"{checkpoint}: written by {run_description(record)}, expected a medssl.pretrain run of "
                         f"method {method!r}")
    return dict(config.get(method) or {})


def run_description(record: Mapping[str, Any]) -> str:
    """``"a medssl.pretrain run of method 'alice'"`` (``"a core.pretrain run"`` when the task has no method)."""
    method = record["config"].get("method")
    return f"a {record['plugin']}.{record['task']} run" + (f" of method {method!r}" if method else "")


def alice_backbone(
    checkpoint: str | Path, weights: Literal["student", "teacher"] = "student", drop_output_layer: bool = False
) -> tuple[SwinUNETRBackboneOptions, dict[str, torch.Tensor], int]:
    """The SwinUNETR of an Alice pretraining checkpoint.

    Args:
        checkpoint: a checkpoint of a ``method: alice`` run.
        weights: the student network (what the reference's ``extract_backbone_weights.py`` exports)
            or the EMA teacher.
        drop_output_layer: leave out the reconstruction head ``out.*`` (for a segmentation network).

    Returns:
        ``(options, state_dict, step)``: the architecture, the weights keyed as
        ``SwinUNETR(**options.monai_kwargs())`` expects, and
        the optimizer steps the checkpoint had taken.

    Raises:
        ValueError: not an Alice checkpoint, or one that does not record its run config.
    """
    state = load_checkpoint(checkpoint)
    options = AliceOptions.model_validate(pretraining_options(checkpoint, "alice", state)).backbone
    try:
        return options, monai_state_dict(state["model"], ALICE_BACKBONE_PREFIXES[weights], drop_output_layer), state["step"]
    except ValueError as exc:
        raise ValueError(f"{checkpoint}: not an Alice model state ({exc})") from None


def sidecar_path(weights_path: str | Path) -> Path:
    """``FILE.<suffix>.json``: the JSON metadata of a MONAI weights file."""
    path = Path(weights_path)
    return path.with_name(path.name + ".json")


def save_monai_weights(
    state_dict: Mapping[str, torch.Tensor],
    swin_unetr_kwargs: Mapping[str, Any],
    out: str | Path,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write a MONAI weights file and its JSON sidecar (format in the module docstring).

    Args:
        state_dict: the SwinUNETR weights.
        swin_unetr_kwargs: ``SwinUNETR`` constructor arguments (JSON-serialisable).
        out: ``*.safetensors`` for safetensors, anything else for ``torch.save``.
        metadata: extra JSON-serialisable provenance (source checkpoint, step, labels, ...).

    Returns:
        ``out``.
    """
    out = Path(out)
    info = {"format": "monai.networks.nets.SwinUNETR", "swin_unetr_kwargs": dict(swin_unetr_kwargs), **(metadata or {})}
    info = json.loads(json.dumps(info))  # tuples -> lists, as the sidecar will read back
    # Own, contiguous CPU copies: safetensors refuses tensors that share memory.
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}
    if out.suffix == ".safetensors":
        from safetensors.torch import save

        payload = save(tensors, metadata={key: json.dumps(value) for key, value in info.items()})
        write_atomically(out, lambda handle: handle.write(payload))
    else:
        write_atomically(out, lambda handle: torch.save(tensors, handle))
    write_atomically(sidecar_path(out), lambda handle: handle.write(json.dumps(info, indent=2).encode()))
    return out


def load_monai_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a MONAI weights file: ``(state_dict, metadata)``, metadata holding ``swin_unetr_kwargs``.

    Raises:
        ValueError: the file or its sidecar is missing.
    """
    path = Path(path)
    sidecar = sidecar_path(path)
    for required in (path, sidecar):
        if not required.is_file():
            raise ValueError(f"{required}: not found; a MONAI weights file comes with its {sidecar.name} sidecar")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return state, json.loads(sidecar.read_text())


def build_swin_unetr(path: str | Path) -> tuple[SwinUNETR, dict[str, Any]]:
    """A ``SwinUNETR`` built from a MONAI weights file's kwargs, weights loaded strictly; plus its metadata."""
    state, metadata = load_monai_weights(path)
    network = SwinUNETR(**metadata["swin_unetr_kwargs"])
    network.load_state_dict(state, strict=True)
    return network, metadata
