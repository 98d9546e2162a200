"""Alice end to end through the ``accord`` CLI with the shipped configs, shrunk by overrides.

phantoms -> data check -> anatomy-embedding pretraining -> Alice pretraining mining with it ->
export to MONAI (strict load) -> fine-tuning from the export's checkpoint -> evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.networks.nets import SwinUNETR
from safetensors.torch import load_file
from typer.testing import CliRunner

from accord_medssl.data import synth

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "configs" / "medssl"
TINY_ALICE = [
    "alice.backbone.feature_size=12", "alice.backbone.depths=[1,1,1,1]", "alice.backbone.num_heads=[1,2,4,8]",
    "alice.backbone.window_size=4", "alice.backbone.norm_name=batch", "alice.out_dim=32", "alice.head_hidden_dim=32",
    "alice.head_bottleneck_dim=16", "alice.casa_hidden_dim=32", "alice.casa_num_heads=4",
]
TINY_ANATOMY = ["anatomy_embedding.model.widths=[4,8,8]", "anatomy_embedding.model.fpn_dim=8",
                "anatomy_embedding.model.global_dim=8", "anatomy_embedding.model.local_dim=8"]
TWO_STEPS = ["trainer.max_steps=2", "trainer.batch_size=2", "trainer.warmup_steps=0", "trainer.checkpoint_every=2"]



def test_alice_pipeline_through_the_cli(only_medssl, tmp_path: Path) -> None:
    from accord.cli import app

    runner = CliRunner()

    def accord(*args: str) -> str:
        result = runner.invoke(app, [str(arg) for arg in args])
        assert result.exit_code == 0, f"accord {' '.join(map(str, args))}\n{result.output}"
        return result.output

    data = synth(tmp_path / "data", num_train=3, num_test=1, shape=(48, 48, 32))
    assert "OK" in accord("data", "check", "medssl", data)
    runs = tmp_path / "runs"
    common = [f"data={data}", f"cache_dir={runs / 'cache'}", "crop_size=[32,32,32]"]

    accord("run", CONFIGS / "anatomy_embedding.yaml", *common, f"run_dir={runs / 'anatomy'}", *TINY_ANATOMY, *TWO_STEPS)
    anatomy = runs / "anatomy" / "checkpoints" / "step_00000002.pt"
    accord("run", CONFIGS / "alice_pretrain.yaml", *common, f"run_dir={runs / 'alice'}", *TINY_ALICE, *TWO_STEPS,
           f"mining.anatomy_checkpoint={anatomy}")
    alice = runs / "alice" / "checkpoints" / "step_00000002.pt"
    metrics = [json.loads(line) for line in (runs / "alice" / "metrics.jsonl").read_text().splitlines()]
    assert {"dino", "token", "reconstruction", "pair_similarity", "pair_accepted"} <= set(metrics[-1])

    exported = tmp_path / "alice.safetensors"
    accord("export", alice, "--format", "monai", "--out", exported)
    kwargs = json.loads(exported.with_name(exported.name + ".json").read_text())["swin_unetr_kwargs"]
    SwinUNETR(**kwargs).load_state_dict(load_file(exported), strict=True)

    # 3 cases: 1 train, 1 validation, 1 test; validation after each of the 2 steps.
    accord("run", CONFIGS / "finetune.yaml", *common, f"run_dir={runs / 'finetune'}", f"checkpoint={alice}",
           "trainer.max_steps=2", "trainer.warmup_steps=0", "trainer.validate_every=1")
    metrics = [json.loads(line) for line in (runs / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in metrics if "val/dice" in record] == [1, 2]
    accord("run", CONFIGS / "evaluate.yaml", f"data={data}", f"cache_dir={runs / 'cache'}",
           f"run_dir={runs / 'evaluate'}", f"checkpoint={runs / 'finetune' / 'best.safetensors'}")
    scores = json.loads((runs / "evaluate" / "results.json").read_text())
    assert scores["cases"] == 1 and len(scores["dice_per_class"]) == 6
    assert all(0.0 <= value <= 1.0 for value in [scores["dice"], *scores["dice_per_class"].values()])
