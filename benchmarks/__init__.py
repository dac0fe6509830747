"""Benchmarks: each prints a table, writes it (and a plot) under ``benchmarks/results/``; run as
``python -m benchmarks.NAME`` from the repository root."""
