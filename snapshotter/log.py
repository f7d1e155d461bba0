"""The snapshotter's logger and its ``key=value`` line format."""

from __future__ import annotations

import json
import logging

log = logging.getLogger("lazyfs.snapshotter")


def fields(**values: object) -> str:
    """``key=value`` pairs for a log line, None values left out; strings with spaces, quotes or ``=`` quoted."""
    parts = []
    for name, value in values.items():
        if value is None:
            continue
        text = str(value)
        if not text or any(c.isspace() or c in '"=' for c in text):
            text = json.dumps(text)
        parts.append(f"{name}={text}")
    return " ".join(parts)
