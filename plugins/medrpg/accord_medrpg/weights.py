"""Initial weights for MedRPG training from local files: TransVG, DETR-R50 and BERT.

Nothing is downloaded. The key mapping from the reference checkpoints onto :class:`TransVG`:

=====================================================  ==============================================
reference key (TransVG / MedRPG ``{"model": ...}``)      accord_medrpg key
=====================================================  ==============================================
``visumodel.backbone.0.body.<resnet key>``              ``visual.backbone.body.<resnet key>``
``visumodel.input_proj.<p>``                            ``visual.input_proj.<p>``
``visumodel.transformer.encoder.layers.<i>.<p>``        ``visual.encoder.layers.<i>.<p>``
``textmodel.bert.<p>`` (``pooler.*`` dropped)           ``text.bert.<p>``
``vl_transformer.encoder.layers.<i>.<p>``               ``vl_transformer.layers.<i>.<p>``
``bbox_embed.layers.<0|1|2>.<p>``                       ``bbox_embed.layers.layers.<0|2|4>.<p>``
``visu_proj``, ``text_proj``, ``reg_token``,            unchanged
``vl_pos_embed``
=====================================================  ==============================================

A DETR checkpoint (``detr-r50.pth``) gives the visual branch only: ``backbone.0.body.*``,
``input_proj.*`` and ``transformer.encoder.layers.*`` map as above; its decoder, query embedding
and heads are ignored. ``num_batches_tracked`` buffers (torchvision BatchNorm) are dropped, since the
backbone's BatchNorm is frozen.

Strict: every entry of the target part of the model must come from the file with the same shape,
and every entry of the file must map somewhere (except the ignored ones); otherwise one
``ValueError`` names the file and the first offending keys. Files are read with
``torch.load(weights_only=True)``; the reference stores its ``argparse.Namespace`` of options beside
the weights, the one non-tensor class allowed.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch import nn

__all__ = ["map_transvg_key", "map_detr_key", "load_transvg", "load_detr", "load_bert", "read_state_dict"]

_TRANSVG_RULES = [
    (r"^visumodel\.backbone\.0\.body\.", "visual.backbone.body."),
    (r"^visumodel\.input_proj\.", "visual.input_proj."),
    (r"^visumodel\.transformer\.encoder\.layers\.", "visual.encoder.layers."),
    (r"^textmodel\.bert\.", "text.bert."),
    (r"^vl_transformer\.encoder\.layers\.", "vl_transformer.layers."),
    (r"^(visu_proj|text_proj|reg_token|vl_pos_embed)\.", r"\1."),
]
_DETR_RULES = [
    (r"^backbone\.0\.body\.", "visual.backbone.body."),
    (r"^input_proj\.", "visual.input_proj."),
    (r"^transformer\.encoder\.layers\.", "visual.encoder.layers."),
]
_DROPPED = re.compile(r"(num_batches_tracked$|^textmodel\.bert\.pooler\.)")
_DETR_IGNORED = re.compile(r"^(transformer\.decoder\.|query_embed\.|class_embed\.|bbox_embed\.)")


def _apply(rules: list[tuple[str, str]], key: str) -> str | None:
    for pattern, replacement in rules:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def map_transvg_key(key: str) -> str | None:
    """The model key of a TransVG / MedRPG checkpoint key (``None``: not a model weight we know)."""
    box_layer = re.match(r"^bbox_embed\.layers\.(\d)\.(.+)$", key)
    if box_layer:  # the reference's MLP has no activation modules between its linears
        return f"bbox_embed.layers.{2 * int(box_layer.group(1))}.{box_layer.group(2)}"
    return _apply(_TRANSVG_RULES, key)


def map_detr_key(key: str) -> str | None:
    """The model key of a DETR checkpoint key (``None``: not part of the visual branch)."""
    return _apply(_DETR_RULES, key)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``model`` state dict of a reference checkpoint (or a bare state dict), safely loaded."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise ValueError(f"{path}: not a loadable weights-only torch checkpoint ({exc})".replace("\n", " ")) from None
    state = content.get("model", content) if isinstance(content, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors or {{'model': state dict}}")
    return state


def _load_mapped(model: nn.Module, path: Path, mapped: dict[str, torch.Tensor], unknown: list[str],
                 prefixes: tuple[str, ...]) -> list[str]:
    target = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} entries map to nothing: {', '.join(unknown[:3])}")
    extra = [k for k in mapped if k not in target]
    if extra:
        problems.append(f"{len(extra)} mapped entries are not in the model: {', '.join(extra[:3])}")
    missing = [k for k in target if k not in mapped]
    if missing:
        problems.append(f"{len(missing)} model entries are missing from the file: {', '.join(missing[:3])}")
    shapes = [f"{k} {tuple(mapped[k].shape)} in the file, {tuple(v.shape)} in the model"
              for k, v in target.items() if k in mapped and mapped[k].shape != v.shape]
    if shapes:
        problems.append(f"{len(shapes)} entries of another shape: {', '.join(shapes[:3])}")
    if problems:
        raise ValueError(f"{path}: does not fit the model ({'; '.join(problems)}); was it built with the "
                         "same image_size, widths and layer counts (and bert_path for the BERT part)?")
    model.load_state_dict(mapped, strict=False)
    return sorted(mapped)


def _mapped_state(path: Path, map_key, skip) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``(model-named tensors, checkpoint keys with no mapping)`` of ``path``, ``skip(key)`` ones left out."""
    mapped, unknown = {}, []
    for key, value in read_state_dict(path).items():
        if skip(key):
            continue
        target = map_key(key)
        if target is None:
            unknown.append(key)
        else:
            mapped[target] = value
    return mapped, unknown


def load_transvg(model: nn.Module, path: str | Path) -> list[str]:
    """Load a whole TransVG / MedRPG checkpoint into ``model`` (strict, see the module). Returns the keys loaded."""
    path = Path(path)
    mapped, unknown = _mapped_state(path, map_transvg_key, lambda key: _DROPPED.search(key))
    return _load_mapped(model, path, mapped, unknown, ("",))


def load_detr(model: nn.Module, path: str | Path) -> list[str]:
    """Load the visual branch (ResNet, ``input_proj``, encoder) from a DETR checkpoint. Returns the keys loaded."""
    path = Path(path)
    mapped, unknown = _mapped_state(path, map_detr_key,
                                    lambda key: _DROPPED.search(key) or _DETR_IGNORED.search(key))
    return _load_mapped(model, path, mapped, unknown, ("visual.",))


def load_bert(model: nn.Module, path: str | Path) -> None:
    """Load ``model.text.bert`` from a local ``bert-base-uncased`` folder (transformers format, no pooler)."""
    from transformers import BertModel

    try:
        pretrained = BertModel.from_pretrained(str(path), add_pooling_layer=False, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a local BERT folder with weights ({exc})".replace("\n", " ")) from None
    result = model.text.bert.load_state_dict(pretrained.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: BERT weights do not fit the model (missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]})")
