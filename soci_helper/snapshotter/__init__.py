"""containerd proxy snapshotter: snapshot metadata, overlay mounts and the gRPC Snapshots service."""
