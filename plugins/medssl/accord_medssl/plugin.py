"""The accord entry point of accord-medssl (``[project.entry-points.accord]  medssl``).

Imports stay inside the hooks: discovering the plugin costs nothing, and MONAI, nibabel and the
models are imported only when a registry is first read (``accord plugins``, ``run``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from accord import hookimpl
from accord.registry import Problem


def synth_msd(out_dir: str | Path, kind: str = "msd", **options) -> Path:
    """``accord data synth medssl OUT``: MSD-layout abdomen CT phantoms (see :func:`accord_medssl.data.synth`);
    ``kind="pairs"``: GEMINI's registration phantoms, deformed copies of one template with their flows
    (:func:`accord_medssl.data.pairs.synth_pairs`); ``kind="mni152"``: the same from nilearn's MNI152 T1
    template with grey / white-matter labels (:func:`accord_medssl.data.pairs.synth_mni152`);
    ``kind="cxr"``: chest X-ray phantoms with masks (:func:`accord_medssl.data.cxr.synth_cxr`)."""
    if kind == "pairs":
        from accord_medssl.data.pairs import synth_pairs

        return synth_pairs(out_dir, **options)
    if kind == "mni152":
        from accord_medssl.data.pairs import synth_mni152

        return synth_mni152(out_dir, **options)
    if kind == "cxr":
        from accord_medssl.data.cxr import synth_cxr

        return synth_cxr(out_dir, **options)
    if kind != "msd":
        raise ValueError(f"kind: expected 'msd', 'pairs', 'mni152' or 'cxr', got {kind!r}")
    from accord_medssl.data import synth

    return synth(out_dir, **options)


def check_msd(root: str | Path, **table) -> list[Problem]:
    """``accord data check medssl DIR``: an MSD dataset or a plain NIfTI folder (:func:`accord_medssl.data.check`),
    or a chest X-ray folder with ``images/`` or CSV file (:func:`accord_medssl.data.cxr.check_cxr`, whose
    ``path_column``, ``group_columns`` and ``image_folder`` options ``table`` passes on)."""
    from accord_medssl.data.cxr import check_cxr, is_cxr_root

    if is_cxr_root(root):
        return check_cxr(root, **table)
    if table:
        raise TypeError(f"options {sorted(table)} apply to a chest X-ray CSV file, not to {root}")
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
        "or a plain folder of NIfTI CTs; or a chest X-ray folder (images/<group>/, masks/<structure>/, GEMINI 2D) "
        "or CSV file (path_column=, group_columns=, image_folder=)",
    )


@hookimpl
def register_tasks(register: Callable[..., None]) -> None:
    from accord_medssl import tasks
    from accord_medssl.gemini import tasks as gemini_tasks

    register("pretrain", tasks.pretrain, config=tasks.PretrainConfig, methods={"gemini": "gemini_pretrain"},
             description="anatomy-embedding (SAM replacement) or Alice pretraining of a SwinUNETR; method: gemini "
                         "runs gemini_pretrain")
    register("finetune", tasks.finetune, config=tasks.FinetuneConfig,
             description="SwinUNETR segmentation from an Alice checkpoint or scratch (network: gemini_unet: GEMINI's "
                         "U-Net from a gemini_pretrain checkpoint or scratch), best validation Dice kept")
    register("evaluate", tasks.evaluate, config=tasks.EvaluateConfig,
             description="per-class and mean Dice of fine-tuned weights, sliding-window inference")
    register("gemini_pretrain", gemini_tasks.gemini_pretrain, config=gemini_tasks.GeminiPretrainConfig,
             description="GEMINI-MIP: deformable correspondence + Models-Genesis restoration on whole volumes")
    register("semisup", gemini_tasks.gemini_semisup, config=gemini_tasks.GeminiSemisupConfig,
             description="GEMINI-Semi: few labelled + unlabelled volumes (correspondence + CE/Dice steps), test Dice")
    register("register", gemini_tasks.gemini_register, config=gemini_tasks.GeminiRegisterConfig,
             description="warp a moving volume (and label) onto a fixed one with a trained GEMINI; NIfTI outputs")


@hookimpl
def register_benchmarks(register: Callable[..., None]) -> None:
    from accord_medssl import benchmarks
    from accord_medssl.gemini import benchmark as gemini_benchmark

    register("segmentation", benchmarks.segmentation, config=benchmarks.MedsslBenchmarkConfig, default=True,
             description="Alice vs random init: SwinUNETR fine-tuning and frozen-feature probe test Dice over label "
                         "fractions and seeds")
    register("gemini_segmentation", benchmarks.segmentation, config=benchmarks.GeminiSegmentationConfig,
             description="GEMINI-Semi vs supervised only (few labelled cases) and GEMINI-MIP vs random init "
                         "fine-tuning: test Dice per structure over seeds (= segmentation --method gemini)")
    register("pretraining_speed", benchmarks.run_pretraining_speed, config=benchmarks.PretrainingSpeedConfig,
             kind="speed", description="pretraining steps per second and peak memory (alice or anatomy_embedding)")
    register("loader_throughput", benchmarks.run_loader_throughput, config=benchmarks.LoaderThroughputConfig,
             kind="speed", description="volumes per second: uncached, MONAI disk cache cold and warm")
    register("gemini_registration", gemini_benchmark.run_gemini_registration,
             config=gemini_benchmark.GeminiRegistrationConfig,
             description="GEMINI registration quality: Dice before/after, folding, inverse consistency; DDF vs "
             "diffeomorphic")
    register("gemini_speed", gemini_benchmark.run_gemini_speed, config=gemini_benchmark.GeminiSpeedConfig,
             kind="speed", description="GEMINI: local NCC separable vs grouped conv; s/iteration and peak memory")
    register("anatomy_matching", benchmarks.run_anatomy_matching, config=benchmarks.AnatomyMatchingConfig,
             kind="speed", description="anatomy-embedding hit rate and mm error on phantoms and MNI152")
    register("mining", benchmarks.run_mining_speed, config=benchmarks.MiningSpeedConfig, kind="speed",
             description="Alice view mining over 100+ volumes: accord's store-backed miner vs the reference path")


@hookimpl
def register_models(register: Callable[..., None]) -> None:
    from accord_medssl.finetune import segmentation_model
    from accord_medssl.gemini.tasks import gemini_model, gemini_semisup_model
    from accord_medssl.tasks import pretraining_model

    register("alice", pretraining_model, description="Alice student-teacher on SwinUNETR (pretrain, method alice)")
    register("anatomy_embedding", pretraining_model,
             description="SAM-style global + local voxel embeddings (pretrain, method anatomy_embedding)")
    register("segmentation", segmentation_model,
             description="SwinUNETR or GEMINI U-Net + conv3 head, DiceCE or Dice (finetune runs)")
    register("gemini", gemini_model,
             description="GEMINI-MIP: U-Net + deformer, correspondence and restoration steps (gemini_pretrain runs)")
    register("gemini_semisup", gemini_semisup_model,
             description="GEMINI-Semi: U-Net + deformer, correspondence and CE + Dice steps (semisup runs)")


@hookimpl
def register_config_schemas(register: Callable[..., None]) -> None:
    from accord_medssl.alice import AliceOptions
    from accord_medssl.anatomy import AnatomyPretrainingOptions
    from accord_medssl.gemini import GeminiOptions
    from accord_medssl.models import SwinUNETRBackboneOptions
    from accord_medssl.views import MiningOptions

    register("alice", AliceOptions)
    register("anatomy_embedding", AnatomyPretrainingOptions)
    register("swin_unetr", SwinUNETRBackboneOptions)
    register("mining", MiningOptions)
    register("gemini", GeminiOptions)


@hookimpl
def register_exporters(register: Callable[..., None]) -> None:
    from accord_medssl.export import export_monai
    from accord_medssl.gemini.export import export_gemini_unet

    register("monai", export_monai,
             description="Alice checkpoint -> SwinUNETR state dict (+ constructor kwargs) for monai.networks.nets")
    register("gemini_unet", export_gemini_unet,
             description="GEMINI checkpoint -> backbone U-Net state dict (+ kwargs) for accord_medssl.gemini.GeminiUNet")
