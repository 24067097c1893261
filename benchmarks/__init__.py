"""Benchmarks: each prints a table, writes JSON to out/benchmarks/, and has --quick."""
