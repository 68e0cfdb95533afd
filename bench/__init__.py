"""Benchmarks: `python -m bench.loader`."""
