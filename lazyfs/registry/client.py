"""Async client for the OCI distribution API: manifests, blob downloads (ranged), uploads and mounts."""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import TracebackType

import httpx
import trio

from lazyfs.registry.auth import Credentials, load_docker_credentials
from lazyfs.registry.digest import DigestVerifier, check_digest, sha256_digest
from lazyfs.registry.errors import (
    InvalidReferenceError,
    ProtocolError,
    RegistryDigestMismatch,
    RegistryError,
    UnavailableError,
)
from lazyfs.registry.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    ImageIndex,
    ImageManifest,
    Platform,
    parse_manifest,
)
from lazyfs.registry.redirects import RedirectCache
from lazyfs.registry.reference import ImageReference, api_host, check_repository
from lazyfs.registry.transport import Call, RetryPolicy, Transport, describe

MAX_MANIFEST_SIZE = 4 << 20
_MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UPLOAD_RANGE_RE = re.compile(r"(?:bytes=)?0-(\d+)")
_FILE_READ_SIZE = 1 << 20
_OCTET_STREAM = {"Content-Type": "application/octet-stream"}

log = logging.getLogger(__name__)

BlobSource = bytes | Path
"""Blob content to upload: in memory, or a file read in chunks."""


def _pull(repo: str) -> tuple[str, ...]:
    """The token scopes for reading *repo*, after checking its name (it goes into URLs)."""
    return (f"repository:{check_repository(repo)}:pull",)


def _push(repo: str) -> tuple[str, ...]:
    """The token scopes for writing *repo*, after checking its name."""
    return (f"repository:{check_repository(repo)}:pull,push",)


class BlobStream:
    """An open blob download; iterate it for the bytes of the blob or of the requested range."""

    def __init__(self, response: httpx.Response, what: str) -> None:
        self._chunks = response.aiter_bytes()
        self._what = what
        length = response.headers.get("content-length", "")
        self.length: int | None = int(length) if length.isdigit() else None
        """Bytes this stream will deliver, when the registry says."""

    def __aiter__(self) -> BlobStream:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._chunks)
        except httpx.TransportError as exc:
            raise UnavailableError(f"{self._what}: download interrupted: {describe(exc)}") from exc


