"""Real 2-process gloo DDP training of pretrain (MutDet) and finetune against one process.

What is asserted and why:

* without denoising queries and flips (``num_dn_queries=0``, ``augment=false``), 2 ranks x 2 images
  end with the weights of 1 process on the same 4-image global batches (float tolerance of the
  gradient all-reduce). This covers the global-batch normalisers of every detection term, the
  alignment loss's cross-rank negatives (pairs gathered with gradients) and DDP's rule that every
  parameter gets a gradient. One exception, by mathematics rather than by DDP: the *key* bias of
  every attention (``in_proj_bias[D:2D]`` of the decoder self-attention and of the enhancement
  blocks) has an exactly zero gradient (softmax ignores a shift shared by all keys), so both runs
  see float noise (~1e-12) there, which Adam scales into steps of up to ``lr``; it is only checked
  to stay within ``steps x lr`` of the single run;
* the alignment loss alone, with one rank holding no matched pair: the ranks' mean loss and their
  gradients (divided by the world size, as DDP averages) equal the single-process ones;
* with denoising queries the ranks draw their noise from their own random streams (as DINO /
  ARS-DETR on several GPUs), so no single-process run reproduces it sample for sample; asserted:
  the run trains (both ranks build the same DN groups from the global batch's largest target
  count, so their collectives stay in step) to a finite loss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from accord.config import TrainerConfig
from accord.runs import run_task

from accord_mutdet.data import load_dior_r, synth_mutdet
from accord_mutdet.models import DetectorOptions, MutDetOptions
from accord_mutdet.pseudo.store import write_pseudo_labels
from accord_mutdet.tasks import FinetuneConfig, PretrainConfig

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TINY = dict(backbone="tiny", embed_dim=32, num_heads=4, ffn_dim=64, num_queries=12, dropout=0.0,
            encoder_layers=1, decoder_layers=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """4 training images with 1-5 objects each (uneven per rank), pseudo-labels in the real format."""
    root = synth_mutdet(tmp_path_factory.mktemp("synth"), num_train=4, num_val=0, num_test=0, size=96,
                        min_objects=1, max_objects=5, object_scale=0.6, seed=3)
    rng = np.random.default_rng(0)
    for record in load_dior_r(root / "DIOR-R", "train"):
        n = len(record.boxes)
        embeddings = rng.normal(size=(n, 16)).astype(np.float32)
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        write_pseudo_labels(root / "pseudo" / f"{record.id}.npz", record.boxes, embeddings, rng.integers(0, 4, n),
                            np.ones(n))
    return root


def _config(task: str, data: Path, run_dir: Path, num_dn: int, checkpoint_every: int = 3):
    trainer = TrainerConfig(max_steps=3, batch_size=4, lr=1e-4, checkpoint_every=checkpoint_every, warmup_steps=0,
                            schedule="constant", lr_multipliers={"sampling_offsets": 0.1})
    model = DetectorOptions(**TINY, num_dn_queries=num_dn)
    if task == "pretrain":
        return PretrainConfig(plugin="mutdet", task="pretrain", run_dir=run_dir, data=data / "DIOR-R", split="train",
                              pseudo_dir=data / "pseudo", image_size=64, num_pseudo_classes=4, model=model,
                              mutdet=MutDetOptions(depth=1, mlp_dim=32, object_dim=16, encoder_embed_dim=32),
                              augment=False, trainer=trainer)
    return FinetuneConfig(plugin="mutdet", task="finetune", run_dir=run_dir, data=data / "DIOR-R", split="train",
                          image_size=64, model=model, augment=False, trainer=trainer)


def _alignment_case(images: list[int]):
    """Three images' predictions, objects and matches (image 2 has no pair); leaves for ``images``."""
    from accord_mutdet.losses import alignment_loss

    generator = torch.Generator().manual_seed(0)
    preds = [torch.randn(5, 8, generator=generator) for _ in range(3)]
    objects = [torch.randn(4, 8, generator=generator) for _ in range(3)]
    queries = [torch.tensor([0, 2, 4]), torch.tensor([1]), torch.zeros(0, dtype=torch.long)]
    targets = [torch.tensor([3, 0, 1]), torch.tensor([2]), torch.zeros(0, dtype=torch.long)]
    leaves = [preds[i].requires_grad_() for i in images] + [objects[i].requires_grad_() for i in images]
    aligned = alignment_loss([preds[i] for i in images], [objects[i] for i in images],
                             [queries[i] for i in images], [targets[i] for i in images], tau=0.2)
    aligned.loss.backward()
    return float(aligned.loss), [leaf.grad for leaf in leaves]


def _on_rank(rank, world_size, configs):
    # rank 0 holds images 0 and 1 (4 pairs), rank 1 image 2 (no pair: it only joins the gathers)
    alignment = _alignment_case([0, 1] if rank == 0 else [2])
    runs = []
    for config in configs:
        result = run_task(config)
        runs.append({"checkpoint": result["checkpoint"], "loss": result["loss"], "step": result["step"]})
    return {"alignment": alignment, "runs": runs}


def _weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]


def test_two_ranks_equal_one_process_on_the_same_global_batch(data, tmp_path):
    from accord.testing.dist import run_distributed

    tasks = ("pretrain", "finetune")
    singles = [run_task(_config(task, data, tmp_path / f"single_{task}", num_dn=0, checkpoint_every=1))
               for task in tasks]
    configs = [_config(task, data, tmp_path / f"ddp_{task}", num_dn=0) for task in tasks]
    configs.append(_config("pretrain", data, tmp_path / "ddp_dn", num_dn=8))
    ranks = run_distributed(_on_rank, world_size=2, args=(configs,))  # one spawn for everything
    assert [[run["step"] for run in rank["runs"]] for rank in ranks] == [[3, 3, 3]] * 2

    # the alignment loss: the ranks' mean (DDP's) loss and gradients are the single-process ones
    loss, grads = _alignment_case([0, 1, 2])
    assert (ranks[0]["alignment"][0] + ranks[1]["alignment"][0]) / 2 == pytest.approx(loss, rel=1e-6)
    distributed_grads = ranks[0]["alignment"][1][:2] + ranks[1]["alignment"][1][:1] + \
        ranks[0]["alignment"][1][2:] + ranks[1]["alignment"][1][1:]
    for got, expected in zip(distributed_grads, grads):
        torch.testing.assert_close(got / 2, expected, atol=1e-7, rtol=1e-5)

    lr, steps = 1e-4, 3
    for single, distributed_run in zip(singles, ranks[0]["runs"]):
        expected, distributed = _weights(single["checkpoint"]), _weights(distributed_run["checkpoint"])
        assert expected.keys() == distributed.keys()
        for name, tensor in expected.items():
            if name.endswith("in_proj_bias"):  # (3 D,): query, key, value biases
                dim = tensor.numel() // 3
                keys = slice(dim, 2 * dim)
                assert (distributed[name][keys] - tensor[keys]).abs().max() <= steps * lr
                distributed[name][keys] = tensor[keys]
            torch.testing.assert_close(distributed[name], tensor, atol=2e-6, rtol=1e-4, msg=name)
        # not a vacuous comparison: most weights moved between step 1 and step 3
        first = _weights(str(Path(single["checkpoint"]).with_name("step_00000001.pt")))
        assert sum(not torch.equal(first[name], tensor) for name, tensor in expected.items()) > len(expected) // 2

    # with denoising queries: trains on both ranks (same DN groups from the global batch) to a finite loss
    assert all(np.isfinite(rank["runs"][2]["loss"]) for rank in ranks)
