"""The composition example in docs/engine.md runs and its matcher finds the expected cells."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "engine.md"


def test_engine_doc_example_runs_and_matches_the_geometry() -> None:
    code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    loss, match = scope["loss"], scope["match"]
    assert torch.isfinite(loss) and scope["features_a"].grad is not None
    # Cells are 8 source px; b starts 2 cells down and 1 cell right of a and is mirrored in x,
    # so cell (y, x) of a is cell (y - 2, 7 - (x - 1)) of b, for the 6 x 7 overlapping cells.
    first = match.batch == 0
    ia, ib = match.index_a[first], match.index_b[first]
    ya, xa, yb, xb = ia // 8, ia % 8, ib // 8, ib % 8
    assert len(ia) == 6 * 7
    assert torch.equal(yb, ya - 2) and torch.equal(xb, 8 - xa)
