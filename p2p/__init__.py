"""Peer-to-peer distribution in Dragonfly v2's design: wire formats shared by peers, seeds and schedulers."""
