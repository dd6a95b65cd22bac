"""Micro-benchmarks of single kernels and pieces of a step; see README.md here."""
