"""Built-in plugin ``core``: SimCLR on a toy shapes dataset, the demo of the core engine.

It is registered through the same hooks as every external plugin, so it doubles as the
reference for plugin authors (see docs/plugins.md).
"""

from __future__ import annotations

from typing import Callable

from accord import hookimpl


@hookimpl
def plugin_info() -> dict[str, str]:
    return {"domain": "core", "description": "toy SimCLR pretraining + linear probe on generated shapes"}


@hookimpl
def register_tasks(register: Callable[..., None]) -> None:
    from accord.toy import tasks

    register("pretrain", tasks.pretrain, config=tasks.PretrainConfig, description="SimCLR pretraining")
    register("finetune", tasks.finetune, config=tasks.FinetuneConfig, description="supervised fine-tuning")
    register("evaluate", tasks.evaluate, config=tasks.EvaluateConfig, description="linear-probe accuracy")


@hookimpl
def register_datasets(register: Callable[..., None]) -> None:
    from accord.toy.data import check_shapes, synth_shapes

    register("shapes", synth=synth_shapes, check=check_shapes,
             description="ImageFolder of 8-bit grayscale PNGs (ROOT/<class>/<id>.png)")


@hookimpl
def register_models(register: Callable[..., None]) -> None:
    from accord.toy import tasks

    register("simclr", tasks.simclr_model, description="SimCLR on the 3-block CNN encoder (pretrain runs)")
    register("classifier", tasks.classifier_model, description="CNN encoder + linear head (finetune runs)")


@hookimpl
def register_benchmarks(register: Callable[..., None]) -> None:
    from accord.toy import tasks

    register("linear_probe", tasks.benchmark, config=tasks.ToyBenchmarkConfig,
             description="SimCLR pretrained vs random init, linear probe over label fractions and seeds")
