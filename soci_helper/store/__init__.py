"""Local store: content blobs under named file locks, and the artifacts database."""
