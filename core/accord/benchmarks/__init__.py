"""Benchmarks of the accord core engine.

:mod:`accord.benchmarks.engine` compares the dense and the tiled InfoNCE (wall time and peak memory
per batch size, each measurement in a fresh process); run it with
``accord benchmark engine --speed tiled_infonce``. Submodules are not imported here, so that the
measuring child processes (``python -m accord.benchmarks.engine --child ...``) run them without a
double import.
"""
