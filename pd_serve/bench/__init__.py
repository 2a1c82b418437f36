"""Benchmark clients' building blocks: trace loading, scaling and prompt synthesis."""
