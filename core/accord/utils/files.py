"""Writing output files: :func:`write_atomically`, the one way accord writes a file.

Checkpoints, configs, metrics, plots and benchmark results all go through it, so every output is
written the same safe way: readers never see half a file, and a symlink planted at the
destination (or a predictable temp name) cannot redirect the write outside the run directory.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = ["TEMP_SUFFIX", "write_atomically", "write_text_atomically", "write_figure_atomically", "fsync_directory"]

#: Suffix of the temporary files :func:`write_atomically` creates (they also start with ``.``).
TEMP_SUFFIX = ".tmp"

# mkstemp creates files 0600; outputs get the mode plain open() would give them. Read once at
# import: os.umask can only be read by setting it, which is not thread-safe later on.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_directory(directory: Path) -> None:
    """fsync a directory so a rename inside it is durable (a no-op where directories cannot be opened)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file so readers see either the old content or the complete new one.

    The content goes to a new temporary file ``.<name>.<random>.tmp`` in the destination's
    directory, created with ``O_EXCL`` under an unpredictable name (:func:`tempfile.mkstemp`), so
    nothing planted there in advance is opened. It is flushed, fsynced and renamed over ``path``
    with :func:`os.replace`; the rename replaces a symlink at ``path`` itself and never writes
    through it to its target.

    Args:
        path: destination; its directory is created if needed.
        write: called with a binary file object open on the temporary file.

    Returns:
        ``path``.

    Raises:
        OSError: the directory is not writable, or ``path`` is an existing directory; the
            temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod"):  # POSIX only
                os.fchmod(handle.fileno(), 0o666 & ~_UMASK)
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def write_text_atomically(path: Path, text: str) -> Path:
    """:func:`write_atomically` for UTF-8 text."""
    return write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


def write_figure_atomically(figure: Any, path: Path, *, dpi: int = 120) -> Path:
    """Render a matplotlib ``figure`` as PNG in memory, then :func:`write_atomically` it to ``path``.

    ``savefig(path)`` would write in place and follow a symlink at ``path``.
    """
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=dpi)
    return write_atomically(Path(path), lambda handle: handle.write(image.getvalue()))
