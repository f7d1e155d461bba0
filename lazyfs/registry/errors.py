"""Errors raised by the registry client; every one names the URL, reference or blob concerned."""

from lazyfs.errors import DigestMismatch, LazyfsError


class RegistryError(LazyfsError):
    """Base class of every registry client error."""


class InvalidReferenceError(RegistryError, ValueError):
    """An image reference, digest or platform string is malformed."""


class AuthError(RegistryError):
    """The registry or its token service refused our credentials (401 / 403)."""


class NotFoundError(RegistryError):
    """The manifest, blob or repository does not exist (404)."""


class UnavailableError(RegistryError):
    """The registry kept failing (429, 5xx, network errors or timeouts) after every retry."""


class ProtocolError(RegistryError):
    """The registry answered something unexpected, malformed, oversized or unsupported."""


class RegistryDigestMismatch(RegistryError, DigestMismatch):
    """Content fetched from or stored in the registry does not match its digest."""
