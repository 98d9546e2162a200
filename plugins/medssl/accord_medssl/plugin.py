"""The accord entry point of accord-medssl (``[project.entry-points.accord]  medssl``).

Imports stay inside the hooks: discovering the plugin costs nothing, and MONAI, nibabel and the
models are imported only when a registry is first read (``accord plugins``, ``run``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from accord import hookimpl
from accord.registry import Problem

if TYPE_CHECKING:
    from torch import nn


def synth_msd(out_dir: str | Path, **options) -> Path:
    """``accord data synth medssl OUT``: MSD-layout abdomen CT phantoms (see :func:`accord_medssl.data.synth`)."""
    from accord_medssl.data import synth

    return synth(out_dir, **options)


def check_msd(root: str | Path) -> list[Problem]:
    """``accord data check medssl DIR``: an MSD dataset or a plain NIfTI folder (:func:`accord_medssl.data.check`)."""
    from accord_medssl.data import check

    return check(root)


def alice_model(**options) -> nn.Module:
    """Model ``medssl.alice``: :class:`~accord_medssl.alice.AliceModel` from :class:`AliceOptions` fields."""
    from accord_medssl.alice import AliceModel, AliceOptions

    return AliceModel(AliceOptions(**options))


def anatomy_embedding_model(**options) -> nn.Module:
    """Model ``medssl.anatomy_embedding``: the SAM-style embedding network from its option fields."""
    from accord_medssl.anatomy import AnatomyEmbeddingModel, AnatomyEmbeddingOptions

    return AnatomyEmbeddingModel(AnatomyEmbeddingOptions(**options))


def swin_unetr_backbone(**options) -> nn.Module:
    """Model ``medssl.swin_unetr_backbone``: SwinUNETR exposing pooled/encoder/decoder tokens."""
    from accord_medssl.models import SwinUNETRBackbone, SwinUNETRBackboneOptions

    return SwinUNETRBackbone(SwinUNETRBackboneOptions(**options))


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
    register("benchmark", tasks.benchmark, config=tasks.MedsslBenchmarkConfig,
             description="Alice vs random init: test Dice over label fractions and seeds")


@hookimpl
def register_models(register: Callable[..., None]) -> None:
    register("alice", alice_model, description="Alice student-teacher on SwinUNETR (trainer contract)")
    register("anatomy_embedding", anatomy_embedding_model, description="SAM-style global + local voxel embeddings")
    register("swin_unetr_backbone", swin_unetr_backbone, description="MONAI SwinUNETR with token outputs")


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
