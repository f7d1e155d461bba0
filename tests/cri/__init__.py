"""A minimal CRI client for tests (runtime.v1 over containerd's socket)."""
