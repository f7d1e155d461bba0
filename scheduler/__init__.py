"""The scheduler: hosts, tasks and peers of the swarm, and the parents each peer downloads from."""
