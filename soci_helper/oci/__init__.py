"""OCI images: references, descriptors, manifests, platforms, sources and the registry client."""
