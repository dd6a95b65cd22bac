"""Benchmarks a user runs: `python -m benchmarks.throughput`, `python -m benchmarks.batch1_floor`."""
