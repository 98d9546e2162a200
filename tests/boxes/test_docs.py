"""The example in the "Boxes" section of docs/engine.md runs and gives the values it states."""

from __future__ import annotations

import re
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "engine.md"


def test_boxes_doc_example_runs() -> None:
    section = DOC.read_text().split("\n## Boxes\n", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    scope: dict = {}
    exec(compile(code, str(DOC), "exec"), scope)
    assert torch.isfinite(scope["loss"]) and scope["pred"].grad is not None
    torch.testing.assert_close(scope["box"], torch.tensor([[433.5, 251.5, 43.0, 37.0, 0.0]]))
    torch.testing.assert_close(scope["corners"], scope["polygon"])
    (query, target), (no_query, _) = scope["matches"]
    assert len(query) == len(target) == 2 and len(no_query) == 0
