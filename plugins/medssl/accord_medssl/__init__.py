"""accord-medssl: 3D medical image self-supervision (Alice, GEMINI, GVSL) as an accord plugin."""

from __future__ import annotations

__version__ = "0.1.0"
