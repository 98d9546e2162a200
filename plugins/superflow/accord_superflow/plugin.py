"""accord hook implementations of the ``superflow`` plugin."""

from __future__ import annotations

from collections.abc import Callable

from accord import hookimpl


@hookimpl
def plugin_info() -> dict[str, str]:
    return {
        "domain": "autonomous driving (LiDAR + camera)",
        "description": "SuperFlow spatiotemporal LiDAR-camera distillation on nuScenes (data layer)",
    }


@hookimpl
def register_datasets(register: Callable[..., None]) -> None:
    # Imported here so that listing plugins does not import the devkit.
    from accord_superflow.data import check_nuscenes, synth_nuscenes

    register("nuscenes", synth=synth_nuscenes, check=check_nuscenes,
             description="nuScenes v1.0 layout: 13 tables, samples/sweeps, lidarseg, superpixels/<kind>/")
