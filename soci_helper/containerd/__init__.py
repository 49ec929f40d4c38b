"""Client side of containerd's gRPC API: generated stubs (see `protos`) and thin helpers (see `client`)."""
