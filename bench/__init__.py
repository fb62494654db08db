"""Benchmarks: scripts that measure, never assert. Results go to bench/results/."""
