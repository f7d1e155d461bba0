"""Where blob downloads were redirected to, so later reads can go straight to the storage URL."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime

import httpx

DEFAULT_TTL = 600.0
"""Seconds to trust a redirect whose URL carries no recognisable expiry."""

EXPIRY_MARGIN = 30.0
"""Seconds before a signed URL's expiry at which it is no longer used (clock skew, slow transfers)."""

_SIGNED_PREFIXES = ("X-Amz", "X-Goog")  # S3 and GCS V4 signatures: <prefix>-Date plus <prefix>-Expires seconds
_STAMP_FORMAT = "%Y%m%dT%H%M%SZ"

BlobKey = tuple[str, str]
"""(repository, digest)."""


def signed_expiry(url: httpx.URL, now: float) -> float | None:
    """The Unix time at which *url*'s signature expires, if its query says so, else None.

    Understands ``X-Amz-``/``X-Goog-`` ``Expires`` seconds (counted from the matching ``-Date``, or
    from *now* without one) and an absolute ``Expires`` timestamp (S3 V2, CloudFront, GCS V2).
    """
    params = url.params
    for prefix in _SIGNED_PREFIXES:
        seconds = params.get(f"{prefix}-Expires", "")
        if seconds.isdigit():
            start = _parse_stamp(params.get(f"{prefix}-Date", ""))
            return (now if start is None else start) + int(seconds)
    absolute = params.get("Expires", "")
    return float(absolute) if absolute.isdigit() else None


def _parse_stamp(value: str) -> float | None:
    """An ISO 8601 basic UTC timestamp (``20240102T030405Z``) as Unix time."""
    try:
        return datetime.strptime(value, _STAMP_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


class RedirectCache:
    """Final redirect URLs of blob GETs per (repo, digest): LRU, each kept until its URL expires.

    *clock* gives Unix time (injectable for tests); entries live *ttl* seconds unless the URL's
    signature says otherwise (minus :data:`EXPIRY_MARGIN`).
    """

    def __init__(
        self, *, ttl: float = DEFAULT_TTL, max_entries: int = 1024, clock: Callable[[], float] = time.time
    ) -> None:
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[BlobKey, tuple[httpx.URL, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: BlobKey) -> httpx.URL | None:
        """The remembered URL for *key* unless it has expired."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        url, deadline = entry
        if self._clock() >= deadline:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return url

    def put(self, key: BlobKey, url: httpx.URL) -> None:
        """Remember *url* for *key* (not at all if it expires within the margin)."""
        now = self._clock()
        expiry = signed_expiry(url, now)
        deadline = now + self._ttl if expiry is None else expiry - EXPIRY_MARGIN
        if deadline <= now:
            self._entries.pop(key, None)
            return
        self._entries[key] = (url, deadline)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def discard(self, key: BlobKey) -> None:
        """Forget *key*'s URL."""
        self._entries.pop(key, None)
