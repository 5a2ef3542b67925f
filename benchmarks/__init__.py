"""Benchmarks: each prints ratios against baselines run in the same process on the same data.

Run from the repository root as modules, e.g. ``python -m benchmarks.encoder_bench``.
"""
