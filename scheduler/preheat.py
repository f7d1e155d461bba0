"""Preheat: have seed peers fetch an image's blobs (or one file) before anyone asks (protocol doc §5.1).

``Scheduler.PreheatImage`` resolves the manifest URL (``scheme://host/v2/<name>/manifests/<ref>``; an index is
narrowed to the requested platform) with the lazyfs registry client and turns the config and every layer into a
``common.Download`` of ``scheme://host/v2/<name>/blobs/<digest>``. Those URLs, and the Download fields that enter
the task id (tag, application, piece_length, filtered query params), are exactly what a pull through a peer's
registry mirror produces for the same registry (p2p/proxy.py: upstream ``X-Dragonfly-Registry`` + request path,
no tag, application or piece length), so the later pull finds the preheated tasks (Dragonfly's DF#3674 pitfall).

Each Download goes to a seed's ``DfdaemonUpload.DownloadTask`` with ``need_back_to_source`` set, and the stream is
drained until the seed has every piece. ``single_seed_peer`` (the default) picks the seed by consistent hash of the
task id, the same seed a later seed trigger for the task would pick; ``all_seed_peers`` uses every seed (narrowed by
``ips``, else ``count``, else ``percentage``). At most ``concurrent_task_count`` (default 8) downloads run at once.
``PreheatFile`` does the same for one URL.

Handlers run on grpcio worker threads: the manifest is resolved in one ``trio.run`` on that thread, the seed
downloads on a thread pool. Failures end the RPC with a status: INVALID_ARGUMENT (bad URL, platform or scope),
NOT_FOUND (no such image or platform), UNAUTHENTICATED / PERMISSION_DENIED (the registry refused the login),
UNAVAILABLE (no seed peer, registry unreachable), DEADLINE_EXCEEDED, or FAILED_PRECONDITION naming each blob that
failed. A successful call sets trailing metadata ``x-lazyfs-preheat-tasks`` / ``-bytes`` / ``-seeds`` for callers
that want a summary.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import logging
import math
import re
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import urlsplit

import grpc
import httpx
import trio

from lazyfs.registry.auth import Credentials
from lazyfs.registry.client import MAX_MANIFEST_SIZE, RegistryClient
from lazyfs.registry.errors import (
    AuthError,
    InvalidReferenceError,
    NotFoundError,
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
from lazyfs.registry.reference import DOCKER_HUB, ImageReference, api_host, check_repository
from p2p.api import common, dfdaemon, scheduler, scheduler_stub, upload_stub
from p2p.download import download_task_id
from p2p.grpc_bridge import channel
from p2p.scheduler_ring import HashRing
from scheduler import logfmt
from scheduler.config import SchedulerConfig
from scheduler.errors import ServiceError
from scheduler.resources import Resources

log = logging.getLogger(__name__)

SINGLE_SEED_PEER = "single_seed_peer"
ALL_SEED_PEERS = "all_seed_peers"
ALL_PEERS = "all_peers"
SCOPES = (SINGLE_SEED_PEER, ALL_SEED_PEERS)
DEFAULT_CONCURRENT_TASKS = 8
MAX_CONCURRENT_TASKS = 100
DEFAULT_PLATFORM = "linux/amd64"
DOCKER_HUB_MIRROR_HOST = "index.docker.io"  # what `setup containerd --mirror` sends as X-Dragonfly-Registry
METADATA_TASKS = "x-lazyfs-preheat-tasks"
METADATA_BYTES = "x-lazyfs-preheat-bytes"
METADATA_SEEDS = "x-lazyfs-preheat-seeds"
_MANIFEST_PATH = re.compile(r"/v2/(?P<name>.+)/manifests/(?P<reference>[^/]+)")
_BLOB_PATH = re.compile(r"/v2/.+/blobs/(?P<digest>sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
_REGISTRY_TIMEOUT = 30.0
_MANIFEST_ACCEPT = ", ".join((OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST))


# --- URLs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestURL:
    """A parsed manifest URL: ``base`` is ``scheme://host[:port]`` exactly as the registry is reached."""

    base: str
    repository: str
    reference: str

    @property
    def plain_http(self) -> bool:
        """Whether the registry is plain HTTP (the URL's scheme says)."""
        return self.base.startswith("http://")

    @property
    def host(self) -> str:
        """``host[:port]``."""
        return self.base.split("://", 1)[1]

    def image(self) -> ImageReference:
        """The image reference for the registry client (the host as given, never Docker Hub's alias)."""
        if self.reference.startswith(("sha256:", "sha512:")):
            return ImageReference(self.host, self.repository, None, self.reference)
        return ImageReference(self.host, self.repository, self.reference, None)

    def blob_url(self, digest: str) -> str:
        """The URL a blob of this image is fetched from, as the registry mirror builds it."""
        return blob_url(self.base, self.repository, digest)


