"""Chunks: codecs and digests, the per-host chunk cache (``cache``), blob backends (``backends``) and
the on-demand fetcher (``fetcher``) that the FUSE layer reads file data through."""
