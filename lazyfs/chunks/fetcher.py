"""On-demand chunk fetching behind the chunk cache: the FUSE layer's source of file data.

:func:`open_fetcher` yields a :class:`ChunkFetcher`. A cache hit is read from the blob's
:class:`~lazyfs.chunks.cache.BlobCache`; a miss starts one *batch*: the chunk plus the following
missing chunks of the blob (in compressed order) that the same call wants too (a read's other chunks,
a prefetch list) or that lie within ``amplify`` bytes, all within ``merge_window``, read with one
backend range request. Every chunk of a batch has a *flight* that any number of readers wait on, so each
chunk is fetched once however many readers want it. Batches run in the fetcher's own nursery (a reader
giving up does not abort a fetch others wait for), retry with exponential backoff under a bounded
concurrency, and give up after ``read_timeout``. Data is decompressed and digest-checked before it is
returned or cached; a bad chunk fails only its own readers, with a log line naming blob and chunk.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import os
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence, Set
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from lazyfs.chunks.backends import Backend, BackendError
from lazyfs.chunks.cache import BlobCache, CacheManager, CacheMiss, blob_files, check_chunk
from lazyfs.chunks.codec import decompress
from lazyfs.chunks.digest import verify
from lazyfs.errors import DigestMismatch, FormatError, LazyfsError
from lazyfs.rafs.tree import BlobInfo, ChunkRef

log = logging.getLogger(__name__)

LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds (seconds) of the fetch latency histogram; a last, unbounded bucket follows."""


class FetchError(LazyfsError):
    """A chunk cannot be served (backend down past the read timeout, or bad data): the FUSE layer's EIO."""


class CorruptChunk(FetchError, DigestMismatch):
    """Fetched chunk data does not decompress or does not match its digest; it was neither cached nor returned."""


@dataclass(frozen=True)
class FetchOptions:
    """Fetcher settings; defaults follow nydusd (1 MiB requests, 8 fetch threads), except ``amplify``."""

    merge_window: int = 1 << 20  # most bytes one range request spans when merging neighbours
    amplify: int = 0  # bytes of neighbours nobody asked for that a miss may bring along (nydusd's amplify_io)
    concurrency: int = 8  # backend requests in flight at once
    prefetch_concurrency: int = 4  # of which prefetch may use at most this many (startup files are many and small)
    read_timeout: float = 30.0  # a read fails (EIO) after this long without data
    request_timeout: float = 10.0  # one backend request is abandoned and retried after this long
    retry_backoff: float = 0.1  # first retry delay, doubled per attempt
    retry_max_delay: float = 5.0
    durable: bool = True  # fdatasync chunk data before marking it ready
    verify_cached: bool = True  # re-check digests of chunks read from the disk cache
    memory_cache: int = 32 << 20  # bytes of recently returned chunks kept in memory (FUSE reads are small)

    def __post_init__(self) -> None:
        if min(self.merge_window, self.concurrency, self.prefetch_concurrency) < 1:
            raise ValueError("merge_window, concurrency and prefetch_concurrency must be positive")
        if min(self.memory_cache, self.amplify) < 0:
            raise ValueError("memory_cache and amplify must not be negative")
        if min(self.read_timeout, self.request_timeout, self.retry_backoff, self.retry_max_delay) <= 0:
            raise ValueError("timeouts and retry delays must be positive")


@dataclass
class FetchMetrics:
    """Counters of one fetcher; ``latency_counts[i]`` counts batches that took at most
    ``LATENCY_BUCKETS[i]`` seconds (and more than the previous bound; the last entry is unbounded)."""

    cache_hits: int = 0
    memory_hits: int = 0  # part of cache_hits served without touching the disk cache
    cache_misses: int = 0
    backend_requests: int = 0
    backend_errors: int = 0
    backend_bytes: int = 0
    prefetch_bytes: int = 0  # part of backend_bytes fetched by prefetch
    chunks_fetched: int = 0
    corrupt_chunks: int = 0
    failed_reads: int = 0
    in_flight: int = 0  # chunks being fetched right now
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe_latency(self, seconds: float) -> None:
        """Count one batch fetch that took *seconds*."""
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready copy, with the bucket bounds under ``latency_bounds``."""
        return {**dataclasses.asdict(self), "latency_bounds": list(LATENCY_BUCKETS)}


@dataclass(eq=False)
class _BlobState:
    blob: BlobInfo
    cache: BlobCache
    order: list[ChunkRef]  # the registered chunks by compressed offset
    position: dict[int, int]  # ci index -> position in order


@dataclass(eq=False)
class _Flight:
    """One chunk being fetched. After ``done``: data, or error, or neither when the fetch was abandoned."""

    batch: _Batch
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: FetchError | None = None


@dataclass(eq=False)
class _Batch:
    """Neighbouring chunks fetched with one range request."""

    state: _BlobState
    refs: list[ChunkRef]
    prefetch: bool
    flights: dict[int, _Flight] = field(default_factory=dict)
    last_error: str = "no backend answer yet"

    @property
    def start(self) -> int:
        return self.refs[0].compressed_offset

    @property
    def length(self) -> int:
        last = self.refs[-1]
        return last.compressed_offset + last.compressed_size - self.start


class _ChunkLRU:
    """Recently returned chunks, up to *limit* bytes in total."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0
        self._items: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def get(self, key: tuple[str, int]) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: tuple[str, int], data: bytes) -> None:
        if key in self._items or len(data) > self._limit:
            return
        self._items[key] = data
        self._size += len(data)
        while self._size > self._limit:
            self._size -= len(self._items.popitem(last=False)[1])