def parse_manifest_url(url: str) -> ManifestURL:
    """Split ``http(s)://host[:port]/v2/<name>/manifests/<tag|digest>``; INVALID_ARGUMENT if it is not one."""
    parts = urlsplit(url.strip())
    match = _MANIFEST_PATH.fullmatch(parts.path)
    if parts.scheme not in ("http", "https") or not parts.netloc or match is None or parts.query or parts.fragment:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"preheat url {url!r} is not a manifest URL http(s)://host/v2/<name>/manifests/<reference>")
    try:
        repository = check_repository(match["name"])
    except InvalidReferenceError as exc:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"preheat url {url!r}: {exc}") from None
    return ManifestURL(f"{parts.scheme}://{parts.netloc}", repository, match["reference"])


def blob_url(base: str, repository: str, digest: str) -> str:
    """``scheme://host/v2/<repository>/blobs/<digest>``: the URL the peer proxy downloads for a mirrored blob GET."""
    return f"{base.rstrip('/')}/v2/{repository}/blobs/{digest}"


def registry_base(registry: str, plain_http: bool = False) -> str:
    """``scheme://host`` of a registry name as pulls through the mirror reach it (Docker Hub: index.docker.io)."""
    host = DOCKER_HUB_MIRROR_HOST if registry == DOCKER_HUB else api_host(registry)
    return f"{'http' if plain_http else 'https'}://{host}"


def manifest_url(reference: str | ImageReference, plain_http: bool = False) -> str:
    """The manifest URL ``PreheatImage`` takes for an image reference (``127.0.0.1:5000/app:1`` →
    ``http://127.0.0.1:5000/v2/app/manifests/1`` with *plain_http*)."""
    ref = ImageReference.parse(reference) if isinstance(reference, str) else reference
    return f"{registry_base(ref.registry, plain_http)}/v2/{ref.repository}/manifests/{ref.reference}"


