"""Benchmarks: each times ours and a reference in one run; `make bench` runs them all."""
