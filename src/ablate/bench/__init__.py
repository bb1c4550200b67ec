"""Benchmarks run with `python -m ablate.bench.<name>`."""
