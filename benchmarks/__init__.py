"""Benchmarks: each writes JSON + a PNG plot and compares against a baseline measured in the same run."""
