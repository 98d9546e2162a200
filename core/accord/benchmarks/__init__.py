"""Benchmarks of the accord core engine.

:mod:`accord.benchmarks.engine` compares the dense and the tiled InfoNCE (wall time and peak memory
per batch size, each measurement in a fresh process); run it with
``python -m accord.benchmarks.engine --help``. Submodules are not imported here, so that
``python -m`` runs them without a double import.
"""
