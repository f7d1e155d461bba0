"""Exceptions shared by every lazyfs component.

Every error a user can provoke with bad input derives from :class:`LazyfsError`, so the CLI can print
one clear line instead of a traceback.
"""


class LazyfsError(Exception):
    """Base class of every error lazyfs reports to users."""


class FormatError(LazyfsError):
    """A bootstrap, blob or blob meta is malformed, truncated or unsupported."""


class DigestMismatch(FormatError):
    """Data does not match the digest recorded for it."""


class UnsafeEntryError(LazyfsError):
    """A layer tar or tree entry tries to escape its root or is otherwise unsafe."""


class BuildError(LazyfsError):
    """A source tree cannot be represented in a Nydus image."""
