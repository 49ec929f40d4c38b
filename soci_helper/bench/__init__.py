"""Benchmarks of soci-helper's parts against reference tools (`soci-bench`)."""
