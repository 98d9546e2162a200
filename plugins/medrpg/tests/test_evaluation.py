"""Acc@0.5, mIoU and the per-category table against hand-computed cases; DDP gathering in one process."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from accord_medrpg.data import GroundingDataset, collate_grounding
from accord_medrpg.evaluation import evaluate_grounding, gather_samples, grounding_scores, sample_ious


def test_ious_and_scores_by_hand() -> None:
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 4, dtype=torch.float64)
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0],   # IoU 1
                         [0.0, 0.0, 10.0, 5.0],    # 50 / 100 = 0.5: counts as correct (>= 0.5)
                         [5.0, 0.0, 15.0, 10.0],   # 50 / 150 = 1/3
                         [20.0, 20.0, 30.0, 30.0]],  # 0
                        dtype=torch.float64)
    ious = sample_ious(pred, gt)
    torch.testing.assert_close(ious, torch.tensor([1.0, 0.5, 1 / 3, 0.0], dtype=torch.float64))
    scores = grounding_scores(ious, ["Cardiomegaly", "Pneumothorax", "Pneumothorax", "Edema"])
    assert scores.acc == pytest.approx(0.5) and scores.miou == pytest.approx((1 + 0.5 + 1 / 3) / 4)
    assert list(scores.per_category) == ["Cardiomegaly", "Edema", "Pneumothorax"]  # MS-CXR order
    assert scores.per_category["Pneumothorax"] == {"count": 2, "acc": 0.5, "miou": pytest.approx(5 / 12)}
    assert scores.per_category["Edema"] == {"count": 1, "acc": 0.0, "miou": 0.0}
    flat = scores.as_dict()
    assert flat["count"] == 4 and flat["Cardiomegaly/acc"] == 1.0
    assert "| Pneumothorax | 2 | 50.00 | 41.67 |" in scores.markdown()
    assert scores.markdown().splitlines()[-1] == "| **all** | 4 | 50.00 | 45.83 |"


def test_score_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown categor"):
        grounding_scores(torch.tensor([0.5]), ["Fracture"])
    with pytest.raises(ValueError, match="2 IoUs but 1 categories"):
        grounding_scores(torch.tensor([0.5, 0.2]), ["Edema"])
    with pytest.raises(ValueError, match="no samples"):
        grounding_scores(torch.tensor([]), [])


def test_gather_samples_in_one_process_sorts_and_drops_repeats() -> None:
    index, values = gather_samples(torch.tensor([2, 0, 2]), torch.tensor([[0.2], [0.0], [0.9]], dtype=torch.float64))
    assert index.tolist() == [0, 2] and values[:, 0].tolist() == [0.0, 0.2]


class _Oracle(nn.Module):
    """Predicts the GT boxes of a sequential loader in order, optionally shifted: a model with a known IoU."""

    def __init__(self, boxes: torch.Tensor, shift: float = 0.0):
        super().__init__()
        self.boxes, self.shift, self.seen = boxes, shift, 0
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, image, image_mask, phrases):
        boxes = self.boxes[self.seen:self.seen + len(phrases)].clone()
        self.seen += len(phrases)
        boxes[:, 0] += self.shift
        return {"pred_box": boxes + self.anchor}


def test_evaluate_grounding_on_data(grounding_dir) -> None:
    dataset = GroundingDataset(grounding_dir / "train.jsonl", image_size=64, train=False, num_negatives=0)
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_grounding)
    boxes = torch.stack([dataset[i]["box"] for i in range(len(dataset))])
    perfect = evaluate_grounding(_Oracle(boxes), loader)
    assert perfect.acc == 1.0 and perfect.miou == pytest.approx(1.0) and perfect.count == len(dataset)
    assert [s["index"] for s in perfect.samples] == list(range(len(dataset)))
    off = evaluate_grounding(_Oracle(boxes, shift=2.0), loader)  # moved off the image: clipped to nothing
    assert off.acc == 0.0 and off.miou == 0.0
    with pytest.raises(ValueError, match="no samples"):
        evaluate_grounding(_Oracle(boxes), [])
