"""Structured ``event key=value`` log lines."""

from __future__ import annotations

import logging

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/|@")


def _value(value: object) -> str:
    text = str(value)
    if text and set(text) <= _SAFE:
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def line(event: str, **fields: object) -> str:
    """``event k1=v1 k2="v 2"``, quoting values that need it."""
    return " ".join([event, *(f"{k}={_value(v)}" for k, v in fields.items())])


def log(logger: logging.Logger, level: int, event: str, **fields: object) -> None:
    """Log one structured line at *level*."""
    if logger.isEnabledFor(level):
        logger.log(level, line(event, **fields))
