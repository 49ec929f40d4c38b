"""The `mount.fuse.soci` helper: finds a layer's zTOC and starts the detached layer server that mounts it."""
