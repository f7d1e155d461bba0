"""Seed peers: the only peers that fetch from the origin (registries and HTTP(S) servers)."""
