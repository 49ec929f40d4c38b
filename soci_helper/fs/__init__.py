"""Lazy layer filesystem: span manager, background fetch, the pyfuse3 layer filesystem and its server."""
