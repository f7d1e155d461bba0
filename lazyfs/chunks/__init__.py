"""Chunks: compression codecs, digests and (later) the per-host chunk cache."""
