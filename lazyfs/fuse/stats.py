"""Per-mount counters of what applications read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReadStats:
    """Reads served to applications by one mount."""

    reads: int = 0
    read_bytes: int = 0
    read_errors: int = 0
    lookups: int = 0
    opens: int = 0

    def as_dict(self) -> dict[str, int]:
        """A JSON-ready copy."""
        return dict(vars(self))
