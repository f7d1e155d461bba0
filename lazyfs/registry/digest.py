"""Content digests as used by registries: ``sha256:`` followed by 64 lowercase hex digits."""

from __future__ import annotations

import hashlib
import re

from lazyfs.registry.errors import InvalidReferenceError, RegistryDigestMismatch

_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


def check_digest(digest: str) -> str:
    """Return *digest* unchanged, or raise :class:`InvalidReferenceError` if it is not sha256."""
    if not _DIGEST_RE.fullmatch(digest):
        raise InvalidReferenceError(f"invalid digest {digest[:100]!r}: expected sha256:<64 hex digits>")
    return digest


def sha256_digest(data: bytes) -> str:
    """The ``sha256:...`` digest of *data*."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class DigestVerifier:
    """Hashes data as it streams by and checks it against an expected digest at the end."""

    def __init__(self, expected: str, what: str) -> None:
        self.expected = check_digest(expected)
        self._what = what
        self._hash = hashlib.sha256()

    def update(self, data: bytes) -> None:
        """Feed the next piece of content."""
        self._hash.update(data)

    def verify(self) -> None:
        """Raise :class:`RegistryDigestMismatch` naming the content unless the digest matches."""
        got = "sha256:" + self._hash.hexdigest()
        if got != self.expected:
            raise RegistryDigestMismatch(f"{self._what}: content has digest {got}, expected {self.expected}")
