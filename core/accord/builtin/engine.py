"""Built-in plugin ``engine``: the core's losses, matchers, the safetensors exporter and the
engine benchmark (tiled vs dense InfoNCE), registered through the same hooks as any plugin."""

from __future__ import annotations

from typing import Any, Callable

from pydantic import Field

from accord import hookimpl
from accord.config import BenchmarkConfig


class EngineBenchmarkConfig(BenchmarkConfig):
    """``accord benchmark engine``: forward+backward time and peak memory, dense vs tiled."""

    sizes: list[int] = Field(
        [4096, 8192, 16384, 32768, 65536, 131072, 262144], description="numbers of pairs N"
    )
    dim: int = Field(128, ge=1, description="feature dimension d")


def run_engine_benchmark_task(cfg: EngineBenchmarkConfig) -> dict[str, Any]:
    from accord.benchmarks.engine import run_engine_benchmark

    rows = run_engine_benchmark(cfg.sizes, dim=cfg.dim, out_dir=cfg.run_dir, quick=cfg.quick)
    table = (cfg.run_dir / "benchmark.md").read_text()
    markdown = f"**Engine: InfoNCE forward + backward, dense vs tiled (d={cfg.dim}, fp32, CPU)**\n\n{table}"
    return {"markdown": markdown, "plots": [str(cfg.run_dir / "benchmark.png")], "rows": rows}


@hookimpl
def plugin_info() -> dict[str, str]:
    return {"domain": "core", "description": "contrastive losses, matchers, tiled InfoNCE, exporters"}


@hookimpl
def register_tasks(register: Callable[..., None]) -> None:
    register("benchmark", run_engine_benchmark_task, config=EngineBenchmarkConfig,
             description="tiled vs dense InfoNCE: time and peak memory per N")


@hookimpl
def register_losses(register: Callable[..., None]) -> None:
    from accord.losses import cosine, distill, grouped, infonce

    register("info_nce", infonce.InfoNCELoss, description="InfoNCE, one/two-directional, multi-positive, queue")
    register("nt_xent", infonce.NTXentLoss, description="SimCLR NT-Xent over 2N views")
    register("supcon", infonce.SupConLoss, description="supervised contrastive (label positives)")
    register("soft_target_contrast", infonce.SoftTargetContrastiveLoss, description="teacher-similarity targets")
    register("dino", distill.DINOLoss, description="DINO self-distillation with centring")
    register("ibot_patch", distill.IBOTPatchLoss, description="iBOT-style token distillation")
    register("negative_cosine", cosine.NegativeCosineSimilarity, description="BYOL / SimSiam")
    register("masked_dense_cosine", cosine.MaskedDenseCosineLoss, description="1 - cos over valid locations")
    register("grouped_contrast", grouped.GroupedContrastLoss, description="InfoNCE over group-pooled features")


@hookimpl
def register_matchers(register: Callable[..., None]) -> None:
    from accord import matchers

    register("identity", matchers.IdentityMatcher, description="same grid, location i <-> i")
    register("crop_overlap", matchers.CropOverlapMatcher, description="2D/3D crops from recorded affines")
    register("feature_argmax", matchers.FeatureArgmaxMatcher, description="DenseCL most-similar location")
    register("displacement_field", matchers.DisplacementFieldMatcher, description="deformable warp b = a + u(a)")
    register("point_projection", matchers.PointProjectionMatcher, description="LiDAR point -> pixel (3x4 camera)")
    register("region", matchers.RegionMatcher, description="box / region membership for pooling")


@hookimpl
def register_exporters(register: Callable[..., None]) -> None:
    from accord.training import export_weights

    register("safetensors", export_weights, description="model state_dict as safetensors")
