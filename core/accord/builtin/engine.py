"""Built-in plugin ``engine``: the safetensors exporter and the engine's speed benchmark (tiled vs
dense InfoNCE), registered through the same hooks as any plugin.

The engine's losses and matchers are not registered: methods import them (``accord.losses``,
``accord.matchers``; see docs/engine.md), so ``plugin_info`` only points there."""

from __future__ import annotations

from typing import Callable

from accord import hookimpl


@hookimpl
def plugin_info() -> dict[str, str]:
    return {
        "domain": "core",
        "description": "contrastive losses and matchers to import from accord.losses / accord.matchers "
        "(docs/engine.md), tiled InfoNCE, safetensors export",
    }


@hookimpl
def register_benchmarks(register: Callable[..., None]) -> None:
    from accord.benchmarks import engine

    register("tiled_infonce", engine.tiled_infonce, config=engine.EngineBenchmarkConfig, kind="speed",
             description="tiled vs dense InfoNCE: forward + backward time and peak memory per N")


@hookimpl
def register_exporters(register: Callable[..., None]) -> None:
    from accord.training import export_weights

    register("safetensors", export_weights, description="model state_dict as safetensors")
