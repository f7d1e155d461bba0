"""Image references: ``[host[:port]/]repository[:tag][@sha256:...]`` with Docker Hub defaults."""

from __future__ import annotations

import dataclasses
import re

from lazyfs.registry.digest import check_digest
from lazyfs.registry.errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DEFAULT_TAG = "latest"
_MAX_NAME = 255

_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]{{1,5}})?")
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"{_PATH_PART}(?:/{_PATH_PART})*")
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}")


def api_host(registry: str) -> str:
    """The host[:port] serving the registry API for *registry* (Docker Hub's differs from its name)."""
    return DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry


def check_repository(name: str) -> str:
    """Return repository *name* unchanged, or raise :class:`InvalidReferenceError` if it is malformed."""
    if not _PATH_RE.fullmatch(name) or len(name) > _MAX_NAME:
        raise InvalidReferenceError(f"invalid repository name {name[:100]!r}")
    return name


@dataclasses.dataclass(frozen=True)
class ImageReference:
    """A fully qualified image reference; ``str()`` gives a form :meth:`parse` maps back to it."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageReference:
        """Parse *text*, applying Docker's defaults (``docker.io``, ``library/``, ``:latest``)."""
        name, _, digest = text.partition("@")
        if digest:
            try:
                check_digest(digest)
            except InvalidReferenceError as exc:
                raise InvalidReferenceError(f"invalid image reference {text!r}: {exc}") from None
        slash = name.rfind("/")
        colon = name.rfind(":")
        tag = None
        if colon > slash:
            name, tag = name[:colon], name[colon + 1 :]
            if not _TAG_RE.fullmatch(tag):
                raise InvalidReferenceError(f"invalid image reference {text!r}: bad tag {tag!r}")
        registry, repository = _split_name(name)
        if not _DOMAIN_RE.fullmatch(registry) or not _PATH_RE.fullmatch(repository):
            raise InvalidReferenceError(
                f"invalid image reference {text!r}: expected host[:port]/name[:tag][@sha256:digest] "
                "with a lowercase name"
            )
        if len(registry) + 1 + len(repository) > _MAX_NAME:
            raise InvalidReferenceError(f"invalid image reference {text[:80]!r}...: name too long")
        if tag is None and not digest:
            tag = DEFAULT_TAG
        return cls(registry, repository, tag, digest or None)

    @property
    def reference(self) -> str:
        """What names the manifest in the API: the digest if known, else the tag."""
        reference = self.digest or self.tag
        if reference is None:
            raise InvalidReferenceError(f"image reference {self} has neither tag nor digest")
        return reference

    def with_digest(self, digest: str) -> ImageReference:
        """This reference pinned to *digest*."""
        return dataclasses.replace(self, digest=check_digest(digest))

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _split_name(name: str) -> tuple[str, str]:
    """Split a reference name into registry and repository, as Docker does."""
    first, sep, rest = name.partition("/")
    if not sep or ("." not in first and ":" not in first and first != "localhost" and first == first.lower()):
        first, rest = DOCKER_HUB, name
    if first == "index.docker.io":
        first = DOCKER_HUB
    if first == DOCKER_HUB and "/" not in rest:
        rest = f"library/{rest}"
    return first, rest
