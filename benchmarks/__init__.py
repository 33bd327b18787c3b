"""Benchmarks: each prints a table, compares with a same-run baseline, and updates docs."""
