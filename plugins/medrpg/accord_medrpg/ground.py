"""Grounding from the command line: ``accord ground``.

``accord ground CKPT --image X.png --phrase "..."`` prints the box in pixels of the original image;
``--csv FILE`` grounds a file of (image, phrase) rows, with the GT box when the rows have one;
``--overlay DIR`` writes one PNG per query: the image, the [REG] token's attention over the visual
grid as a heat map, the predicted box (red) and the GT box (green) when known.

This module is imported when the ``accord`` command starts: torch, OpenCV and the model load
inside the commands.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from accord.cli import user_errors
from accord.errors import UserError

__all__ = ["GroundingQuery", "add_commands", "ground_queries", "read_queries"]

#: Long side of an overlay PNG at most (MIMIC radiographs are ~3000 pixels).
OVERLAY_MAX_SIDE = 1024
_IMAGE_COLUMNS = ("image", "path")
_PHRASE_COLUMNS = ("phrase", "label_text")


@dataclass
class GroundingQuery:
    """One image and phrase to ground; ``box`` is the GT ``[x, y, w, h]`` in original pixels when known."""

    image: Path
    phrase: str
    box: list[float] | None = None


def read_queries(path: str | Path, images: str | Path | None = None) -> list[GroundingQuery]:
    """Rows of a CSV with ``image`` (or ``path``) and ``phrase`` (or ``label_text``), optionally ``x, y, w, h``.

    An MS-CXR annotation CSV qualifies. Relative image paths are resolved against ``images``
    (default: the CSV's directory).

    Raises:
        UserError: missing columns, an empty phrase, a non-numeric box; the message names the row.
    """
    path = Path(path)
    base = Path(images) if images is not None else path.parent
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            rows = list(reader)
    except OSError as exc:
        raise UserError(f"{path}: cannot read the query CSV ({exc.strerror or exc})") from None
    image_column = next((c for c in _IMAGE_COLUMNS if c in columns), None)
    phrase_column = next((c for c in _PHRASE_COLUMNS if c in columns), None)
    if image_column is None or phrase_column is None:
        raise UserError(f"{path}: needs columns image (or path) and phrase (or label_text); found {columns}")
    has_box = all(k in columns for k in "xywh")
    queries = []
    for number, row in enumerate(rows, start=2):
        phrase = (row[phrase_column] or "").strip()
        if not phrase:
            raise UserError(f"{path}:{number}: empty phrase")
        box = None
        if has_box:
            try:
                box = [float(row[k]) for k in "xywh"]
            except (TypeError, ValueError):
                raise UserError(f"{path}:{number}: x, y, w, h must be numbers, got "
                                f"{[row[k] for k in 'xywh']}") from None
        image = Path(row[image_column])
        queries.append(GroundingQuery(image if image.is_absolute() else base / image, phrase, box))
    if not queries:
        raise UserError(f"{path}: no query rows")
    return queries


def _canvas_size(model: Any) -> int:
    """The model's square canvas side (``model.options.image_size``; 640, the reference's, otherwise)."""
    return int(getattr(getattr(model, "options", None), "image_size", 640))


def ground_queries(model: Any, queries: Sequence[GroundingQuery], *, overlay_dir: str | Path | None = None,
                   image_size: int | None = None, device: str = "cpu") -> list[dict[str, Any]]:
    """Ground each query with a model, optionally writing overlays.

    Args:
        model: ``model(image (1, 3, S, S), image_mask (1, S, S), [phrase]) -> {"pred_box": (1, 4),
            "reg_attention": (1, G*G)}`` (normalised canvas ``cx, cy, w, h``; attention needed for
            overlays only).
        queries: images and phrases.
        overlay_dir: write ``<n>_<image stem>.png`` overlays there.
        image_size: canvas side (default: the model's, see :func:`_canvas_size`).
        device: torch device.

    Returns:
        Per query ``{"image", "phrase", "box": [x, y, w, h], "box_xyxy"}`` in original pixels, plus
        ``"gt_box"`` and ``"iou"`` with a GT, and ``"overlay"`` with ``overlay_dir``.
    """
    import numpy as np
    import torch

    from accord.boxes import box_iou, xywh_to_xyxy, xyxy_to_xywh

    from accord_medrpg.data.dataset import canvas_to_original, normalise_image
    from accord_medrpg.data.images import read_image
    from accord_medrpg.data.transforms import place_on_canvas

    size = image_size or _canvas_size(model)
    model = model.to(device).eval()
    results = []
    for number, query in enumerate(queries):
        grey = read_image(query.image)
        height, width = grey.shape
        canvas, padding, _, placement = place_on_canvas(grey, torch.zeros(0, 4), query.phrase, size, augment=False,
                                                        rng=np.random.default_rng(0))
        with torch.no_grad():
            output = model(normalise_image(canvas, padding)[None].to(device),
                           torch.from_numpy(padding)[None].to(device), [query.phrase])
        meta = {"orig_width": width, "orig_height": height, "scale_x": placement.scale_x,
                "scale_y": placement.scale_y, "offset_x": placement.offset_x, "offset_y": placement.offset_y,
                "canvas_size": size}
        xyxy = canvas_to_original(output["pred_box"][0].detach().cpu(), meta)
        result: dict[str, Any] = {"image": str(query.image), "phrase": query.phrase,
                                  "box": [round(v, 1) for v in xyxy_to_xywh(xyxy).tolist()],
                                  "box_xyxy": [round(v, 1) for v in xyxy.tolist()]}
        gt = None
        if query.box is not None:
            gt = xywh_to_xyxy(torch.tensor(query.box, dtype=torch.float64))
            result["gt_box"] = query.box
            result["iou"] = round(float(box_iou(xyxy[None], gt[None], aligned=True)[0]), 4)
        if overlay_dir is not None:
            attention = output.get("reg_attention")
            if attention is None:
                raise ValueError("the model returns no 'reg_attention'; overlays need the [REG] attention map")
            path = Path(overlay_dir) / f"{number:04d}_{query.image.stem}.png"
            result["overlay"] = str(_write_overlay(path, grey, attention[0].detach().cpu().numpy(), placement,
                                                   size, xyxy.numpy(), None if gt is None else gt.numpy(),
                                                   query.phrase))
        results.append(result)
    return results


def _write_overlay(path: Path, grey, attention, placement, size: int, pred, gt, phrase: str) -> Path:
    """The image with the [REG] attention heat map, the predicted (red) and GT (green) boxes and the phrase."""
    import cv2
    import numpy as np

    from accord.utils.files import write_atomically

    height, width = grey.shape
    grid = round(len(attention) ** 0.5)
    if grid * grid != len(attention):
        raise ValueError(f"reg_attention has {len(attention)} entries; expected a square grid of visual tokens")
    heat = cv2.resize(attention.reshape(grid, grid).astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    # The image's region of the canvas, back at the image's own size.
    left, top = placement.offset_x, placement.offset_y
    right, bottom = left + width * placement.scale_x, top + height * placement.scale_y
    heat = heat[int(round(top)):int(round(bottom)), int(round(left)):int(round(right))]
    shown = min(1.0, OVERLAY_MAX_SIDE / max(height, width))
    out_w, out_h = max(1, round(width * shown)), max(1, round(height * shown))
    heat = cv2.resize(heat, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
    colour = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    base = cv2.cvtColor(np.round(cv2.resize(grey, (out_w, out_h), interpolation=cv2.INTER_AREA) * 255)
                        .astype(np.uint8), cv2.COLOR_GRAY2BGR)
    blended = cv2.addWeighted(base, 0.65, colour, 0.35, 0.0)
    thickness = max(1, round(max(out_w, out_h) / 256))
    for box, bgr in ((gt, (0, 200, 0)), (pred, (0, 0, 255))):
        if box is not None:
            x1, y1, x2, y2 = (int(round(v * shown)) for v in box)
            cv2.rectangle(blended, (x1, y1), (x2, y2), bgr, thickness)
    scale = max(0.35, max(out_w, out_h) / 900)
    cv2.putText(blended, phrase, (4, out_h - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness,
                cv2.LINE_AA)
    ok, encoded = cv2.imencode(".png", blended)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    return write_atomically(path, lambda handle: handle.write(encoded.tobytes()))


def ground_command(
    checkpoint: Path = typer.Argument(..., help="a medrpg train checkpoint (best_miou.pt or checkpoints/step_*.pt)"),
    image: Optional[Path] = typer.Option(None, "--image", help="a PNG / JPEG / DICOM chest X-ray"),
    phrase: Optional[str] = typer.Option(None, "--phrase", help="the phrase to ground in --image"),
    csv_file: Optional[Path] = typer.Option(None, "--csv", help="CSV of image,phrase[,x,y,w,h] rows (or MS-CXR's CSV)"),
    images: Optional[Path] = typer.Option(
        None, "--images", help="root of relative --csv image paths (default: the CSV's folder)"),
    overlay: Optional[Path] = typer.Option(
        None, "--overlay", help="write PNG overlays (box, GT, [REG] attention) here"),
    device: str = typer.Option("cpu", "--device", help="torch device"),
) -> None:
    """Ground phrases in chest X-rays with a trained MedRPG / TransVG checkpoint.

    Prints one JSON line per query: the box as [x, y, w, h] and x1, y1, x2, y2 in pixels of the
    original image (and the IoU when the CSV has the GT box).

    Examples:

        accord ground runs/medrpg/best_miou.pt --image cxr.dcm --phrase "large right pneumothorax"

        accord ground runs/medrpg/best_miou.pt --csv queries.csv --overlay overlays/
    """
    with user_errors(FileNotFoundError, ValueError):
        if (csv_file is None) == (image is None):
            raise UserError("give either --image with --phrase, or --csv")
        if image is not None and not (phrase or "").strip():
            raise UserError("--image needs a non-empty --phrase")
        if csv_file is not None and phrase is not None:
            raise UserError("--phrase goes with --image; --csv rows carry their own phrases")
        if csv_file is None and images is not None:
            raise UserError("--images applies to --csv rows only")
        if not checkpoint.is_file():
            raise UserError(f"{checkpoint}: checkpoint file not found")
        queries = read_queries(csv_file, images) if csv_file else [GroundingQuery(image, phrase.strip())]
        from accord.runs import load_run

        model = load_run(checkpoint).model
        try:
            results = ground_queries(model, queries, overlay_dir=overlay, device=device)
        except OSError as exc:
            raise UserError(f"{exc.filename or overlay}: cannot write ({exc.strerror or exc})") from exc
    for result in results:
        typer.echo(json.dumps(result))
    scored = [r["iou"] for r in results if "iou" in r]
    if scored:
        accuracy = sum(iou >= 0.5 for iou in scored) / len(scored)
        typer.echo(f"{len(scored)} with GT: Acc@0.5 {100 * accuracy:.2f}%, mIoU {100 * sum(scored) / len(scored):.2f}%",
                   err=True)


def add_commands(cli: typer.Typer) -> None:
    """``register_commands``: ``accord ground``."""
    cli.command("ground")(ground_command)
