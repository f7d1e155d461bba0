"""RAFS (Nydus) image format: in-memory tree, bootstrap reader and writer, data blobs, merge."""
