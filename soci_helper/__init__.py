"""Lazy-loading snapshotter for containerd driven by SOCI indexes."""

__version__ = "0.1.0"