class _Pacer:
    """Spaces transfers so they average at most *rate* bytes/s; each waits until its share has elapsed."""

    def __init__(self, rate: int) -> None:
        if rate <= 0:
            raise ValueError(f"bandwidth limit must be positive, not {rate}")
        self._rate = rate
        self._free_at = trio.current_time()

    async def take(self, size: int) -> None:
        self._free_at = max(self._free_at, trio.current_time()) + size / self._rate
        await trio.sleep_until(self._free_at)


@asynccontextmanager
async def open_fetcher(
    backend: Backend, cache: CacheManager, options: FetchOptions | None = None, *, owner: str | None = None
) -> AsyncIterator[ChunkFetcher]:
    """A running fetcher; on exit its fetches are cancelled and its blobs closed and released.

    *owner* names the mount in the cache index (default: this process plus a random suffix).
    """
    fetcher: ChunkFetcher | None = None
    try:
        async with trio.open_nursery() as nursery:
            fetcher = ChunkFetcher(backend, cache, nursery, options or FetchOptions(),
                                   owner or f"pid{os.getpid()}-{uuid.uuid4().hex[:8]}")
            try:
                yield fetcher
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Batches never raise, so the group only wraps what the caller's block raised: unwrap it.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        if fetcher is not None:  # the nursery has drained: no batch touches the caches any more
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(fetcher.close_blobs)


