"""A minimal CRI client: the kubelet's image calls, over containerd's gRPC socket (CRI ``runtime.v1``).

Stubs come from ``runtime_v1.proto`` in this directory (``scripts/gen-cri-protos.sh``). Calls raise
:class:`grpc.RpcError` as the runtime answers them.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType

import grpc

from lazyfs.registry.auth import Credentials
from tests.cri.api import runtime_v1_pb2 as pb
from tests.cri.api.runtime_v1_pb2_grpc import ImageServiceStub, RuntimeServiceStub

CRI_API_VERSION = "v1"


class CriClient:
    """The CRI runtime and image services on the unix socket *socket_path*; use as a context manager."""

    def __init__(self, socket_path: Path | str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        self._runtime = RuntimeServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._images = ImageServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def version(self) -> pb.VersionResponse:
        """The runtime's name and versions."""
        response: pb.VersionResponse = self._runtime.Version(pb.VersionRequest(version=CRI_API_VERSION),
                                                             timeout=self.timeout)
        return response

    def pull_image(self, ref: str, auth: Credentials | None = None) -> str:
        """Pull *ref* as the kubelet does (no sandbox config); the image id (``sha256:<config digest>``)."""
        request = pb.PullImageRequest(image=pb.ImageSpec(image=ref))
        if auth is not None:
            request.auth.CopyFrom(pb.AuthConfig(username=auth.username, password=auth.password))
        response: pb.PullImageResponse = self._images.PullImage(request, timeout=self.timeout)
        return response.image_ref

    def image_status(self, ref: str) -> pb.Image | None:
        """The image *ref* (a reference, id or digest) names, or None if the runtime does not have it."""
        response: pb.ImageStatusResponse = self._images.ImageStatus(
            pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)), timeout=self.timeout)
        return response.image if response.HasField("image") else None

    def list_images(self) -> list[pb.Image]:
        """Every image the runtime has."""
        response: pb.ListImagesResponse = self._images.ListImages(pb.ListImagesRequest(), timeout=self.timeout)
        return list(response.images)

    def remove_image(self, ref: str) -> None:
        """Remove the image *ref* names, with all its tags (no error if it is absent)."""
        self._images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)), timeout=self.timeout)

    def image_fs_info(self) -> list[pb.FilesystemUsage]:
        """Usage of the filesystem(s) holding images."""
        response: pb.ImageFsInfoResponse = self._images.ImageFsInfo(pb.ImageFsInfoRequest(), timeout=self.timeout)
        return list(response.image_filesystems)
