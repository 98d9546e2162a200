"""GEMINI (medssl §2): dense contrast with a deformable homeomorphism prior, 2D and 3D.

- :mod:`~accord_medssl.gemini.warp`: dense warp, validity mask, Jacobian determinant, inverse consistency;
- :mod:`~accord_medssl.gemini.losses`: smoothness, local NCC, masked cosine / GSS, task losses;
- :mod:`~accord_medssl.gemini.networks`: backbone U-Net, deformer, task head (optionally diffeomorphic);
- :mod:`~accord_medssl.gemini.corruption`: Models-Genesis corruption transforms;
- :mod:`~accord_medssl.gemini.data`: pairs of different images with one shared spatial transform;
- :mod:`~accord_medssl.gemini.model`: the trainer-contract model (two optimiser steps per iteration);
- :mod:`~accord_medssl.gemini.tasks`: the ``gemini_pretrain`` (``pretrain`` with ``method: gemini``), ``semisup`` and
  ``register`` tasks;
- :mod:`~accord_medssl.gemini.benchmark`: ``gemini_registration`` and ``--speed gemini_speed``;
- :mod:`~accord_medssl.gemini.segmentation_benchmark`: ``gemini_segmentation`` (random vs GEMINI-MIP vs
  GEMINI-Semi fine-tuned through ``finetune network: gemini_unet``).
"""

from accord_medssl.gemini.model import GeminiLossOptions, GeminiModel, GeminiOptions
from accord_medssl.gemini.networks import GeminiNetwork, GeminiNetworkOptions

__all__ = ["GeminiLossOptions", "GeminiModel", "GeminiNetwork", "GeminiNetworkOptions", "GeminiOptions"]
