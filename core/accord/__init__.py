"""accord: a contrastive / dense-contrastive engine with pluggy domain plugins.

Plugins implement hooks from :mod:`accord.hookspecs` with the :data:`hookimpl` marker and declare
themselves in the ``accord`` entry-point group.
"""

from accord.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["__version__", "hookimpl"]
