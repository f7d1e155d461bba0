"""Shared pytest configuration: fixture modules are registered here, one per area."""

pytest_plugins: list[str] = ["tests.registry_fixtures", "tests.containerd_fixtures"]
