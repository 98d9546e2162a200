"""The shipped configs/medssl/*.yaml validate, chain into each other, and every task config is strict."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from accord.config import ConfigError, load_config, validate_config
from accord.plugins import PluginHost

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs" / "medssl"



def test_shipped_configs_validate_and_chain(only_medssl, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    configs = {}
    for path in sorted(CONFIGS.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if raw.get("data"):
            (tmp_path / raw["data"]).mkdir(parents=True, exist_ok=True)
        for key in ("checkpoint", "fixed", "moving", "fixed_label", "moving_label"):
            if raw.get(key):
                (tmp_path / raw[key]).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / raw[key]).touch()
        configs[path.stem] = load_config(path)
    assert sorted(configs) == ["alice_pretrain", "anatomy_embedding", "evaluate", "finetune", "finetune_gemini",
                               "gemini_pretrain", "gemini_pretrain_2d", "gemini_register", "gemini_semisup"]
    assert configs["gemini_register"].checkpoint.parent.parent == configs["gemini_pretrain"].run_dir
    assert configs["finetune_gemini"].checkpoint.parent.parent == configs["gemini_pretrain"].run_dir
    assert configs["finetune_gemini"].network == "gemini_unet"
    # task: pretrain with method: gemini is validated and run as gemini_pretrain.
    assert {configs[name].task for name in ("gemini_pretrain", "gemini_pretrain_2d")} == {"gemini_pretrain"}
    anatomy, alice = configs["anatomy_embedding"], configs["alice_pretrain"]
    assert (anatomy.method, alice.method) == ("anatomy_embedding", "alice")
    assert alice.trainer.ema_momentum == 0.996 and alice.trainer.ema_momentum_end == 1.0
    # Each stage reads what the previous one writes.
    assert alice.mining.anatomy_checkpoint.parent.parent == anatomy.run_dir
    assert configs["finetune"].checkpoint.parent.parent == alice.run_dir
    assert configs["evaluate"].checkpoint == configs["finetune"].run_dir / "best.safetensors"


def test_every_task_config_forbids_unknown_keys(only_medssl, tmp_path: Path) -> None:
    tasks = PluginHost().tasks.by_plugin("medssl")
    assert sorted(task.name for task in tasks) == ["evaluate", "finetune", "gemini_pretrain", "pretrain", "register",
                                                   "semisup"]
    for task in tasks:
        raw = {"plugin": "medssl", "task": task.name, "data": str(tmp_path), "checkpoint": str(tmp_path),
               "trainer_steps": 3}
        with pytest.raises(ConfigError, match=r"unknown key 'trainer_steps'"):
            validate_config(task.extra["config"], raw, f"{task.name}.yaml")


def test_benchmark_step_overrides_rescale_the_variant_trainers() -> None:
    from accord_medssl.benchmarks import QUICK, MedsslBenchmarkConfig

    plain = MedsslBenchmarkConfig(plugin="medssl", quick=True)
    assert plain.trainers(QUICK) == (QUICK.anatomy_trainer, QUICK.alice_trainer, QUICK.finetune_trainer)
    scaled = MedsslBenchmarkConfig(plugin="medssl", quick=True, alice_steps=300, finetune_steps=3)
    anatomy, alice, finetune = scaled.trainers(QUICK)
    assert anatomy == QUICK.anatomy_trainer
    assert (alice.max_steps, alice.checkpoint_every, alice.lr) == (300, 300, QUICK.alice_trainer.lr)
    assert alice.freeze_parameters == QUICK.alice_trainer.freeze_parameters
    # Validation every quarter of the run; warm-up shorter than the run.
    assert (finetune.max_steps, finetune.validate_every, finetune.warmup_steps) == (3, 1, 2)
