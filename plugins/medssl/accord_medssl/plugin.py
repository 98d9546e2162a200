"""The accord entry point of accord-medssl (``[project.entry-points.accord]  medssl``).

Imports stay inside the hooks: discovering the plugin costs nothing, and MONAI, nibabel and the
models are imported only when a registry is first read (``accord plugins``, ``run``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from accord import hookimpl
from accord.registry import Problem


def synth_msd(out_dir: str | Path, **options) -> Path:
    """``accord data synth medssl OUT``: MSD-layout abdomen CT phantoms (see :func:`accord_medssl.data.synth`)."""
    from accord_medssl.data import synth

    return synth(out_dir, **options)


def check_msd(root: str | Path) -> list[Problem]:
    """``accord data check medssl DIR``: an MSD dataset or a plain NIfTI folder (:func:`accord_medssl.data.check`)."""
    from accord_medssl.data import check

    return check(root)


@hookimpl
def plugin_info() -> dict[str, str]:
    return {
        "domain": "3D medical imaging",
        "description": "self-supervised CT/MR pretraining (Alice, GEMINI, GVSL) on MSD and NIfTI-folder data",
    }


@hookimpl
def register_datasets(register: Callable[..., None]) -> None:
    register(
        "msd",
        synth=synth_msd,
        check=check_msd,
        description="Medical Segmentation Decathlon layout (dataset.json, imagesTr/labelsTr/imagesTs) "
        "or a plain folder of NIfTI CTs",
    )


@hookimpl
def register_tasks(register: Callable[..., None]) -> None:
    from accord_medssl import tasks

    register("pretrain", tasks.pretrain, config=tasks.PretrainConfig,
             description="anatomy-embedding (SAM replacement) or Alice pretraining of a SwinUNETR")
    register("finetune", tasks.finetune, config=tasks.FinetuneConfig,
             description="SwinUNETR segmentation from an Alice checkpoint or scratch, best validation Dice kept")
    register("evaluate", tasks.evaluate, config=tasks.EvaluateConfig,
             description="per-class and mean Dice of fine-tuned weights, sliding-window inference")


@hookimpl
def register_benchmarks(register: Callable[..., None]) -> None:
    from accord_medssl import benchmarks

    register("segmentation", benchmarks.segmentation, config=benchmarks.MedsslBenchmarkConfig,
             description="Alice vs random init: SwinUNETR test Dice over label fractions and seeds")
    register("pretraining_speed", benchmarks.run_pretraining_speed, config=benchmarks.PretrainingSpeedConfig,
             kind="speed", description="pretraining steps per second and peak memory (alice or anatomy_embedding)")
    register("loader_throughput", benchmarks.run_loader_throughput, config=benchmarks.LoaderThroughputConfig,
             kind="speed", description="volumes per second: uncached, MONAI disk cache cold and warm")
    register("anatomy_matching", benchmarks.run_anatomy_matching, config=benchmarks.AnatomyMatchingConfig,
             kind="speed", description="anatomy-embedding hit rate and mm error on phantoms and MNI152")


@hookimpl
def register_models(register: Callable[..., None]) -> None:
    from accord_medssl.finetune import segmentation_model
    from accord_medssl.tasks import pretraining_model

    register("alice", pretraining_model, description="Alice student-teacher on SwinUNETR (pretrain, method alice)")
    register("anatomy_embedding", pretraining_model,
             description="SAM-style global + local voxel embeddings (pretrain, method anatomy_embedding)")
    register("segmentation", segmentation_model, description="SwinUNETR + DiceCE (finetune runs)")


@hookimpl
def register_config_schemas(register: Callable[..., None]) -> None:
    from accord_medssl.alice import AliceOptions
    from accord_medssl.anatomy import AnatomyPretrainingOptions
    from accord_medssl.models import SwinUNETRBackboneOptions
    from accord_medssl.views import MiningOptions

    register("alice", AliceOptions)
    register("anatomy_embedding", AnatomyPretrainingOptions)
    register("swin_unetr", SwinUNETRBackboneOptions)
    register("mining", MiningOptions)


@hookimpl
def register_exporters(register: Callable[..., None]) -> None:
    from accord_medssl.export import export_monai

    register("monai", export_monai,
             description="Alice checkpoint -> SwinUNETR state dict (+ constructor kwargs) for monai.networks.nets")
