"""The shared training loop: :class:`Trainer`, callbacks, checkpoints, resumable data order and progress.

See docs/training.md for the model contract, callbacks, checkpoint contents and resume semantics.
"""

from __future__ import annotations

from accord.training.callbacks import BestCheckpoint, Callback, TrainingState
from accord.training.checkpoint import (
    CheckpointError,
    export_weights,
    load_checkpoint,
    load_weights,
    weights_metadata,
)
from accord.training.distributed import DistributedContext, micro_batch_size, setup_distributed, teardown_distributed
from accord.training.optim import (
    ema_momentum_at,
    learning_rate_at,
    steps_per_epoch,
    trainer_for_epochs,
    weight_decay_at,
)
from accord.training.probe import DenseProbeData, OnlineProbe, OnlineProbeOptions
from accord.training.sampler import BatchStream, ResumableBatchSampler
from accord.training.trainer import NonFiniteLossError, Trainer

__all__ = [
    "Trainer",
    "Callback",
    "TrainingState",
    "BestCheckpoint",
    "OnlineProbe",
    "OnlineProbeOptions",
    "DenseProbeData",
    "NonFiniteLossError",
    "CheckpointError",
    "DistributedContext",
    "setup_distributed",
    "teardown_distributed",
    "micro_batch_size",
    "learning_rate_at",
    "steps_per_epoch",
    "trainer_for_epochs",
    "ema_momentum_at",
    "weight_decay_at",
    "load_checkpoint",
    "export_weights",
    "load_weights",
    "weights_metadata",
    "ResumableBatchSampler",
    "BatchStream",
]
