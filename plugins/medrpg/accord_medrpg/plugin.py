"""The accord entry point of accord-medrpg (``[project.entry-points.accord]  medrpg``).

Imports stay inside the hooks so that discovering the plugin costs nothing.
"""

from __future__ import annotations

from accord import hookimpl


@hookimpl
def plugin_info() -> dict[str, str]:
    return {
        "domain": "medical vision-language (chest X-ray)",
        "description": "MedRPG phrase grounding: MS-CXR data, TransVG + TaCo region-phrase context contrast",
    }


def synth_mscxr(out_dir, **options):
    """``accord data synth medrpg OUT``: synthetic radiographs in the MS-CXR layout (:func:`accord_medrpg.data.synth`)."""
    from accord_medrpg.data import synth

    return synth(out_dir, **options)


def check_mscxr(root, **options):
    """``accord data check medrpg DIR``: an MS-CXR root or a converted directory (:func:`accord_medrpg.data.check`)."""
    from accord_medrpg.data import check

    return check(root, **options)


def convert_mscxr(source, out_dir, *, images=None, seed: int = 0) -> str:
    """``accord data convert medrpg SRC OUT [images=DIR] [seed=N]``: one JSONL per split
    (:func:`accord_medrpg.data.mscxr.convert`); returns the summary line."""
    from accord_medrpg.data.mscxr import convert

    summary = convert(source, out_dir, images=images, seed=seed)
    counts = ", ".join(f"{split} {n}" for split, n in summary["records"].items())
    left_out = f"; {summary['left_out']} CSV row(s) not in the reference split files" if summary["left_out"] else ""
    return f"wrote {out_dir}: {counts} records{left_out}"


@hookimpl
def register_datasets(register) -> None:
    register("mscxr", synth=synth_mscxr, check=check_mscxr, convert=convert_mscxr,
             description="MS-CXR: annotation CSV + MIMIC-CXR-JPG / DICOM images (+ MedRPG split files), "
                         "or its converted train/val/test.jsonl")


@hookimpl
def register_commands(cli) -> None:
    from accord_medrpg.ground import add_commands

    add_commands(cli)


@hookimpl
def register_tasks(register) -> None:
    from accord_medrpg.tasks import EvaluateConfig, TrainConfig, evaluate, train

    register("train", train, config=TrainConfig,
             description="TransVG phrase grounding with TaCo (MedRPG); best val mIoU kept, scored on test")
    register("evaluate", evaluate, config=EvaluateConfig,
             description="Acc@0.5, mIoU and per-category scores of a train checkpoint on one split")


@hookimpl
def register_models(register) -> None:
    from accord_medrpg.tasks import transvg_model

    register("transvg", transvg_model, description="TransVG (ResNet + DETR encoder, BERT, VL encoder, box MLP) + TaCo")


@hookimpl
def register_benchmarks(register) -> None:
    from accord_medrpg.benchmarks import GroundingBenchmarkConfig, SpeedBenchmarkConfig, run_grounding, run_speed

    register("grounding", run_grounding, config=GroundingBenchmarkConfig,
             description="TransVG vs MedRPG (TaCo) from the same initialisation over seeds: Acc@0.5 / mIoU, "
                         "per category, beside the paper's MS-CXR table")
    register("speed", run_speed, config=SpeedBenchmarkConfig, kind="speed",
             description="training s/step and peak memory at 640^2 batch 8, inference latency, TaCo's share")


@hookimpl
def register_config_schemas(register) -> None:
    from accord_medrpg.models import TacoOptions, TransVGOptions

    register("transvg", TransVGOptions)
    register("taco", TacoOptions)