class ChunkFetcher:
    """Serves verified chunks from the cache or a backend; create it with :func:`open_fetcher`."""

    def __init__(self, backend: Backend, cache: CacheManager, nursery: trio.Nursery, options: FetchOptions,
                 owner: str) -> None:
        self.backend = backend
        self.options = options
        self.owner = owner
        self.metrics = FetchMetrics()
        self._manager = cache
        self._nursery = nursery
        self._limiter = trio.CapacityLimiter(options.concurrency)
        self._prefetch_slots = trio.Semaphore(min(options.prefetch_concurrency, options.concurrency))
        self._register_lock = trio.Lock()
        self._blobs: dict[str, _BlobState] = {}
        self._flights: dict[tuple[str, int], _Flight] = {}
        self._memory = _ChunkLRU(options.memory_cache)

    # -- blobs ----------------------------------------------------------------------------------

    async def register_blob(self, blob: BlobInfo, chunks: Iterable[ChunkRef]) -> None:
        """Open *blob*'s cache and learn its chunks (all of them, ideally), the neighbours to merge."""
        order = sorted({ref.index: ref for ref in chunks}.values(), key=lambda r: r.compressed_offset)
        for ref in order:
            check_chunk(blob, ref)
        async with self._register_lock:
            state = self._blobs.get(blob.blob_id)
            if state is None:
                opener = functools.partial(self._manager.open_blob, blob, self.owner, durable=self.options.durable)
                cache = await trio.to_thread.run_sync(opener)
                state = self._blobs[blob.blob_id] = _BlobState(blob, cache, [], {})
            elif state.blob != blob:
                raise FormatError(f"blob {blob.blob_id} registered twice with different blob table entries")
            state.order = order
            state.position = {ref.index: i for i, ref in enumerate(order)}

    def close_blobs(self) -> None:
        """Close every blob cache and release it in the index (blocking; called on exit)."""
        for state in self._blobs.values():
            try:
                self._manager.touch(state.cache)
            finally:
                state.cache.close()
                self._manager.release(state.blob.blob_id, self.owner)
        self._blobs.clear()

    def complete_file(self, blob: BlobInfo) -> Path | None:
        """The cache's ``<blob_id>.blob.data`` once it holds every chunk of *blob*, else None.

        A complete file is exactly a kernel EROFS device for the blob: no daemon in the data path.
        """
        state = self._state(blob, ())
        if state.cache.ready_count() < blob.chunk_count:
            return None
        return blob_files(self._manager.cache_dir, blob.blob_id)[0]

    def _state(self, blob: BlobInfo, refs: Iterable[ChunkRef]) -> _BlobState:
        """The registered state of *blob*, after checking that *refs* lie inside it."""
        state = self._blobs.get(blob.blob_id)
        if state is None:
            raise ValueError(f"blob {blob.blob_id} was not registered with the fetcher")
        for ref in refs:
            check_chunk(state.blob, ref)
        return state

    # -- reads ----------------------------------------------------------------------------------

    async def get_chunk(self, blob: BlobInfo, ref: ChunkRef) -> bytes:
        """The verified, uncompressed data of one chunk; FetchError within ``read_timeout`` otherwise."""
        state = self._state(blob, [ref])
        return await self._get(state, ref, trio.current_time() + self.options.read_timeout)

    async def get_chunks(self, blob: BlobInfo, refs: Sequence[ChunkRef]) -> list[bytes]:
        """Several chunks at once (e.g. a read plus readahead), their misses merged into few requests."""
        state = self._state(blob, refs)
        deadline = trio.current_time() + self.options.read_timeout
        wanted = {ref.index for ref in refs}
        for ref in sorted(refs, key=lambda r: r.compressed_offset):
            if self._needs_fetch(state, ref):
                self._launch(state, ref, self._nursery, wanted)
        results: list[bytes | FetchError] = [b""] * len(refs)

        async def one(i: int, ref: ChunkRef) -> None:
            try:
                results[i] = await self._get(state, ref, deadline)
            except FetchError as exc:
                results[i] = exc

        async with trio.open_nursery() as nursery:
            for i, ref in enumerate(refs):
                nursery.start_soon(one, i, ref)
        out = []
        for result in results:
            if isinstance(result, FetchError):
                raise result
            out.append(result)
        return out

    async def read_ranges(self, blob: BlobInfo, spans: Sequence[tuple[ChunkRef, int, int]]) -> list[bytes]:
        """Byte ranges ``(ref, start, stop)`` of chunks of *blob*, in order.

        Cached chunks are read straight from the cache file, only the bytes asked for (their digest
        was checked when they were stored); the others are fetched together, as :meth:`get_chunks` does.
        """
        state = self._state(blob, [ref for ref, _, _ in spans])
        missing = [ref for ref, _, _ in spans if not state.cache.is_ready(ref.index)]
        fetched = dict(zip([r.index for r in missing], await self.get_chunks(blob, missing), strict=True))
        out = []
        for ref, start, stop in spans:
            data = fetched.get(ref.index)
            piece = data[start:stop] if data is not None else state.cache.read_range(ref, start, stop)
            if piece is None:  # invalidated since: fetch it again
                piece = (await self.get_chunk(blob, ref))[start:stop]
            elif data is None:
                self.metrics.cache_hits += 1
            out.append(piece)
        return out

    async def read_ahead(self, blob: BlobInfo, refs: Sequence[ChunkRef]) -> None:
        """Get *refs* ready for a sequential reader: cached ones into the page cache, the rest fetched."""
        state = self._state(blob, refs)
        missing = [ref for ref in refs if not state.cache.advise(ref)]
        if missing:
            await self.get_chunks(blob, missing)

    async def _get(self, state: _BlobState, ref: ChunkRef, deadline: float) -> bytes:
        key = (state.blob.blob_id, ref.index)
        data = self._memory.get(key)
        if data is not None:
            self.metrics.memory_hits += 1
            self.metrics.cache_hits += 1
            return data
        data = await self._from_cache(state, ref)
        if data is not None:
            self.metrics.cache_hits += 1
            self._memory.put(key, data)
            return data
        self.metrics.cache_misses += 1
        while True:
            flight = self._flights.get(key) or self._launch(state, ref, self._nursery, {ref.index})
            with trio.move_on_at(deadline):
                await flight.done.wait()
            if flight.data is not None:
                self._memory.put(key, flight.data)
                return flight.data
            retryable = not isinstance(flight.error, CorruptChunk) and trio.current_time() < deadline
            if flight.done.is_set() and retryable:
                continue  # abandoned (cancelled prefetch) or given up before our own deadline: try afresh
            self.metrics.failed_reads += 1
            error = flight.error or FetchError(
                f"no data after {self.options.read_timeout:g} s: {flight.batch.last_error}"
            )
            log.warning("read failed blob=%s chunk=%d error=%r", state.blob.blob_id, ref.index, str(error))
            raise error

    async def _from_cache(self, state: _BlobState, ref: ChunkRef) -> bytes | None:
        if not state.cache.is_ready(ref.index):
            return None
        reader = functools.partial(state.cache.read, ref, verify_digest=self.options.verify_cached)
        try:
            return await trio.to_thread.run_sync(reader)
        except CacheMiss:
            return None

    # -- batches --------------------------------------------------------------------------------

    def _needs_fetch(self, state: _BlobState, ref: ChunkRef) -> bool:
        return (state.blob.blob_id, ref.index) not in self._flights and not state.cache.is_ready(ref.index)

    def _plan(self, state: _BlobState, first: ChunkRef, wanted: Set[int]) -> list[ChunkRef]:
        """*first* plus the following registered chunks that are missing, fit in the merge window, lie
        next to each other and are *wanted* (ci indexes) or within ``amplify`` bytes of *first*."""
        refs = [first]
        pos = state.position.get(first.index)
        if pos is None or state.order[pos] != first:
            return refs
        start, end = first.compressed_offset, first.compressed_offset + first.compressed_size
        opts = self.options
        max_gap = opts.merge_window >> 7
        for i in range(pos + 1, len(state.order)):
            nxt = state.order[i]
            nxt_end = nxt.compressed_offset + nxt.compressed_size
            fits = nxt_end - start <= opts.merge_window and end <= nxt.compressed_offset <= end + max_gap
            asked = nxt.index in wanted or nxt_end - start <= opts.amplify
            if not (fits and asked and self._needs_fetch(state, nxt)):
                break
            refs.append(nxt)
            end = nxt_end
        return refs

    def _launch(self, state: _BlobState, ref: ChunkRef, nursery: trio.Nursery, wanted: Set[int],
                prefetch_slot: trio.Semaphore | None = None) -> _Flight:
        """Start fetching *ref* and its mergeable neighbours (see :meth:`_plan`) in *nursery*; return
        *ref*'s flight. A prefetch batch releases *prefetch_slot* when it ends.
        """
        batch = _Batch(state, self._plan(state, ref, wanted), prefetch_slot is not None)
        for member in batch.refs:
            flight = batch.flights[member.index] = _Flight(batch)
            self._flights[(state.blob.blob_id, member.index)] = flight
        self.metrics.in_flight += len(batch.refs)
        nursery.start_soon(self._run_batch, batch, prefetch_slot)
        return batch.flights[ref.index]

    async def _run_batch(self, batch: _Batch, prefetch_slot: trio.Semaphore | None) -> None:
        began = trio.current_time()
        blob = batch.state.blob
        try:
            with trio.move_on_after(self.options.read_timeout) as scope:
                raw = await self._read_range(batch)
                decoded = await trio.to_thread.run_sync(_decode, blob, batch.refs, batch.start, raw)
            if scope.cancelled_caught:
                self._fail(batch, FetchError(f"gave up after {self.options.read_timeout:g} s: {batch.last_error}"))
                return
            self.metrics.observe_latency(trio.current_time() - began)
            good = self._publish(batch, decoded)
            if good:
                await self._store(batch.state, good)
        except Exception as exc:  # a bug must cost one read (EIO, logged), not the whole mount
            log.exception("fetch crashed blob=%s offset=%d", blob.blob_id, batch.start)
            self._fail(batch, FetchError(f"blob {blob.blob_id}: internal error {exc!r}"))
        finally:
            self._finish(batch)
            if prefetch_slot is not None:
                prefetch_slot.release()

    async def _read_range(self, batch: _Batch) -> bytes:
        """The batch's compressed bytes, retrying failures with backoff until cancelled."""
        blob, opts = batch.state.blob, self.options
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._limiter:
                    self.metrics.backend_requests += 1
                    with trio.fail_after(opts.request_timeout):
                        raw = await self.backend.read_range(blob, batch.start, batch.length)
                if len(raw) != batch.length:
                    raise BackendError(f"backend returned {len(raw)} bytes instead of {batch.length}")
            except (BackendError, trio.TooSlowError) as exc:
                self.metrics.backend_errors += 1
                batch.last_error = str(exc) or f"no answer within {opts.request_timeout:g} s"
                delay = min(opts.retry_backoff * 2 ** (attempt - 1), opts.retry_max_delay)
                log.warning(
                    "backend read failed blob=%s offset=%d length=%d attempt=%d retry_in=%.2fs error=%r",
                    blob.blob_id, batch.start, batch.length, attempt, delay, batch.last_error,
                )
                await trio.sleep(delay)
                continue
            self.metrics.backend_bytes += len(raw)
            if batch.prefetch:
                self.metrics.prefetch_bytes += len(raw)
            return raw

    def _publish(self, batch: _Batch, decoded: list[bytes | CorruptChunk]) -> list[tuple[ChunkRef, bytes]]:
        """Hand results to waiting readers; return the good chunks, to be cached."""
        good = []
        for ref, result in zip(batch.refs, decoded, strict=True):
            flight = batch.flights[ref.index]
            if isinstance(result, CorruptChunk):
                self.metrics.corrupt_chunks += 1
                log.error("corrupt chunk blob=%s chunk=%d compressed_offset=%d error=%r",
                          batch.state.blob.blob_id, ref.index, ref.compressed_offset, str(result))
                flight.error = result
            else:
                self.metrics.chunks_fetched += 1
                flight.data = result
                good.append((ref, result))
            flight.done.set()
        return good

    async def _store(self, state: _BlobState, good: list[tuple[ChunkRef, bytes]]) -> None:
        """Cache verified chunks; a failure (disk full...) is logged, the data was served anyway."""
        try:
            await trio.to_thread.run_sync(state.cache.store_many, good)
        except OSError as exc:
            log.warning("cache store failed blob=%s chunks=%d error=%r", state.blob.blob_id, len(good), str(exc))

    def _fail(self, batch: _Batch, error: FetchError) -> None:
        log.warning("fetch failed blob=%s first_chunk=%d chunks=%d error=%r", batch.state.blob.blob_id,
                    batch.refs[0].index, len(batch.refs), str(error))
        for flight in batch.flights.values():
            if not flight.done.is_set():
                flight.error = error
                flight.done.set()

    def _finish(self, batch: _Batch) -> None:
        """Forget the batch's flights (its chunks are cached by now, or will be fetched afresh)."""
        self.metrics.in_flight -= len(batch.refs)
        for index, flight in batch.flights.items():
            key = (batch.state.blob.blob_id, index)
            if self._flights.get(key) is flight:
                del self._flights[key]
            flight.done.set()

    # -- prefetch -------------------------------------------------------------------------------

    async def prefetch(self, blob: BlobInfo, refs: Iterable[ChunkRef], bandwidth_limit: int | None = None) -> None:
        """Fetch *refs* into the cache behind on-demand reads; returns when done (cancel it to stop).

        Prefetch uses at most ``prefetch_concurrency`` request slots and, with *bandwidth_limit*, at
        most that many backend bytes per second on average. A batch waits for its bandwidth share
        before its chunks count as in flight, so on-demand reads never queue behind the limit.
        Failures are only logged: on-demand reads retry them.
        """
        todo = sorted({ref.index: ref for ref in refs}.values(), key=lambda r: r.compressed_offset)
        state = self._state(blob, todo)
        wanted = {ref.index for ref in todo}
        pacer = _Pacer(bandwidth_limit) if bandwidth_limit is not None else None
        slots = self._prefetch_slots
        async with trio.open_nursery() as nursery:
            for ref in todo:
                if not self._needs_fetch(state, ref):
                    continue
                await slots.acquire()
                launched = False
                try:
                    if pacer is not None:
                        planned = self._plan(state, ref, wanted)
                        last = planned[-1]
                        await pacer.take(last.compressed_offset + last.compressed_size - ref.compressed_offset)
                    if self._needs_fetch(state, ref):  # it may have been fetched meanwhile
                        self._launch(state, ref, nursery, wanted, slots)
                        launched = True
                finally:
                    if not launched:
                        slots.release()


def _decode(blob: BlobInfo, refs: list[ChunkRef], start: int, raw: bytes) -> list[bytes | CorruptChunk]:
    """Decompress and verify each chunk of a fetched range (runs in a worker thread)."""
    out: list[bytes | CorruptChunk] = []
    for ref in refs:
        what = f"blob {blob.blob_id} chunk {ref.index}"
        piece = raw[ref.compressed_offset - start : ref.compressed_offset - start + ref.compressed_size]
        try:
            data = decompress(blob.compressor, piece, ref.uncompressed_size) if ref.compressed else piece
            verify(blob.digester, data, ref.digest, what)
        except DigestMismatch as exc:
            out.append(CorruptChunk(str(exc)))
        except FormatError as exc:
            out.append(CorruptChunk(f"{what}: {exc}"))
        else:
            out.append(data)
    return out
