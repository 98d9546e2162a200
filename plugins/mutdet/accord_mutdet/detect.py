"""``accord detect CKPT IMAGE... --overlay DIR``: rotated-box detections of a trained detector.

The model is rebuilt from the checkpoint alone (:func:`accord.runs.load_run`) and must offer
``predict(images (B, 3, S, S)) -> [{"boxes": (M, 5) le90 pixels, "scores": (M,), "labels": (M,)}]``
on images prepared as in training (:func:`accord_mutdet.data.prepare_image`: longer side ``S``,
ImageNet normalisation, padding). Class names come from the model's ``class_names`` (else the run
config's, else ``class_<i>``), ``S`` from ``--image-size`` or the run config's ``image_size``.
Boxes are mapped back to original pixels. With ``--overlay DIR``, ``DIR/<stem>.png`` shows the
image with every detection above ``--score-threshold`` drawn as a rotated box with its class and
score, and ``DIR/<stem>.txt`` lists them as DOTA lines ``x1 y1 ... x4 y4 class score``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np

# Distinct colours (RGB) for up to 20 classes, then repeated.
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
           (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
           (0, 0, 128), (128, 128, 128)]


def detect_image(model: Any, rgb: np.ndarray, *, image_size: int, score_threshold: float = 0.3) -> dict[str, np.ndarray]:
    """Detections of one RGB uint8 image ``(H, W, 3)`` in its original pixels, above the threshold."""
    import torch

    from accord_mutdet.data.dataset import prepare_image

    tensor, scale = prepare_image(rgb, image_size)
    device = next((p.device for p in model.parameters()), torch.device("cpu")) if hasattr(model, "parameters") \
        else torch.device("cpu")
    with torch.no_grad():
        (result,) = model.predict(tensor[None].to(device))
    boxes = result["boxes"].detach().float().cpu().numpy().reshape(-1, 5).copy()
    scores = result["scores"].detach().float().cpu().numpy().reshape(-1)
    labels = result["labels"].detach().cpu().numpy().reshape(-1).astype(np.int64)
    boxes[:, :4] /= scale
    keep = scores >= score_threshold
    order = np.argsort(-scores[keep], kind="stable")
    return {"boxes": boxes[keep][order], "scores": scores[keep][order], "labels": labels[keep][order]}


def draw_detections(rgb: np.ndarray, detections: dict[str, np.ndarray], class_names: Sequence[str]) -> np.ndarray:
    """A copy of the image with each rotated box outlined in its class colour, labelled ``name score``."""
    import cv2
    import torch

    from accord.boxes import le90_to_corners

    canvas = np.ascontiguousarray(rgb.copy())
    corners = le90_to_corners(torch.from_numpy(detections["boxes"]).double()).numpy()
    thickness = max(1, round(max(canvas.shape[:2]) / 400))
    for points, score, label in zip(corners, detections["scores"], detections["labels"]):
        colour = PALETTE[int(label) % len(PALETTE)]
        # opencv draws through pixel centres (integers); box coordinates are pixel edges.
        cv2.polylines(canvas, [np.round((points - 0.5) * 16).astype(np.int32)], True, colour, thickness,
                      cv2.LINE_AA, shift=4)
        anchor = points[np.argmin(points[:, 1])]
        text = f"{_name(class_names, int(label))} {float(score):.2f}"
        cv2.putText(canvas, text, (int(anchor[0]), max(int(anchor[1]) - 3, 8)), cv2.FONT_HERSHEY_SIMPLEX,
                    0.3 * thickness, colour, 1, cv2.LINE_AA)
    return canvas


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else f"class_{label}"


def run_detect(checkpoint: Path, images: Sequence[Path], *, overlay: Path | None, score_threshold: float,
               image_size: int | None) -> list[dict[str, Any]]:
    """Load the run, detect on every image, write overlays; returns one summary dict per image."""
    from accord.boxes import le90_to_polygon
    from accord.runs import load_run
    from accord.utils.files import write_text_atomically
    from accord_mutdet.data.records import read_rgb, write_image

    import torch

    run = load_run(checkpoint)
    model = run.model
    if not hasattr(model, "predict"):
        raise ValueError(f"{checkpoint}: the model ({type(model).__name__}) has no predict(); "
                         "detect needs a fine-tuned mutdet detector checkpoint")
    class_names = list(getattr(model, "class_names", None) or getattr(run.config, "class_names", None) or [])
    size = image_size or getattr(run.config, "image_size", None)
    if size is None:
        raise ValueError(f"{checkpoint}: the run config has no image_size; pass --image-size")
    model.eval()
    summaries = []
    for path in images:
        rgb = read_rgb(path)
        found = detect_image(model, rgb, image_size=int(size), score_threshold=score_threshold)
        summary: dict[str, Any] = {"image": str(path), "detections": int(len(found["boxes"]))}
        if overlay is not None:
            summary["overlay"] = str(write_image(Path(overlay) / f"{Path(path).stem}.png",
                                                 draw_detections(rgb, found, class_names)))
            polygons = le90_to_polygon(torch.from_numpy(found["boxes"]).double()).numpy()
            lines = [" ".join(f"{v:.1f}" for v in polygon) + f" {_name(class_names, int(label))} {float(score):.4f}"
                     for polygon, label, score in zip(polygons, found["labels"], found["scores"])]
            write_text_atomically(Path(overlay) / f"{Path(path).stem}.txt", "".join(f"{line}\n" for line in lines))
        summaries.append(summary)
    return summaries


def add_detect_command(cli: Any) -> None:
    """Register ``accord detect`` on the root typer app."""
    import typer

    @cli.command("detect")
    def detect(
        checkpoint: Path = typer.Argument(..., help="a fine-tuned mutdet checkpoint (accord run ... task: finetune)"),
        images: List[Path] = typer.Argument(..., help="image files"),
        overlay: Optional[Path] = typer.Option(None, "--overlay", help="folder for <stem>.png overlays and <stem>.txt boxes"),
        score_threshold: float = typer.Option(0.3, "--score-threshold", help="smallest score drawn / listed"),
        image_size: Optional[int] = typer.Option(None, "--image-size", help="input side; default: the run's image_size"),
    ) -> None:
        """Rotated-box detection with a mutdet detector: one line per image, overlays with --overlay.

        Examples:

            accord detect runs/mutdet_finetune/last.pt data/DOTA/val/images/P0000.png --overlay overlays
        """
        from accord.cli import user_errors

        missing = [str(p) for p in images if not Path(p).is_file()]
        with user_errors(ValueError, FileNotFoundError):
            if missing:
                raise FileNotFoundError(f"image(s) not found: {', '.join(missing)}")
            summaries = run_detect(checkpoint, images, overlay=overlay, score_threshold=score_threshold,
                                   image_size=image_size)
        for summary in summaries:
            extra = f" -> {summary['overlay']}" if "overlay" in summary else ""
            typer.echo(f"{summary['image']}: {summary['detections']} detection(s){extra}")