class RegistryClient:
    """One registry's API; use as ``async with RegistryClient("host:port") as client:``.

    Credentials default to the Docker config's entry for the registry. Plain HTTP is refused unless
    *plain_http* is set; *verify* may be an ``ssl.SSLContext`` trusting a private CA. Uploads larger
    than *chunked_threshold* go in PATCH chunks of *chunk_size*. Where blob downloads get redirected
    (to signed storage URLs, typically) is remembered in *redirects*.

    With *mirror* (``http://127.0.0.1:4001``, say: the local lazyfs peer's proxy), every registry API request
    goes to the mirror instead, naming the registry in ``X-Dragonfly-Registry``; the registry's token service
    is still asked directly, and the resulting Authorization header goes to the mirror.
    """

    def __init__(
        self,
        registry: str,
        *,
        credentials: Credentials | None = None,
        docker_config: bool = True,
        plain_http: bool = False,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        chunk_size: int = 16 << 20,
        chunked_threshold: int = 64 << 20,
        verify: ssl.SSLContext | bool = True,
        redirects: RedirectCache | None = None,
        mirror: str | None = None,
    ) -> None:
        if credentials is None and docker_config:
            credentials = load_docker_credentials(registry)
        self.registry = registry
        self._chunk_size = chunk_size
        self._chunked_threshold = chunked_threshold
        self._transport = Transport(
            api_host(registry),
            credentials,
            plain_http=plain_http,
            timeout=timeout,
            retry=retry or RetryPolicy(),
            verify=verify,
            mirror=mirror,
        )
        self._base = self._transport.base_url
        self._redirects = RedirectCache() if redirects is None else redirects

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the client's connections."""
        await self._transport.aclose()

    async def ping(self) -> None:
        """Check that the registry speaks the v2 API and accepts our credentials (if it wants any)."""
        await self._transport.request(Call("GET", f"{self._base}/v2/", f"registry {self.registry}", ()))

    async def fetch_manifest(self, ref: ImageReference | str) -> ImageManifest | ImageIndex:
        """The manifest or index *ref* names, checked against its digest."""
        ref = self._reference(ref)
        what = f"manifest {ref}"
        url = f"{self._base}/v2/{ref.repository}/manifests/{ref.reference}"
        call = Call("GET", url, what, _pull(ref.repository), headers={"Accept": _MANIFEST_ACCEPT})
        response, body = await self._transport.request(call, MAX_MANIFEST_SIZE)
        manifest = parse_manifest(body, response.headers.get("content-type", ""), what)
        expected = ref.digest or response.headers.get("docker-content-digest", "")
        if expected.startswith("sha256:") and manifest.digest != expected:
            raise RegistryDigestMismatch(f"{what}: content has digest {manifest.digest}, expected {expected}")
        return manifest

    async def get_manifest(self, ref: ImageReference | str, platform: Platform | str = "linux/amd64") -> ImageManifest:
        """The image manifest for *ref*, resolving an index or manifest list to *platform*."""
        ref = self._reference(ref)
        manifest = await self.fetch_manifest(ref)
        if isinstance(manifest, ImageManifest):
            return manifest
        wanted = Platform.parse(platform) if isinstance(platform, str) else platform
        chosen = await self.fetch_manifest(ref.with_digest(manifest.select(wanted, f"index {ref}").digest))
        if isinstance(chosen, ImageIndex):
            raise ProtocolError(f"index {ref}: entry for {wanted} is itself an index")
        return chosen

    async def put_manifest(self, ref: ImageReference | str, data: bytes, media_type: str) -> str:
        """Store a manifest under *ref*'s tag (or its digest) and return the manifest digest."""
        ref = self._reference(ref)
        digest = sha256_digest(data)
        what = f"manifest {ref}"
        if ref.digest and ref.digest != digest:
            raise RegistryDigestMismatch(f"{what}: content has digest {digest}")
        url = f"{self._base}/v2/{ref.repository}/manifests/{ref.tag or digest}"
        call = Call("PUT", url, what, _push(ref.repository), (201,), {"Content-Type": media_type}, data)
        response, _ = await self._transport.request(call)
        _check_stored_digest(response, digest, what)
        return digest

    @asynccontextmanager
    async def get_blob_stream(
        self, repo: str, digest: str, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[BlobStream]:
        """Open a blob download, following redirects; *offset*/*length* request a byte range (206).

        A blob the registry redirected to a URL fetched without credentials is read straight from that
        URL (still without credentials) until it expires or fails once, then through the registry again.
        """
        what = f"blob {check_digest(digest)} in {repo}"
        if offset < 0 or (length is not None and length <= 0):
            raise ValueError(f"{what}: invalid range offset={offset} length={length}")
        headers = {}
        if offset or length is not None:
            last = "" if length is None else str(offset + length - 1)
            headers["Range"] = f"bytes={offset}-{last}"
        async with AsyncExitStack() as stack:
            response = await self._open_blob(stack, repo, digest, headers, what)
            if headers:
                _check_content_range(response, offset, length, what)
            yield BlobStream(response, what)

    async def _open_blob(
        self, stack: AsyncExitStack, repo: str, digest: str, headers: dict[str, str], what: str
    ) -> httpx.Response:
        """GET a blob from its remembered storage URL, or else (or if that fails) from the registry."""
        key = (repo, digest)
        cached = self._redirects.get(key)
        if cached is not None:
            call = Call("GET", cached, what, (), (200, 206), headers, authenticate=False, attempts=1)
            try:
                return await stack.enter_async_context(self._transport.stream(call))
            except RegistryError as exc:
                log.debug("%s: remembered storage URL failed, asking the registry again: %s", what, exc)
                self._redirects.discard(key)
        url = f"{self._base}/v2/{repo}/blobs/{digest}"
        call = Call("GET", url, what, _pull(repo), (200, 206), headers)
        response = await stack.enter_async_context(self._transport.stream(call))
        if response.history and "authorization" not in response.request.headers:
            self._redirects.put(key, response.url)
        return response

    async def fetch_blob_to_file(
        self,
        repo: str,
        digest: str,
        path: Path,
        progress: Callable[[int], None] | None = None,
        *,
        size: int | None = None,
    ) -> int:
        """Download a blob to *path* (atomically, via ``.part``), verifying its digest; return its size.

        *progress* is called with the bytes received so far; a known *size* caps the download.
        """
        what = f"blob {check_digest(digest)} in {repo}"
        verifier = DigestVerifier(digest, what)
        part = trio.Path(path.with_name(path.name + ".part"))
        received = 0
        try:
            async with await trio.open_file(part, "wb") as out, self.get_blob_stream(repo, digest) as stream:
                async for chunk in stream:
                    received += len(chunk)
                    if size is not None and received > size:
                        raise ProtocolError(f"{what}: registry sent more than the expected {size} bytes")
                    verifier.update(chunk)
                    await out.write(chunk)
                    if progress:
                        progress(received)
            verifier.verify()
            await part.replace(path)
        except BaseException:
            await part.unlink(missing_ok=True)
            raise
        return received

    async def blob_exists(self, repo: str, digest: str) -> bool:
        """Whether *repo* has the blob (HEAD request)."""
        return await self._blob_exists(repo, check_digest(digest), _pull(repo))

    async def _blob_exists(self, repo: str, digest: str, scopes: tuple[str, ...]) -> bool:
        url = f"{self._base}/v2/{repo}/blobs/{digest}"
        call = Call("HEAD", url, f"blob {digest} in {repo}", scopes, (200, 404))
        response, _ = await self._transport.request(call)
        return response.status_code == 200

    async def push_blob(
        self, repo: str, data: BlobSource, digest: str | None = None, *, mount_from: str | None = None
    ) -> str:
        """Upload a blob unless *repo* has it, or mount it from repository *mount_from*; return its digest.

        A mount the registry declines (202) falls back to uploading. Sizes above the chunked
        threshold are sent in PATCH chunks, smaller ones in a single PUT.
        """
        digest = check_digest(digest) if digest else await _digest_of(data)
        what = f"blob {digest} to {repo}"
        scopes = _push(repo)
        uploads = f"{self._base}/v2/{repo}/blobs/uploads/"
        if mount_from:
            scopes += _pull(mount_from)
            uploads += f"?mount={digest}&from={mount_from}"
        elif await self._blob_exists(repo, digest, scopes):
            return digest
        response, _ = await self._transport.request(Call("POST", uploads, what, scopes, (201, 202), idempotent=False))
        if response.status_code == 201 and mount_from:
            return digest
        location = _location(response, what)
        size = len(data) if isinstance(data, bytes) else (await trio.Path(data).stat()).st_size
        body = b""
        if size > self._chunked_threshold:
            location = await self._upload_chunks(location, data, size, what, scopes)
        else:
            body = data if isinstance(data, bytes) else await trio.Path(data).read_bytes()
        url = location.copy_merge_params({"digest": digest})
        response, _ = await self._transport.request(
            Call("PUT", url, what, scopes, (201,), _OCTET_STREAM, body, idempotent=False)
        )
        _check_stored_digest(response, digest, what)
        return digest

    async def _upload_chunks(
        self, location: httpx.URL, data: BlobSource, size: int, what: str, scopes: tuple[str, ...]
    ) -> httpx.URL:
        """PATCH the data in chunks with Content-Range; return the location for the closing PUT.

        File chunks are streamed in small pieces, so no chunk-sized buffer is ever held in memory.
        """
        for offset in range(0, size, self._chunk_size):
            end = min(offset + self._chunk_size, size) - 1
            headers = {**_OCTET_STREAM, "Content-Range": f"{offset}-{end}", "Content-Length": str(end - offset + 1)}
            body = data[offset : end + 1] if isinstance(data, bytes) else _file_range(data, offset, end + 1 - offset)
            call = Call("PATCH", location, what, scopes, (202,), headers, body, idempotent=False)
            response, _ = await self._transport.request(call)
            stored = _UPLOAD_RANGE_RE.fullmatch(response.headers.get("range", f"0-{end}"))
            if not stored or int(stored.group(1)) != end:
                acked = response.headers.get("range")
                raise ProtocolError(f"{what}: registry acknowledged {acked!r} after we sent 0-{end}")
            location = _location(response, what)
        return location

    def _reference(self, ref: ImageReference | str) -> ImageReference:
        """Parse *ref* if needed and check that it names an image on this client's registry."""
        parsed = ImageReference.parse(ref) if isinstance(ref, str) else ref
        if api_host(parsed.registry) != api_host(self.registry):
            raise InvalidReferenceError(f"image {parsed} is not on registry {self.registry}")
        return parsed


def _location(response: httpx.Response, what: str) -> httpx.URL:
    """The absolute upload URL from a response's Location header."""
    location = response.headers.get("location")
    if not location:
        raise ProtocolError(f"{what}: registry sent no upload Location")
    return response.url.join(location)


def _check_content_range(response: httpx.Response, offset: int, length: int | None, what: str) -> None:
    """Make sure the answer to a ranged request is a 206 covering the range we asked for."""
    if response.status_code != 206:
        raise ProtocolError(f"{what}: registry ignored the Range request (answered {response.status_code})")
    header = response.headers.get("content-range", "")
    match = _CONTENT_RANGE_RE.fullmatch(header)
    if not match or int(match.group(1)) != offset:
        raise ProtocolError(f"{what}: asked for bytes from {offset}, got Content-Range {header[:100]!r}")
    if length is not None and int(match.group(2)) > offset + length - 1:
        raise ProtocolError(f"{what}: Content-Range {header[:100]!r} exceeds the {length} bytes asked for")


def _check_stored_digest(response: httpx.Response, digest: str, what: str) -> None:
    """Compare the registry's Docker-Content-Digest (if sent) with ours."""
    stored = response.headers.get("docker-content-digest")
    if stored and stored != digest:
        raise RegistryDigestMismatch(f"{what}: registry stored it as {stored[:80]}, expected {digest}")


async def _file_range(path: Path, offset: int, length: int) -> AsyncIterator[bytes]:
    """*length* bytes of *path* from *offset*, in pieces of at most ``_FILE_READ_SIZE``."""
    async with await trio.open_file(path, "rb") as source:
        await source.seek(offset)
        while length > 0:
            piece = await source.read(min(_FILE_READ_SIZE, length))
            if not piece:
                raise ProtocolError(f"{path} shrank while it was being uploaded")
            length -= len(piece)
            yield piece


async def _digest_of(data: BlobSource) -> str:
    """The sha256 digest of in-memory or file content, hashed off the event loop."""
    if isinstance(data, bytes):
        return await trio.to_thread.run_sync(sha256_digest, data)

    def hash_file() -> str:
        digest = hashlib.sha256()
        with data.open("rb") as source:
            while block := source.read(_FILE_READ_SIZE):
                digest.update(block)
        return "sha256:" + digest.hexdigest()

    return await trio.to_thread.run_sync(hash_file)
