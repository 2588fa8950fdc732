"""Benchmarks and measurements; each module prints its figures (never run by the test suite)."""