# --- requests -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """The parts of a preheat request shared by image and file preheats."""

    header: Mapping[str, str]
    tag: str = ""
    application: str = ""
    piece_length: int | None = None
    filtered_query_params: tuple[str, ...] = ()
    priority: int = common.LEVEL0
    scope: str = SINGLE_SEED_PEER
    ips: tuple[str, ...] = ()
    count: int | None = None
    percentage: int | None = None
    concurrent_task_count: int = DEFAULT_CONCURRENT_TASKS
    timeout: float | None = None
    certificate_chain: tuple[bytes, ...] = ()
    insecure_skip_verify: bool = False
    task_id_by_blob_digest: bool = False

    @classmethod
    def from_request(cls, request: Any, header: Mapping[str, str]) -> Options:
        """From a PreheatImageRequest or PreheatFileRequest, with the request headers to send the origin."""
        scope = request.scope.strip() or SINGLE_SEED_PEER
        if scope not in SCOPES:
            reason = ("is not supported (seed peers only)" if scope == ALL_PEERS
                      else f"is unknown (expected one of {', '.join(SCOPES)})")
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"preheat scope {scope!r} {reason}")
        concurrency = request.concurrent_task_count if request.HasField("concurrent_task_count") else 0
        if concurrency < 0 or concurrency > MAX_CONCURRENT_TASKS:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"concurrent_task_count {concurrency} is not 1..{MAX_CONCURRENT_TASKS}")
        percentage = request.percentage if request.HasField("percentage") else None
        if percentage is not None and not 1 <= percentage <= 100:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"percentage {percentage} is not 1..100")
        timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else None
        return cls(
            header=dict(header),
            tag=request.tag,
            application=request.application,
            piece_length=request.piece_length if request.HasField("piece_length") else None,
            filtered_query_params=tuple(request.filtered_query_params),
            priority=request.priority,
            scope=scope,
            ips=tuple(request.ips),
            count=request.count if request.HasField("count") and request.count > 0 else None,
            percentage=percentage,
            concurrent_task_count=concurrency or DEFAULT_CONCURRENT_TASKS,
            timeout=timeout if timeout and timeout > 0 else None,
            certificate_chain=tuple(request.certificate_chain),
            insecure_skip_verify=request.insecure_skip_verify,
            task_id_by_blob_digest=getattr(request, "enable_task_id_based_blob_digest", False),
        )

    def download(self, url: str, digest: str = "") -> common.Download:
        """The seed's Download for *url*: the fields that make the task id as a mirrored pull makes them."""
        download = common.Download(url=url, type=common.STANDARD, priority=self.priority,  # type: ignore[arg-type]
                                   request_header=dict(self.header), need_back_to_source=True,
                                   filtered_query_params=list(self.filtered_query_params),
                                   certificate_chain=list(self.certificate_chain),
                                   enable_task_id_based_blob_digest=self.task_id_by_blob_digest)
        if self.tag:
            download.tag = self.tag
        if self.application:
            download.application = self.application
        if self.piece_length is not None:
            download.piece_length = self.piece_length
        if not digest and (match := _BLOB_PATH.fullmatch(urlsplit(url).path)):
            digest = match["digest"]
        if digest:
            download.digest = digest  # the seed checks the whole blob against it
        return download


def request_headers(header: Mapping[str, str], username: str = "", password: str = "") -> dict[str, str]:
    """The headers every seed sends the origin: the given map, with ``Authorization: Basic`` from a login."""
    headers = {k: v for k, v in header.items() if not (username and k.lower() == "authorization")}
    if username:
        headers["Authorization"] = Credentials(username, password).basic_header()
    return headers


def _login(headers: Mapping[str, str]) -> tuple[Credentials | None, str | None]:
    """A Basic ``Authorization`` header as credentials for the registry client; any other scheme as is."""
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    if not value:
        return None, None
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() == "basic":
        try:
            user, sep, secret = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if sep:
            return Credentials(user, secret), None
    return None, value


# --- manifest resolution ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Blob:
    """One blob to preheat."""

    url: str
    digest: str
    size: int
    kind: str  # config or layer


async def resolve_image(target: ManifestURL, headers: Mapping[str, str], platform: str,
                        verify: ssl.SSLContext | bool = True) -> list[Blob]:
    """The config and layer blobs of the image at *target* for *platform* (an index is resolved).

    Basic credentials (or none) go through the registry client, which fetches bearer tokens itself; an
    ``Authorization`` header of another scheme (a bearer token the caller already holds) is sent as given.
    """
    wanted = Platform.parse(platform or DEFAULT_PLATFORM)
    credentials, other = _login(headers)
    ref = target.image()
    if other is not None:
        fetch: Callable[[ImageReference], Awaitable[ImageManifest | ImageIndex]]
        async with httpx.AsyncClient(verify=verify, timeout=_REGISTRY_TIMEOUT, follow_redirects=True,
                                     trust_env=False) as http:
            fetch = partial(_fetch_with_header, http, target, dict(headers))
            manifest = await _select(fetch, ref, wanted)
    else:
        async with RegistryClient(target.host, credentials=credentials, docker_config=False,
                                  plain_http=target.plain_http, timeout=_REGISTRY_TIMEOUT, verify=verify) as client:
            manifest = await _select(client.fetch_manifest, ref, wanted)
    blobs = [Blob(target.blob_url(manifest.config.digest), manifest.config.digest, manifest.config.size, "config")]
    seen = {manifest.config.digest}
    for layer in manifest.layers:
        if layer.digest not in seen:
            seen.add(layer.digest)
            blobs.append(Blob(target.blob_url(layer.digest), layer.digest, layer.size, "layer"))
    return blobs


