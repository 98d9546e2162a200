"""DIOR-R and DOTA data for mutdet: readers, checks, patch splitting, sample data and the training dataset.

Every reader returns :class:`ImageRecord` s (le90 boxes in original pixels, class names, difficult
flags); see :mod:`accord_mutdet.data.records` for the format, :mod:`~accord_mutdet.data.dior` and
:mod:`~accord_mutdet.data.dota` for the on-disk layouts.
"""

from accord_mutdet.data.check import check_dataset, check_dior_r, check_dota, load_checked
from accord_mutdet.data.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DetectionDataset,
    collate_detection,
    flip_boxes,
    prepare_image,
    rot90_boxes,
)
from accord_mutdet.data.dior import load_dior_r, parse_dior_xml, write_dior_xml
from accord_mutdet.data.dota import dota_classes, load_dota, parse_dota_labels, write_dota_labels
from accord_mutdet.data.patches import (
    Patch,
    merge_patch_detections,
    parse_patch_name,
    split_record,
    window_starts,
    write_patches,
)
from accord_mutdet.data.records import (
    DIOR_R_CLASSES,
    DOTA_V1_CLASSES,
    DOTA_V15_CLASSES,
    AnnotationError,
    ImageRecord,
    polygons_to_boxes,
    read_rgb,
)
from accord_mutdet.data.synth import SYNTH_CLASSES, synth_mutdet

__all__ = [
    "DIOR_R_CLASSES", "DOTA_V1_CLASSES", "DOTA_V15_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD", "SYNTH_CLASSES",
    "AnnotationError", "DetectionDataset", "ImageRecord", "Patch",
    "check_dataset", "check_dior_r", "check_dota", "collate_detection", "dota_classes", "flip_boxes",
    "load_checked", "load_dior_r", "load_dota", "merge_patch_detections", "parse_dior_xml", "parse_dota_labels",
    "parse_patch_name", "polygons_to_boxes", "prepare_image", "read_rgb", "rot90_boxes", "split_record",
    "synth_mutdet", "window_starts", "write_dior_xml", "write_dota_labels", "write_patches",
]
