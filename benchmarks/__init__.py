"""Benchmarks: speed measurements (and, later, tasks and metrics)."""