async def _select(fetch: Callable[[ImageReference], Awaitable[ImageManifest | ImageIndex]], ref: ImageReference,
                  wanted: Platform) -> ImageManifest:
    """The manifest *ref* names, through its index entry for *wanted* if it is an index."""
    manifest = await fetch(ref)
    if isinstance(manifest, ImageIndex):
        chosen = manifest.select(wanted, f"index {ref}")
        manifest = await fetch(ref.with_digest(chosen.digest))
        if isinstance(manifest, ImageIndex):
            raise NotFoundError(f"index {ref}: the entry for {wanted} is itself an index")
    return manifest


async def _fetch_with_header(http: httpx.AsyncClient, target: ManifestURL, headers: dict[str, str],
                             ref: ImageReference) -> ImageManifest | ImageIndex:
    """GET a manifest with the caller's own headers (no token dance), checked against its digest."""
    url = f"{target.base}/v2/{ref.repository}/manifests/{ref.reference}"
    what = f"manifest {ref}: GET {url}"
    try:
        response = await http.get(url, headers={**headers, "Accept": _MANIFEST_ACCEPT})
    except httpx.HTTPError as exc:
        raise UnavailableError(f"{what}: {exc}") from None
    status = f"{what}: {response.status_code} {response.reason_phrase}"
    if response.status_code in (401, 403):
        raise AuthError(f"{status}: the Authorization header was refused")
    if response.status_code == 404:
        raise NotFoundError(status)
    if response.status_code == 429 or response.status_code >= 500:
        raise UnavailableError(status)
    if response.status_code != 200:
        raise ProtocolError(f"{status}: unexpected status")
    if len(response.content) > MAX_MANIFEST_SIZE:
        raise ProtocolError(f"{what}: manifest larger than {MAX_MANIFEST_SIZE} bytes")
    manifest = parse_manifest(response.content, response.headers.get("content-type", ""), what)
    expected = ref.digest or response.headers.get("docker-content-digest", "")
    if expected.startswith("sha256:") and manifest.digest != expected:
        raise RegistryDigestMismatch(f"{what}: content has digest {manifest.digest}, expected {expected}")
    return manifest


def registry_status(exc: RegistryError) -> grpc.StatusCode:
    """The gRPC status for a registry failure while resolving an image."""
    if isinstance(exc, AuthError):
        denied = " 403" in str(exc) or "(403)" in str(exc)
        return grpc.StatusCode.PERMISSION_DENIED if denied else grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, NotFoundError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, InvalidReferenceError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.FAILED_PRECONDITION


# --- seed downloads --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SeedTarget:
    """A seed host and its DfdaemonUpload address."""

    host_id: str
    ip: str
    address: str


@dataclass(frozen=True, slots=True)
class Job:
    """One seed download."""

    download: common.Download
    task_id: str
    seed: SeedTarget
    what: str


@dataclass
class Summary:
    """What a preheat did."""

    tasks: int = 0
    bytes: int = 0
    seeds: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)


def choose_seeds(resources: Resources, task_id: str, options: Options) -> list[SeedTarget]:
    """The seeds that preheat *task_id*: one by consistent hash, or all (narrowed by ips, count, percentage)."""
    with resources.lock:
        seeds = {h.id: SeedTarget(h.id, h.proto.ip, f"{h.proto.ip}:{h.proto.port}") for h in resources.seeds()}
    if not seeds:
        return []
    if options.scope == SINGLE_SEED_PEER:
        return [seeds[HashRing(seeds).node_for(task_id)]]
    chosen = sorted(seeds.values(), key=lambda s: s.host_id)
    if options.ips:
        return [s for s in chosen if s.ip in options.ips]
    if options.count is not None:
        return chosen[: options.count]
    if options.percentage is not None:
        return chosen[: max(1, math.ceil(len(chosen) * options.percentage / 100))]
    return chosen


