"""Detector and MutDet modules: shapes, masking, DN layout, losses of both branches, predict."""

import math

import pytest
import torch

from accord_mutdet.models import DetectorOptions, MutDetOptions, RotatedDETR
from accord_mutdet.models.attention import rotated_sampling_locations
from accord_mutdet.models.backbone import ResNetBackbone, load_backbone_weights
from accord_mutdet.models.denoising import make_denoising_queries
from accord_mutdet.models.detector import proposal_scores
from accord_mutdet.models.enhancement import MutualEnhancement

TINY = DetectorOptions(backbone="tiny", embed_dim=32, num_heads=4, ffn_dim=64, encoder_layers=1, decoder_layers=2,
                       num_queries=10, num_dn_queries=6, dropout=0.0)
TINY_MUTDET = MutDetOptions(depth=2, mlp_dim=32, object_dim=16, encoder_embed_dim=32)


def _batch(embeddings: bool = True) -> dict:
    batch = {"images": torch.randn(2, 3, 64, 64),
             "boxes": [torch.tensor([[20.0, 20, 16, 8, 0.3], [40, 40, 10, 10, -0.5]]), torch.zeros(0, 5)],
             "labels": [torch.tensor([1, 3]), torch.zeros(0, dtype=torch.long)]}
    if embeddings:
        batch["embeddings"] = [torch.randn(2, 16), torch.zeros(0, 16)]
    return batch


def test_enhancement_shapes_and_masking():
    torch.manual_seed(0)
    module = MutualEnhancement(16, 4, 32, depth=2).eval()
    objects, memory = torch.randn(2, 3, 16), torch.randn(2, 7, 16)
    padding = torch.tensor([[False, False, True], [True, True, True]])
    out_objects, out_memory = module(objects, memory, padding)
    assert out_objects.shape == (2, 3, 16) and out_memory.shape == (2, 7, 16)
    # image 1 has no objects: its memory is untouched
    assert torch.equal(out_memory[1], memory[1])
    # padding slots change nothing for the real ones: same result as the unpadded image 0
    alone_objects, alone_memory = module(objects[:1, :2], memory[:1], padding[:1, :2])
    assert torch.allclose(alone_objects, out_objects[:1, :2], atol=1e-5)
    assert torch.allclose(alone_memory, out_memory[:1], atol=1e-5)
    garbage = objects.clone()
    garbage[0, 2] = 100.0
    assert torch.allclose(module(garbage, memory, padding)[1][0], out_memory[0], atol=1e-5)


def test_rotated_sampling_locations():
    reference = torch.tensor([[[0.5, 0.5, 0.4, 0.2, 0.0], [0.5, 0.5, 0.4, 0.2, math.pi / 2]]])
    offsets = torch.zeros(1, 2, 1, 1, 1, 2)
    offsets[..., 0] = 1.0  # one point, one unit along the box's w direction
    locations = rotated_sampling_locations(reference, offsets, num_points=1)
    # theta 0: mmcv's box form, centre + offset * w / 2; theta pi/2: the w side points down (+y)
    assert torch.allclose(locations[0, 0].flatten(), torch.tensor([0.7, 0.5]))
    assert torch.allclose(locations[0, 1].flatten(), torch.tensor([0.5, 0.7]), atol=1e-6)


def test_proposal_scores_are_max_similarity_times_objectness():
    token = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    objects = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [0.0, -5.0]]])
    padding = torch.tensor([[False, False, True]])
    logits = torch.tensor([[2.0, -1.0]])
    scores = proposal_scores(token, objects, padding, logits, "logit")
    assert torch.allclose(scores, torch.tensor([[1.0 * 2.0, 0.8 * -1.0]]))
    assert torch.allclose(proposal_scores(token, objects, padding, logits, "sigmoid"),
                          torch.tensor([[torch.sigmoid(torch.tensor(2.0)), 0.8 * torch.sigmoid(torch.tensor(-1.0))]]))
    empty = proposal_scores(token, objects, torch.ones(1, 3, dtype=torch.bool), logits)
    assert torch.equal(empty, logits)
    with pytest.raises(ValueError, match="proposal_score"):
        proposal_scores(token, objects, padding, logits, "softmax")


