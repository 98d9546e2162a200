"""Pretrained weights into the fine-tuning detector, with a checked, reported mapping.

A MutDet or DETReg-style pretraining checkpoint holds the whole :class:`RotatedDETR` state. For
fine-tuning (spec §8):

* ``mutdet.*`` (enhancement, embedding MLPs, second memory projection) is dropped: the plain
  detector has no such modules;
* the class-sized modules (``cls_heads.*``, ``label_embed.*``: 256 pseudo-classes) are
  re-initialised for the downstream classes;
* every other tensor must land on a tensor of the same name and shape. The one allowed gap is the
  number of layers: the reference pretrains 2 + 2 layers and fine-tunes 6 + 6, so with
  ``layer_mapping="prefix"`` encoder / decoder layer ``i`` (and decoder head ``i``) load where both
  models have it and the rest keeps its fresh initialisation; ``"strict"`` refuses any layer-count
  difference. The encoder-proposal heads are separate modules (``enc_*``), so they never land on a
  decoder layer's head as in the reference's list layout.

Anything else (a missing neck tensor, a shape mismatch, an unknown key) is an error naming the
tensors: the mapping is never silently partial. The report lists what was loaded, dropped,
re-initialised and left fresh.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from torch import nn

from accord.training import load_checkpoint

from accord_mutdet.models import CLASS_HEAD_PREFIXES, MUTDET_PREFIX

__all__ = ["LayerMapping", "load_pretrained_detector"]

LayerMapping = Literal["prefix", "strict"]
_LAYERED = re.compile(r"^(encoder\.layers|decoder|cls_heads|reg_heads|angle_heads)\.(\d+)\.")


def _layer(key: str) -> tuple[str, int] | None:
    match = _LAYERED.match(key)
    return (match.group(1), int(match.group(2))) if match else None


def _summary(keys: list[str]) -> list[str]:
    """Keys grouped by layered module, e.g. ``decoder.2-5`` instead of hundreds of names."""
    groups: dict[str, list[int]] = {}
    plain = []
    for key in keys:
        layer = _layer(key)
        if layer is None:
            plain.append(key)
        else:
            groups.setdefault(layer[0], []).append(layer[1])
    return [f"{name}.{min(ids)}-{max(ids)}" if min(ids) != max(ids) else f"{name}.{ids[0]}"
            for name, ids in groups.items()] + plain


def load_pretrained_detector(model: nn.Module, checkpoint: str | Path,
                             layer_mapping: LayerMapping = "prefix") -> dict[str, Any]:
    """Copy a pretraining checkpoint into a (plain) detector, as described in the module docstring.

    Args:
        model: the fine-tuning :class:`~accord_mutdet.models.RotatedDETR`.
        checkpoint: an accord checkpoint of a mutdet ``pretrain`` run.
        layer_mapping: ``"prefix"`` or ``"strict"``.

    Returns:
        The report: ``checkpoint``, ``step``, ``loaded`` (count), ``dropped``, ``reinitialised``,
        ``fresh_layers`` (grouped names), ``unused_layers`` (checkpoint layers the model lacks).

    Raises:
        ValueError: not a mutdet detector checkpoint, or a tensor does not map (named).
    """
    if layer_mapping not in ("prefix", "strict"):
        raise ValueError(f"layer_mapping: expected 'prefix' or 'strict', got {layer_mapping!r}")
    state = load_checkpoint(checkpoint)
    source = state["model"]
    if "query_embed.weight" not in source or "neck.convs.0.conv.weight" not in source:
        raise ValueError(f"{checkpoint}: not a mutdet detector checkpoint (no query_embed / neck tensors)")
    target = model.state_dict()
    dropped = [k for k in source if k.startswith(MUTDET_PREFIX)]
    reinitialised = [k for k in target if k.startswith(CLASS_HEAD_PREFIXES)]
    loadable, unused, problems = {}, [], []
    for key, value in source.items():
        if key.startswith(MUTDET_PREFIX) or key.startswith(CLASS_HEAD_PREFIXES):
            continue
        if key in target:
            if target[key].shape != value.shape:
                problems.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}")
            else:
                loadable[key] = value
        elif _layer(key) is not None:
            unused.append(key)
        else:
            problems.append(f"{key}: in the checkpoint, not in the model")
    fresh = []
    for key in target:
        if key in loadable or key.startswith(CLASS_HEAD_PREFIXES):
            continue
        if _layer(key) is not None:
            fresh.append(key)
        else:
            problems.append(f"{key}: in the model, not in the checkpoint")
    if layer_mapping == "strict" and (fresh or unused):
        problems.append(f"layer counts differ (layer_mapping='strict'): model-only {_summary(fresh)}, "
                        f"checkpoint-only {_summary(unused)}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ValueError(f"{checkpoint}: pretrained weights do not map onto the detector "
                         f"(set model to the pretraining architecture apart from the layer counts): {shown}")
    model.load_state_dict(loadable, strict=False)
    return {"checkpoint": str(Path(checkpoint).absolute()), "step": int(state["step"]), "loaded": len(loadable),
            "dropped": sorted({MUTDET_PREFIX + k.split(".")[1] for k in dropped}),
            "reinitialised": _summary(reinitialised), "fresh_layers": _summary(fresh),
            "unused_layers": _summary(unused)}