class Preheater:
    """Runs preheats for the scheduler service; *connect* opens a channel to a seed (tests replace it)."""

    def __init__(self, resources: Resources, config: SchedulerConfig,
                 connect: Callable[[str], grpc.Channel] = channel) -> None:
        self.resources = resources
        self.config = config
        self.connect = connect

    def preheat_image(self, request: scheduler.PreheatImageRequest) -> Summary:
        """Resolve the image and have the seeds download its config and layers; ServiceError on failure."""
        started = time.monotonic()
        target = parse_manifest_url(request.url)
        header = request_headers(request.header, request.username, request.password)
        options = Options.from_request(request, header)
        platform = request.platform or DEFAULT_PLATFORM
        self._require_seeds()
        logfmt.log(log, logging.INFO, "preheat_image", url=request.url, platform=platform, scope=options.scope)
        try:
            blobs = trio.run(self._resolve, target, options, platform)
        except RegistryError as exc:
            logfmt.log(log, logging.WARNING, "preheat_resolve_failed", url=request.url, error=exc)
            raise ServiceError(registry_status(exc), f"preheat {request.url}: {exc}") from None
        except trio.TooSlowError:
            raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"preheat {request.url}: resolving the manifest timed out") from None
        logfmt.log(log, logging.INFO, "preheat_resolved", url=request.url, blobs=len(blobs),
                   bytes=sum(b.size for b in blobs))
        jobs = [(options.download(b.url, b.digest), f"{b.kind} {b.digest}") for b in blobs]
        return self._run(request.url, jobs, options, started)

    def preheat_file(self, request: scheduler.PreheatFileRequest) -> Summary:
        """Have the seeds download one URL; ServiceError on failure."""
        started = time.monotonic()
        parts = urlsplit(request.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"preheat url {request.url!r} is not http(s)")
        options = Options.from_request(request, request_headers(request.header))
        self._require_seeds()
        logfmt.log(log, logging.INFO, "preheat_file", url=request.url, scope=options.scope)
        return self._run(request.url, [(options.download(request.url), "file")], options, started)

    async def _resolve(self, target: ManifestURL, options: Options, platform: str) -> list[Blob]:
        verify: ssl.SSLContext | bool = not options.insecure_skip_verify
        if options.certificate_chain and not options.insecure_skip_verify:
            context = ssl.create_default_context()
            for der in options.certificate_chain:
                context.load_verify_locations(cadata=der)
            verify = context
        limit = options.timeout or self.config.seed_download_timeout
        with trio.fail_after(min(limit, 10 * _REGISTRY_TIMEOUT)):
            return await resolve_image(target, options.header, platform, verify)

    def _require_seeds(self) -> None:
        with self.resources.lock:
            if not self.resources.seeds():
                raise ServiceError(grpc.StatusCode.UNAVAILABLE,
                                   "no seed peer is announced to this scheduler: start `lazyfs peer --seed`")

    def _run(self, url: str, items: Sequence[tuple[common.Download, str]], options: Options,
             started: float) -> Summary:
        jobs = []
        for download, what in items:
            tid = download_task_id(download)
            seeds = choose_seeds(self.resources, tid, options)
            if not seeds:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE if not options.ips else grpc.StatusCode.NOT_FOUND,
                                   "no seed peer matches the preheat scope" if options.ips
                                   else "no seed peer is announced to this scheduler: start `lazyfs peer --seed`")
            jobs += [Job(download, tid, seed, what) for seed in seeds]
        deadline = started + (options.timeout or self.config.seed_download_timeout)
        summary = Summary()
        counted: set[str] = set()
        lock = threading.Lock()

        def run(job: Job) -> None:
            error, length = self._download(job, deadline)
            with lock:
                summary.seeds.add(job.seed.host_id)
                if error is not None:
                    summary.failures.append(f"{job.what} on {job.seed.host_id}: {error}")
                elif job.task_id not in counted:
                    counted.add(job.task_id)
                    summary.tasks += 1
                    summary.bytes += length

        workers = min(options.concurrent_task_count, len(jobs)) or 1
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="preheat") as pool:
            for future in [pool.submit(run, job) for job in jobs]:
                future.result()
        elapsed = time.monotonic() - started
        if summary.failures:
            logfmt.log(log, logging.WARNING, "preheat_failed", url=url, failed=len(summary.failures),
                       jobs=len(jobs), seconds=f"{elapsed:.2f}")
            code = (grpc.StatusCode.DEADLINE_EXCEEDED if time.monotonic() >= deadline
                    else grpc.StatusCode.FAILED_PRECONDITION)
            listing = "; ".join(summary.failures)
            raise ServiceError(code, f"preheat {url}: {len(summary.failures)} of {len(jobs)} downloads failed: "
                                     f"{listing}")
        logfmt.log(log, logging.INFO, "preheat_done", url=url, tasks=summary.tasks, bytes=summary.bytes,
                   seeds=len(summary.seeds), seconds=f"{elapsed:.2f}")
        return summary

    def _download(self, job: Job, deadline: float) -> tuple[str | None, int]:
        """Drain the seed's DownloadTask stream: (None, content length) or (error, 0)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "preheat timed out before the download started", 0
        logfmt.log(log, logging.INFO, "preheat_task", task=job.task_id, url=job.download.url, seed=job.seed.host_id)
        began = time.monotonic()
        length = 0
        try:
            with self.connect(job.seed.address) as chan:
                stream = upload_stub(chan).DownloadTask(dfdaemon.DownloadTaskRequest(download=job.download),
                                                        timeout=remaining)
                for answer in stream:
                    if answer.HasField("download_task_started_response"):
                        length = answer.download_task_started_response.content_length
        except grpc.RpcError as exc:
            error = f"{exc.code().name}: {exc.details()}"
            logfmt.log(log, logging.WARNING, "preheat_task_failed", task=job.task_id, seed=job.seed.host_id,
                       error=error)
            return error, 0
        logfmt.log(log, logging.INFO, "preheat_task_done", task=job.task_id, seed=job.seed.host_id, bytes=length,
                   seconds=f"{time.monotonic() - began:.2f}")
        return None, length


def trailing_metadata(summary: Summary) -> tuple[tuple[str, str], ...]:
    """The summary as trailing metadata of a successful preheat RPC."""
    return ((METADATA_TASKS, str(summary.tasks)), (METADATA_BYTES, str(summary.bytes)),
            (METADATA_SEEDS, str(len(summary.seeds))))


# --- client side (lazyfs preheat) ------------------------------------------------------------------------------


class PreheatError(OSError):
    """A preheat the scheduler refused or failed; the message is the scheduler's."""