def test_denoising_layout_group_zero_and_mask():
    labels = [torch.tensor([1, 2, 0]), torch.tensor([4])]
    boxes = [torch.rand(3, 5) * 0.5 + 0.25, torch.rand(1, 5) * 0.5 + 0.25]
    dn = make_denoising_queries(labels, boxes, num_queries=5, num_classes=5, num_dn=7)
    assert dn.num_groups == 2 and dn.size == 12
    # group 0's positive copy of target j is query j
    assert torch.equal(dn.target_index[0, :3], torch.arange(3)) and dn.positive[0, :3].all()
    assert dn.positive[1, 0] and not dn.valid[1, 1:3].any()
    assert not dn.positive[0, 3:6].any() and dn.valid[0, 3:6].all()  # negatives
    assert dn.attn_mask[12:, :12].all() and not dn.attn_mask[:6, :6].any() and dn.attn_mask[:6, 6:12].all()
    assert make_denoising_queries([torch.zeros(0, dtype=torch.long)], [torch.zeros(0, 5)], 5, 5) is None


def test_mutdet_loss_keys_of_both_branches_are_finite_and_train_the_right_parts():
    torch.manual_seed(0)
    model = RotatedDETR(TINY, 5, mutdet=TINY_MUTDET, frozen_backbone=True).train()
    out = model(_batch())
    terms = ["enc_cls", "enc_bbox", "enc_iou", "enc_angle", "cls", "bbox", "iou", "angle",
             "dn_cls", "dn_bbox", "dn_iou", "dn_angle", "embed", "dn_embed"]
    logged = {"pos_sim", "neg_sim", "p_pos_sim", "p_neg_sim"}
    expected = {"loss", *terms, *(f"p_{t}" for t in terms), "p_enc_embed", *logged}
    assert set(out) == expected
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.mutdet["enhancement"].parameters())
    assert model.mutdet["feature_embed"][0].weight.grad.abs().sum() > 0


def test_plain_detector_losses_predict_and_errors():
    torch.manual_seed(0)
    model = RotatedDETR(TINY, 5, class_names=list("abcde"))
    assert not hasattr(model, "mutdet")
    out = model(_batch(embeddings=False))
    assert "embed" not in out and torch.isfinite(out["loss"])
    detections = model.predict(torch.randn(2, 3, 64, 64), max_detections=7)
    assert len(detections) == 2 and model.training
    first = detections[0]
    assert first["boxes"].shape == (7, 5) and first["scores"].shape == (7,) and first["labels"].dtype == torch.int64
    assert (first["boxes"][:, 2] >= first["boxes"][:, 3]).all()
    assert (first["scores"][:-1] >= first["scores"][1:]).all()
    with pytest.raises(ValueError, match="labels"):
        model({**_batch(False), "labels": [torch.tensor([1, 9]), torch.zeros(0, dtype=torch.long)]})
    mutdet = RotatedDETR(TINY, 5, mutdet=TINY_MUTDET)
    with pytest.raises(ValueError, match="embeddings"):
        mutdet(_batch(embeddings=False))
    with pytest.raises(ValueError, match="embeddings\\[0\\]"):
        mutdet({**_batch(), "embeddings": [torch.randn(3, 16), torch.zeros(0, 16)]})


def test_backbone_weights_from_a_local_file(tmp_path):
    source = ResNetBackbone("tiny")
    state = {f"module.{k}": v for k, v in source.body.state_dict().items()}
    state["fc.weight"] = torch.zeros(3, 64)
    torch.save({"state_dict": state}, tmp_path / "r.pth")
    target = ResNetBackbone("tiny", frozen=True)
    load_backbone_weights(target, tmp_path / "r.pth")
    assert torch.equal(target.body.conv1.weight, source.body.conv1.weight)
    assert not any(p.requires_grad for p in target.parameters())
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        load_backbone_weights(target, tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_backbone_weights(target, tmp_path / "junk.pth")
    # fine-tuning backbone: stem and first stage frozen, the rest trains; BN stays in eval mode
    trainable = ResNetBackbone("tiny").train()
    assert not trainable.body.layer1[0].conv1.weight.requires_grad
    assert trainable.body.layer4[0].conv1.weight.requires_grad
    assert not trainable.body.bn1.training
