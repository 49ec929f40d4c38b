"""zTOC: tar table of contents, gzip checkpoints and their flatbuffer codec."""
