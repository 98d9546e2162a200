"""The benchmark functions run end to end and return numbers (tiny settings; real numbers: README)."""

from __future__ import annotations

import math


from accord_superflow.benchmarks import benchmark_pairing, benchmark_pretraining, benchmark_voxelization
from accord_superflow.models import BackboneConfig, TeacherConfig
from accord_superflow.pretrain import SuperFlowModelConfig




def test_pretraining_benchmark_reports_speed_and_memory(_tiny_template):
    tiny = SuperFlowModelConfig(
        backbone=BackboneConfig(base_channels=4, encoder_channels=[4, 4, 8, 8], encoder_blocks=[1, 1, 1, 1],
                                decoder_channels=[8, 8, 4, 4], decoder_blocks=[1, 1, 1, 1]),
        teacher=TeacherConfig(random_width=16, random_layers=1), embed_dim=8, voxel_size=(0.3, 3.0, 0.3))
    result = benchmark_pretraining(_tiny_template, batch_size=1, steps=1, warmup_steps=0, image_size=(28, 56),
                                   model=tiny, device="cpu")
    assert result["iterations_per_s"] > 0 and result["peak_memory_mb"] > 0 and math.isfinite(result["loss"])
    assert result["images_per_batch"] == 3 * 3 and result["points_per_batch"] > 0


def test_voxelization_and_pairing_benchmarks(_tiny_template):
    voxels = benchmark_voxelization(num_points=2000, num_clouds=2, repeats=1, device="cpu")
    assert voxels["points_per_s"] > 0 and voxels["voxels_per_cloud"] > 0
    pairing = benchmark_pairing(_tiny_template, repeats=1)
    assert pairing["points_per_s"] > 0 and pairing["pairs_per_cloud"] > 0
