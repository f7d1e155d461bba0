"""A synchronous client for the containerd services an image pull drives: content, images, leases, snapshots
and diff, over containerd's gRPC socket.

Every call carries the namespace (gRPC metadata ``containerd-namespace``) and, while a lease is held, the
lease (``containerd-lease``), so what the pull creates is safe from garbage collection until the image
references it. grpcio has no trio support: trio code runs these calls in worker threads.
"""

from __future__ import annotations

import datetime
import queue
import secrets
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.field_mask_pb2 import FieldMask

from lazyfs.errors import LazyfsError
from lazyfs.registry.manifest import Descriptor
from snapshotter.api.containerd.services.content.v1 import content_pb2, content_pb2_grpc
from snapshotter.api.containerd.services.diff.v1 import diff_pb2, diff_pb2_grpc
from snapshotter.api.containerd.services.images.v1 import images_pb2, images_pb2_grpc
from snapshotter.api.containerd.services.leases.v1 import leases_pb2, leases_pb2_grpc
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from snapshotter.api.containerd.types import descriptor_pb2, mount_pb2

LEASE_EXPIRY = datetime.timedelta(hours=24)  # a lease left behind by a crashed pull expires after this
_MAX_MESSAGE = 16 << 20  # containerd's own client limit

Mounts = Sequence[mount_pb2.Mount]


