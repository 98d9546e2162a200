"""The user-error base: mistakes in what the user gave accord, reported without a traceback.

A :class:`UserError` (configs, checkpoints, data, paths, training that cannot go on) is the user's
to fix; its message names the thing and says what is wrong. The ``accord`` command line prints it
as ``error: <message>`` and exits 2; any other exception is a bug in accord or a plugin and keeps
its traceback. ``accord --debug`` shows the traceback for user errors too.

Subclasses: :class:`accord.config.ConfigError`, :class:`accord.training.checkpoint.CheckpointError`,
:class:`accord.training.trainer.NonFiniteLossError`. Plugins raise these, or subclass
:class:`UserError` for their own cases.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in a user's input (config, checkpoint, data, path); the message names the thing."""
