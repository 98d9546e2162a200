"""Base layer: helpers that every other part of accord may import and that import nothing from it.

* :mod:`accord.utils.checks` - argument validation with messages that name the argument;
* :mod:`accord.utils.schedules` - pure per-step schedules (momentum, temperature, learning rate);
* :mod:`accord.utils.files` - :func:`~accord.utils.files.write_atomically`, how every output file is written.

See docs/architecture.md ("Layers") for what may import what.
"""
