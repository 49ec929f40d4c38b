"""Throw-away local services and sample images for the demo, the benchmarks and the tests."""