class ContainerdError(LazyfsError):
    """A containerd call failed; :attr:`code` is its gRPC status."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class ContentWriter:
    """One ``Content.Write`` ingest, one request at a time: containerd answers each request, and the ingest
    ends with the commit. :attr:`offset` counts the bytes containerd holds."""

    def __init__(self, client: Containerd, ref: str, desc: Descriptor) -> None:
        self._client = client
        self._ref = ref
        self._desc = desc
        self._requests: queue.Queue[content_pb2.WriteContentRequest | None] = queue.Queue()
        self._responses = client.content.Write(iter(self._requests.get, None), metadata=client.metadata())
        self.offset = 0

    def stat(self) -> None:
        """Open the ingest; raises ContainerdError ALREADY_EXISTS if the store has the blob."""
        self._send(content_pb2.WriteContentRequest(
            action=content_pb2.STAT, ref=self._ref, total=self._desc.size, expected=self._desc.digest))

    def write(self, data: bytes) -> None:
        """Append *data* (the first write starts over, dropping what an earlier attempt left)."""
        self.offset = self._send(content_pb2.WriteContentRequest(
            action=content_pb2.WRITE, offset=self.offset, data=data)).offset

    def commit(self, labels: Mapping[str, str]) -> None:
        """Check size and digest and store the blob with *labels*."""
        self._send(content_pb2.WriteContentRequest(
            action=content_pb2.COMMIT, offset=self.offset, total=self._desc.size, expected=self._desc.digest,
            labels=labels))
        self._requests.put(None)

    def abort(self) -> None:
        """End the stream and discard the ingest."""
        self._requests.put(None)
        self._responses.cancel()
        self._client.call(self._client.content.Abort, content_pb2.AbortRequest(ref=self._ref),
                          f"abort write {self._ref}", ok=(grpc.StatusCode.NOT_FOUND,))

    def _send(self, request: content_pb2.WriteContentRequest) -> content_pb2.WriteContentResponse:
        self._requests.put(request)
        try:
            response: content_pb2.WriteContentResponse = next(self._responses)
        except grpc.RpcError as exc:
            self._requests.put(None)
            raise _error(exc, f"write {self._desc.digest} to the content store") from None
        return response


class Containerd:
    """containerd's services on *address*, in *namespace*; use as a context manager."""

    def __init__(self, address: Path, namespace: str) -> None:
        self.address = address
        self.namespace = namespace
        self.lease: str | None = None
        options = [("grpc.max_receive_message_length", _MAX_MESSAGE), ("grpc.max_send_message_length", _MAX_MESSAGE)]
        self._channel = grpc.insecure_channel(f"unix:{address}", options=options)
        self.content = content_pb2_grpc.ContentStub(self._channel)  # type: ignore[no-untyped-call]
        self._images = images_pb2_grpc.ImagesStub(self._channel)  # type: ignore[no-untyped-call]
        self._leases = leases_pb2_grpc.LeasesStub(self._channel)  # type: ignore[no-untyped-call]
        self._snapshots = snapshots_pb2_grpc.SnapshotsStub(self._channel)  # type: ignore[no-untyped-call]
        self._diff = diff_pb2_grpc.DiffStub(self._channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._channel.close()

    def connect(self) -> None:
        """Fail clearly unless containerd accepts connections on its socket."""
        with socket.socket(socket.AF_UNIX) as probe:
            try:
                probe.connect(str(self.address))
            except OSError as exc:
                raise ContainerdError(f"cannot reach containerd at {self.address}: {exc.strerror}",
                                      grpc.StatusCode.UNAVAILABLE) from None

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC metadata of every call: namespace, and lease while one is held."""
        lease = (("containerd-lease", self.lease),) if self.lease else ()
        return (("containerd-namespace", self.namespace), *lease)

    def call(self, method: Any, request: Any, what: str, ok: Sequence[grpc.StatusCode] = ()) -> Any:
        """``method(request)``; None if it fails with a status in *ok*, ContainerdError for other failures."""
        try:
            return method(request, metadata=self.metadata())
        except grpc.RpcError as exc:
            if exc.code() in ok:
                return None
            raise _error(exc, what) from None

    # --- leases ---------------------------------------------------------------------------------------------

    def create_lease(self) -> None:
        """Take a lease (expiring after LEASE_EXPIRY) that later calls carry."""
        expire = datetime.datetime.now(datetime.UTC) + LEASE_EXPIRY
        request = leases_pb2.CreateRequest(id=f"lazyfs-pull-{secrets.token_hex(8)}",
                                           labels={"containerd.io/gc.expire": expire.strftime("%Y-%m-%dT%H:%M:%SZ")})
        self.lease = self.call(self._leases.Create, request, "create lease").lease.id

    def delete_lease(self) -> None:
        """Drop the lease: what nothing else references becomes garbage."""
        lease, self.lease = self.lease, None
        if lease:
            self.call(self._leases.Delete, leases_pb2.DeleteRequest(id=lease), f"delete lease {lease}",
                      ok=(grpc.StatusCode.NOT_FOUND,))

    # --- content --------------------------------------------------------------------------------------------

    def open_writer(self, ref: str, desc: Descriptor) -> ContentWriter | None:
        """A writer for blob *desc* under ingest *ref*, or None if the content store has the blob."""
        writer = ContentWriter(self, ref, desc)
        try:
            writer.stat()
        except ContainerdError as exc:
            if exc.code == grpc.StatusCode.ALREADY_EXISTS:
                return None
            raise
        return writer

    def write_blob(self, ref: str, desc: Descriptor, data: bytes, labels: Mapping[str, str]) -> None:
        """Store small blob *data* with *labels* (added to the labels it has if it is there already)."""
        writer = self.open_writer(ref, desc)
        if writer is None:
            self.update_content_labels(desc.digest, labels)
            return
        writer.write(data)
        writer.commit(labels)

    def update_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        """Set *labels* on blob *digest*, leaving its other labels alone."""
        if labels:
            request = content_pb2.UpdateRequest(info=content_pb2.Info(digest=digest, labels=labels),
                                                update_mask=FieldMask(paths=[f"labels.{key}" for key in labels]))
            self.call(self.content.Update, request, f"label content {digest}")

    # --- images ---------------------------------------------------------------------------------------------

    def put_image(self, name: str, target: Descriptor) -> None:
        """Create image *name* pointing at *target*, or repoint the existing one (keeping its labels)."""
        image = images_pb2.Image(name=name, target=_descriptor(target))
        created = self.call(self._images.Create, images_pb2.CreateImageRequest(image=image), f"create image {name}",
                            ok=(grpc.StatusCode.ALREADY_EXISTS,))
        if created is None:
            request = images_pb2.UpdateImageRequest(image=image, update_mask=FieldMask(paths=["target"]))
            self.call(self._images.Update, request, f"update image {name}")

    # --- snapshots and diff -------------------------------------------------------------------------------

    def snapshot_exists(self, snapshotter: str, key: str) -> bool:
        """Whether *snapshotter* has snapshot *key* (in this namespace)."""
        request = snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key)
        return self.call(self._snapshots.Stat, request, f"stat snapshot {key}", ok=(grpc.StatusCode.NOT_FOUND,)) \
            is not None

    def prepare_snapshot(self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]) -> Mounts | None:
        """Mounts of new active snapshot *key*, or None if the snapshotter answered ALREADY_EXISTS."""
        request = snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent, labels=labels)
        response = self.call(self._snapshots.Prepare, request, f"prepare snapshot {key!r}",
                             ok=(grpc.StatusCode.ALREADY_EXISTS,))
        return None if response is None else list(response.mounts)

    def commit_snapshot(self, snapshotter: str, name: str, key: str, labels: Mapping[str, str]) -> bool:
        """Commit *key* as *name*; False if *name* exists already."""
        request = snapshots_pb2.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key, labels=labels)
        return self.call(self._snapshots.Commit, request, f"commit snapshot {name}",
                         ok=(grpc.StatusCode.ALREADY_EXISTS,)) is not None

    def remove_snapshot(self, snapshotter: str, key: str) -> None:
        """Remove snapshot *key* (gone already is fine)."""
        request = snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key)
        self.call(self._snapshots.Remove, request, f"remove snapshot {key!r}", ok=(grpc.StatusCode.NOT_FOUND,))

    def apply_layer(self, layer: Descriptor, mounts: Mounts) -> str:
        """Extract layer blob *layer* (from the content store) into *mounts*; its diff ID (uncompressed digest)."""
        request = diff_pb2.ApplyRequest(diff=_descriptor(layer), mounts=mounts)
        applied: str = self.call(self._diff.Apply, request, f"apply layer {layer.digest}").applied.digest
        return applied


def _descriptor(desc: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(media_type=desc.media_type, digest=desc.digest, size=desc.size,
                                     annotations=desc.annotations)


def _error(exc: grpc.RpcError, what: str) -> ContainerdError:
    """A ContainerdError saying what failed, why, and with which status."""
    return ContainerdError(f"{what}: {exc.details()} ({exc.code().name})", exc.code())
