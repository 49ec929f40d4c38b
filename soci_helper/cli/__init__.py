"""Command-line front ends: soci, soci-snapshotter-grpc, mount.fuse.soci."""
