"""The accord entry point of accord-mutdet (``[project.entry-points.accord]  mutdet``).

Imports stay inside the hooks so that discovering the plugin costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from accord import hookimpl


@hookimpl
def plugin_info() -> dict[str, str]:
    return {
        "domain": "remote sensing (aerial detection)",
        "description": "MutDet pretraining for rotated DETR: DIOR-R / DOTA data, pseudo-labels, VOC07 rotated AP",
    }


def synth_mutdet(out_dir: str | Path, **options) -> Path:
    """``accord data synth mutdet OUT``: DIOR-R and DOTA sample data (:func:`accord_mutdet.data.synth_mutdet`)."""
    from accord_mutdet.data import synth_mutdet as synth

    return synth(out_dir, **options)


def check_mutdet(root: str | Path, version: str = "1.0") -> list:
    """``accord data check mutdet DIR [version=1.5]``: DIOR-R / DOTA problems (:func:`accord_mutdet.data.check_dataset`)."""
    from accord_mutdet.data import check_dataset

    return check_dataset(root, version=str(version))


@hookimpl
def register_datasets(register: Callable[..., None]) -> None:
    register("dior_dota", synth=synth_mutdet, check=check_mutdet,
             description="DIOR-R (VOC XML with robndbox) and DOTA v1.0/v1.5 (labelTxt) oriented-box layouts")


@hookimpl
def register_tasks(register: Callable[..., None]) -> None:
    from accord_mutdet import tasks

    register("pretrain", tasks.pretrain, config=tasks.PretrainConfig,
             description="MutDet (or DETReg-style) detection pretraining on pseudo-labels, frozen backbone")
    register("finetune", tasks.finetune, config=tasks.FinetuneConfig,
             description="fine-tune the rotated DETR on DIOR-R / DOTA (label fraction, pretrained init)")
    register("evaluate", tasks.evaluate, config=tasks.EvaluateConfig,
             description="VOC07 rotated AP50 / AP75 per class of a fine-tuned checkpoint")
    from accord_mutdet.pseudo import pipeline

    register("pseudolabel", pipeline.run_pseudolabel, config=pipeline.PseudoLabelConfig,
             description="step 1: proposals -> rotated boxes, ResNet crop embeddings, PCA + spherical k-means classes")
    from accord_mutdet.data import patches

    register("split_dota", patches.run_split_dota, config=patches.SplitDotaConfig,
             description="cut a DOTA split into size/gap patches (1024/200, 800/200) with the area-ratio box rule")


@hookimpl
def register_models(register: Callable[..., None]) -> None:
    from accord_mutdet import tasks

    register("pretrain", tasks.pretrain_model, description="rotated DETR + MutDet branch (pretrain runs)")
    register("detector", tasks.detector_model, description="ARS-DETR-style rotated DETR (finetune runs)")


@hookimpl
def register_benchmarks(register: Callable[..., None]) -> None:
    from accord_mutdet import benchmarks

    register("detection", benchmarks.run_detection_benchmark, config=benchmarks.DetectionBenchmarkConfig,
             description="none vs DETReg-style vs MutDet pretraining, fine-tuned at 10% / 100% labels, AP50/AP75")
    register("pretrain_speed", benchmarks.run_pretrain_speed, config=benchmarks.PretrainSpeedConfig, kind="speed",
             description="MutDet pretraining s/step and peak memory at 1024^2, batch 2, 2+2 and 6+6 layers")
    from accord_mutdet import evaluation

    register("eval_iou", evaluation.run_eval_iou, config=evaluation.EvalIouConfig, kind="speed",
             description="rotated IoU for VOC07 evaluation: mmcv box_iou_rotated vs a shapely polygon loop")


@hookimpl
def register_config_schemas(register: Callable[..., None]) -> None:
    from accord_mutdet.models import DetectorOptions, MutDetOptions

    register("detector", DetectorOptions)
    register("mutdet", MutDetOptions)


@hookimpl
def register_commands(cli) -> None:  # noqa: ANN001 - typer.Typer, imported lazily
    from accord_mutdet.detect import add_detect_command

    add_detect_command(cli)
