"""Every medssl training task reruns bit-exact on CPU by default, fresh and after a kill + resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from accord.config import load_config
from accord.runs import run_task
from accord.testing.reruns import assert_reruns_are_bit_exact

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "medssl"
TINY_ANATOMY = ["anatomy_embedding.model.widths=[4,8,8]", "anatomy_embedding.model.fpn_dim=8",
                "anatomy_embedding.model.global_dim=8", "anatomy_embedding.model.local_dim=8"]
TINY_ALICE = [
    "alice.backbone.feature_size=12", "alice.backbone.depths=[1,1,1,1]", "alice.backbone.num_heads=[1,2,4,8]",
    "alice.backbone.window_size=4", "alice.backbone.norm_name=batch", "alice.out_dim=32", "alice.head_hidden_dim=32",
    "alice.head_bottleneck_dim=16", "alice.casa_hidden_dim=32", "alice.casa_num_heads=4",
]
FOUR_STEPS = ["trainer.max_steps=4", "trainer.batch_size=2", "trainer.warmup_steps=1", "trainer.checkpoint_every=2",
              "trainer.keep_last=2"]


@pytest.fixture(scope="module")
def anatomy_checkpoint(msd_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("anatomy")
    run_task(load_config(CONFIGS / "anatomy_embedding.yaml", [
        f"data={msd_root}", "cache=memory", "crop_size=[32,32,32]", f"run_dir={run_dir}", *TINY_ANATOMY,
        "trainer.max_steps=1", "trainer.batch_size=2", "trainer.warmup_steps=0"]))
    return run_dir / "checkpoints" / "step_00000001.pt"


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["anatomy_embedding", "alice", "finetune"])
def test_medssl_task_reruns_and_resumes_bit_exact(stage: str, msd_root: Path, anatomy_checkpoint: Path,
                                                  tmp_path: Path) -> None:
    common = [f"data={msd_root}", "cache=memory", "crop_size=[32,32,32]", *FOUR_STEPS]
    config, overrides = {
        "anatomy_embedding": ("anatomy_embedding.yaml", TINY_ANATOMY),
        "alice": ("alice_pretrain.yaml", [*TINY_ALICE, f"mining.anatomy_checkpoint={anatomy_checkpoint}"]),
        "finetune": ("finetune.yaml", ["trainer.validate_every=4", "samples_per_volume=1", "checkpoint=null", "backbone={feature_size: 12, depths: [1,1,1,1], "
                                       "num_heads: [1,2,4,8], window_size: 4, norm_name: batch}"]),
    }[stage]
    assert_reruns_are_bit_exact(
        lambda run_dir: load_config(CONFIGS / config, [*common, *overrides, f"run_dir={run_dir}"]), tmp_path)