@dataclass(frozen=True, slots=True)
class Result:
    """What ``lazyfs preheat`` reports."""

    scheduler: str
    tasks: int | None
    bytes: int | None
    seeds: int | None
    seconds: float


def call_preheat(schedulers: Iterable[str], request: scheduler.PreheatImageRequest, timeout: float | None,
                 connect: Callable[[str], grpc.Channel] = channel) -> Result:
    """Send PreheatImage to the first scheduler that answers (any one will do: it triggers the seeds itself)."""
    errors = []
    for address in schedulers:
        started = time.monotonic()
        try:
            with connect(address) as chan:
                _, call = scheduler_stub(chan).PreheatImage.with_call(request, timeout=timeout)
        except grpc.RpcError as exc:
            if _unreachable(exc):
                errors.append(f"{address}: {exc.details()}")
                continue  # try the next scheduler
            raise PreheatError(f"scheduler {address}: {exc.code().name}: {exc.details()}") from None
        metadata = dict(call.trailing_metadata() or ())

        def number(key: str, metadata: dict[str, Any] = metadata) -> int | None:
            value = metadata.get(key)
            return int(value) if isinstance(value, str) and value.isdigit() else None

        return Result(address, number(METADATA_TASKS), number(METADATA_BYTES), number(METADATA_SEEDS),
                      time.monotonic() - started)
    raise PreheatError("no scheduler answered: " + "; ".join(errors) if errors else "no scheduler given")


def _unreachable(exc: grpc.RpcError) -> bool:
    """Whether the call failed to reach the scheduler at all (not a status the scheduler chose)."""
    details = (exc.details() or "").lower()
    return exc.code() == grpc.StatusCode.UNAVAILABLE and ("connect" in details or "socket" in details)
