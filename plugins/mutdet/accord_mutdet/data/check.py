"""``accord data check mutdet DIR``: every problem of a DIOR-R or DOTA folder, one line each.

``DIR`` may be a DIOR-R root (it has ``ImageSets/Main``), a DOTA root (it has
``<split>/images``) or a folder holding such roots (what ``accord data synth mutdet`` writes).
Problems found: unreadable images, images without annotation file (and label files without
image), unreadable XML, unknown class names, malformed DOTA lines or ``robndbox`` fields,
degenerate or self-intersecting polygons and boxes outside the image (see
:func:`accord_mutdet.data.records.polygon_problems`). :func:`load_checked` runs the same checks
for one split and raises them, so training refuses bad data with the same messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from accord.registry import Problem
from accord_mutdet.data.dior import ANNOTATION_DIR, dior_image_path, load_dior_r, parse_dior_xml, split_ids
from accord_mutdet.data.dota import dota_classes, dota_images, load_dota, parse_dota_labels
from accord_mutdet.data.records import AnnotationError, ImageRecord, polygon_problems

Layout = Literal["auto", "dior_r", "dota"]


def is_dior_root(path: Path) -> bool:
    return (Path(path) / "ImageSets" / "Main").is_dir()


def is_dota_root(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and not is_dior_root(path) and any((child / "images").is_dir() for child in path.iterdir()
                                                            if child.is_dir())


def _read_image(path: Path) -> tuple[tuple[int, int] | None, list[Problem]]:
    """Decode an image fully; ``((width, height), [])`` or ``(None, [problem])``."""
    from PIL import Image

    if not path.is_file():
        return None, [Problem(str(path), "missing image")]
    try:
        with Image.open(path) as image:
            image.load()
            return image.size, []
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError) for bad files
        return None, [Problem(str(path), f"unreadable image: {exc}")]


def check_dior_r(root: str | Path, splits: list[str] | None = None) -> list[Problem]:
    """Problems of a DIOR-R root; ``splits`` default: every ``ImageSets/Main/*.txt``."""
    root = Path(root)
    split_dir = root / "ImageSets" / "Main"
    names = splits if splits is not None else sorted(p.stem for p in split_dir.glob("*.txt"))
    if not names:
        return [Problem(str(split_dir), "no split files (expected train.txt, val.txt, trainval.txt, test.txt)")]
    problems: list[Problem] = []
    seen: set[str] = set()
    for split in names:
        try:
            ids = split_ids(root, split)
        except FileNotFoundError as exc:
            problems.append(Problem(str(split_dir / f"{split}.txt"), str(exc).split(": ", 1)[-1]))
            continue
        for image_id in ids:
            if image_id in seen:
                continue
            seen.add(image_id)
            image = dior_image_path(root, split, image_id)
            size, image_problems = _read_image(image)
            problems += image_problems
            xml = root / ANNOTATION_DIR / f"{image_id}.xml"
            if not xml.is_file():
                problems.append(Problem(str(xml), f"missing annotation file for image {image.name}"))
                continue
            parsed = parse_dior_xml(xml)
            problems += parsed.problems
            if parsed.width is None:
                continue
            if size is not None and size != (parsed.width, parsed.height):
                problems.append(Problem(str(xml), f"<size> {parsed.width}x{parsed.height} differs from the image's "
                                                  f"{size[0]}x{size[1]}"))
            for polygon, line in zip(parsed.polygons, parsed.line_numbers):
                problems += polygon_problems(polygon, parsed.width, parsed.height, f"{xml}:{line}")
    return problems


def check_dota(root: str | Path, splits: list[str] | None = None, *, version: str = "1.0") -> list[Problem]:
    """Problems of a DOTA root; ``splits`` default: every folder with an ``images`` folder."""
    root = Path(root)
    classes = dota_classes(version)
    names = splits if splits is not None else sorted(p.name for p in root.iterdir() if (p / "images").is_dir())
    problems: list[Problem] = []
    for split in names:
        image_dir, label_dir = root / split / "images", root / split / "labelTxt"
        if not image_dir.is_dir():
            problems.append(Problem(str(image_dir), "missing DOTA images folder"))
            continue
        images = dota_images(image_dir)
        for image in images:
            size, image_problems = _read_image(image)
            problems += image_problems
            if not label_dir.is_dir():
                continue
            label_file = label_dir / f"{image.stem}.txt"
            if not label_file.is_file():
                problems.append(Problem(str(label_file), f"missing annotation file for image {image.name}"))
                continue
            parsed = parse_dota_labels(label_file, classes)
            problems += parsed.problems
            if size is None:
                continue
            for polygon, line in zip(parsed.polygons, parsed.line_numbers):
                problems += polygon_problems(polygon, size[0], size[1], f"{label_file}:{line}")
        if label_dir.is_dir():
            stems = {image.stem for image in images}
            problems += [Problem(str(label), "label file without image") for label in sorted(label_dir.glob("*.txt"))
                         if label.stem not in stems]
    return problems


def check_dataset(root: str | Path, *, version: str = "1.0") -> list[Problem]:
    """``accord data check mutdet DIR [version=1.5]``: the problems of every dataset found under ``DIR``."""
    root = Path(root)
    if not root.is_dir():
        return [Problem(str(root), "not a directory")]
    if is_dior_root(root):
        return check_dior_r(root)
    if is_dota_root(root):
        return check_dota(root, version=version)
    problems: list[Problem] = []
    found = False
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if is_dior_root(child):
            found, problems = True, problems + check_dior_r(child)
        elif is_dota_root(child):
            found, problems = True, problems + check_dota(child, version=version)
    if not found:
        return [Problem(str(root), "no DIOR-R root (ImageSets/Main) or DOTA root (<split>/images) found here "
                                   "or one level below")]
    return problems


def load_checked(root: str | Path, split: str, *, layout: Layout = "auto", version: str = "1.0") -> list[ImageRecord]:
    """Check one split of a DIOR-R or DOTA root, then read it.

    Args:
        root: a DIOR-R or DOTA root.
        split: the split to read (``train``, ``trainval``, ``test``, ...).
        layout: ``"dior_r"``, ``"dota"`` or ``"auto"`` (from the folder structure).
        version: DOTA version (``"1.0"`` or ``"1.5"``) for the allowed class names.

    Raises:
        AnnotationError: the problems ``accord data check mutdet`` reports for this split, one per line.
        FileNotFoundError: ``root`` is neither layout.
    """
    root = Path(root)
    if layout == "auto":
        layout = "dior_r" if is_dior_root(root) else "dota" if is_dota_root(root) else None  # type: ignore[assignment]
        if layout is None:
            raise FileNotFoundError(f"{root}: neither a DIOR-R root (ImageSets/Main) nor a DOTA root (<split>/images)")
    if layout == "dior_r":
        problems = check_dior_r(root, [split])
    else:
        problems = check_dota(root, [split], version=version)
    if problems:
        raise AnnotationError(problems)
    return load_dior_r(root, split) if layout == "dior_r" else load_dota(root, split, version=version)
