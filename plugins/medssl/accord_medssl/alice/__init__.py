"""Alice (ICCV 2023): anatomy-matched views, masked student, EMA teacher, CASA token alignment."""

from __future__ import annotations

from accord_medssl.alice.casa import CASA
from accord_medssl.alice.masking import random_block_mask, token_mask
from accord_medssl.alice.model import AliceModel, AliceNetwork, AliceNetworkOutput, AliceOptions

__all__ = [
    "CASA",
    "AliceModel",
    "AliceNetwork",
    "AliceNetworkOutput",
    "AliceOptions",
    "random_block_mask",
    "token_mask",
]
