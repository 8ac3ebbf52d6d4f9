"""Helpers that tests and benchmarks share (nothing here is used at serving time)."""
