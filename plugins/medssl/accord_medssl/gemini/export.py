"""``accord export CKPT --format gemini_unet --out FILE``: a GEMINI checkpoint's backbone U-Net.

MONAI has no network with GEMINI's backbone weights layout (``BasicUNet`` uses one norm for every
block, a channel-halving up-convolution and a final 1x1 conv, see :mod:`~accord_medssl.gemini.networks`),
so the export is the plain state dict of :class:`~accord_medssl.gemini.networks.GeminiUNet` (built
from MONAI ``TwoConv`` / ``Down`` blocks) with its constructor arguments:

- ``FILE.safetensors``: the tensors (safetensors metadata repeats the sidecar's JSON);
- ``FILE.safetensors.json``: ``{"format", "kwargs", "source_checkpoint", "step"}``.

:func:`load_gemini_unet` rebuilds the network and loads the weights strictly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from accord.utils.files import write_atomically
from accord_medssl.gemini.networks import GeminiUNet

__all__ = ["UNET_FORMAT", "export_gemini_unet", "load_gemini_unet", "save_weights"]

UNET_FORMAT = "accord_medssl.gemini.networks.GeminiUNet"


def export_gemini_unet(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the backbone of a ``gemini_pretrain`` checkpoint (format in the module docstring).

    Raises:
        ValueError: not a GEMINI checkpoint.
    """
    from accord.runs import load_run

    run = load_run(checkpoint)
    network = getattr(run.model, "network", None)
    if run.record.get("model_factory") != "medssl.gemini" or network is None:
        raise ValueError(f"{checkpoint}: not a GEMINI checkpoint (model factory {run.record.get('model_factory')!r}, "
                         "expected 'medssl.gemini')")
    options = network.options
    info: dict[str, Any] = {
        "format": UNET_FORMAT,
        "kwargs": {"spatial_dims": options.spatial_dims, "in_channels": options.in_channels,
                   "channels": list(options.channels)},
        "source_checkpoint": str(Path(checkpoint).absolute()),
        "step": run.step,
    }
    return save_weights(network.unet.state_dict(), info, out)


def save_weights(state_dict: Mapping[str, torch.Tensor], info: Mapping[str, Any], out: str | Path) -> Path:
    """Atomically write ``state_dict`` as ``out`` (safetensors, ``info`` as its metadata) and ``info`` as the
    ``out.json`` sidecar; ``info`` must be JSON-serialisable. Returns ``out``."""
    info = json.loads(json.dumps(dict(info)))  # tuples -> lists, as the sidecar reads back
    # Own, contiguous CPU copies: safetensors refuses tensors that share memory.
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state_dict.items()}
    out = Path(out)
    payload = save(tensors, metadata={key: json.dumps(value) for key, value in info.items()})
    write_atomically(out, lambda handle: handle.write(payload))
    write_atomically(out.with_name(out.name + ".json"), lambda handle: handle.write(json.dumps(info, indent=2).encode()))
    return out


def load_gemini_unet(path: str | Path) -> tuple[GeminiUNet, dict[str, Any]]:
    """The exported backbone, weights loaded strictly, and its sidecar metadata.

    Raises:
        ValueError: the file or its sidecar is missing, or the sidecar names another format.
    """
    path = Path(path)
    sidecar = path.with_name(path.name + ".json")
    for required in (path, sidecar):
        if not required.is_file():
            raise ValueError(f"{required}: not found; a GEMINI backbone export comes with its {sidecar.name} sidecar")
    info = json.loads(sidecar.read_text())
    if info.get("format") != UNET_FORMAT:
        raise ValueError(f"{sidecar}: format {info.get('format')!r}, expected {UNET_FORMAT!r}")
    network = GeminiUNet(**{**info["kwargs"], "channels": tuple(info["kwargs"]["channels"])})
    network.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return network, info

