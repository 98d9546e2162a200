"""The shared training loop: :class:`Trainer`, checkpoints, resumable data order and progress.

See docs/training.md for the model contract, checkpoint contents and resume semantics.
"""

from __future__ import annotations

from accord.training.checkpoint import (
    CheckpointError,
    export_weights,
    load_checkpoint,
    load_weights,
    weights_metadata,
)
from accord.training.sampler import BatchStream, ResumableBatchSampler
from accord.training.trainer import (
    DistributedContext,
    NonFiniteLossError,
    Trainer,
    ema_momentum_at,
    learning_rate_at,
    micro_batch_size,
    setup_distributed,
    teardown_distributed,
    weight_decay_at,
)

__all__ = [
    "Trainer",
    "NonFiniteLossError",
    "CheckpointError",
    "DistributedContext",
    "setup_distributed",
    "teardown_distributed",
    "micro_batch_size",
    "learning_rate_at",
    "ema_momentum_at",
    "weight_decay_at",
    "load_checkpoint",
    "export_weights",
    "load_weights",
    "weights_metadata",
    "ResumableBatchSampler",
    "BatchStream",
]
