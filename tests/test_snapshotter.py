"""The snapshotter: gRPC conformance over its unix socket, restart, config setup, and real containerd."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1.snapshots_pb2_grpc import SnapshotsStub
from snapshotter.errors import InvalidArgument
from snapshotter.filters import Selector, parse
from snapshotter.overlay import mountpoints_under
from snapshotter.setup import configure_containerd
from tests.containerd_fixtures import Containerd, SnapshotterProcess
from tests.registry_fixtures import RegistryServer, push_test_image

LAYER1 = "default/1/extract-1 sha256:1111"  # containerd-style keys, spaces included
LAYER1_NAME = "default/2/sha256:1111"
LAYER2 = "default/3/extract-2 sha256:2222"
LAYER2_NAME = "default/4/sha256:2222"
Code = grpc.StatusCode


def error_code(call: Callable[..., Any], *args: object) -> Code:
    """The status code a stub call fails with (the test fails if it succeeds); streams are drained."""
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args)
        if isinstance(result, Iterator):
            list(result)
    code: Code = info.value.code()
    return code


def prepare(stub: SnapshotsStub, key: str, parent: str = "", **labels: str) -> list[tuple[str, str, list[str]]]:
    response = stub.Prepare(pb.PrepareSnapshotRequest(key=key, parent=parent, labels=labels))
    return [(m.type, m.source, list(m.options)) for m in response.mounts]


def view(stub: SnapshotsStub, key: str, parent: str = "") -> list[tuple[str, str, list[str]]]:
    response = stub.View(pb.ViewSnapshotRequest(key=key, parent=parent))
    return [(m.type, m.source, list(m.options)) for m in response.mounts]


def commit(stub: SnapshotsStub, key: str, name: str, **labels: str) -> None:
    stub.Commit(pb.CommitSnapshotRequest(key=key, name=name, labels=labels))


def stat(stub: SnapshotsStub, key: str) -> pb.Info:
    info: pb.Info = stub.Stat(pb.StatSnapshotRequest(key=key)).info
    return info


def names(stub: SnapshotsStub, *filters: str) -> set[str]:
    return {info.name for response in stub.List(pb.ListSnapshotsRequest(filters=filters)) for info in response.info}


def two_layers(stub: SnapshotsStub) -> None:
    """LAYER1_NAME (labelled ref=one) and its child LAYER2_NAME (ref=two), both committed."""
    prepare(stub, LAYER1, **{"containerd.io/snapshot/origin": "pull"})
    commit(stub, LAYER1, LAYER1_NAME, **{"containerd.io/snapshot.ref": "one"})
    prepare(stub, LAYER2, LAYER1_NAME)
    commit(stub, LAYER2, LAYER2_NAME, **{"containerd.io/snapshot.ref": "two"})


def fs_dir(server: SnapshotterProcess, name: str) -> Path:
    """The fs directory of an active snapshot (from its bind mount or upperdir)."""
    with server.client() as stub:
        mount = stub.Mounts(pb.MountsRequest(key=name)).mounts[0]
    if mount.type == "bind":
        return Path(mount.source)
    return Path(next(o for o in mount.options if o.startswith("upperdir=")).removeprefix("upperdir="))


# --- gRPC conformance -------------------------------------------------------------------------------------


def test_prepare_commit_view_and_mount_shapes(snapshotter: SnapshotterProcess) -> None:
    snaps = snapshotter.root / "snapshots"
    with snapshotter.client() as stub:
        first = prepare(stub, LAYER1, **{"containerd.io/snapshot/origin": "pull"})
        assert first == [("bind", f"{snaps}/1/fs", ["rw", "rbind"])]
        assert stub.Mounts(pb.MountsRequest(key=LAYER1)).mounts[0].source == f"{snaps}/1/fs"
        active = stat(stub, LAYER1)
        assert (active.kind, active.parent) == (pb.ACTIVE, "")
        assert dict(active.labels) == {"containerd.io/snapshot/origin": "pull"}
        commit(stub, LAYER1, LAYER1_NAME, **{"containerd.io/snapshot.ref": "one"})
        committed = stat(stub, LAYER1_NAME)
        assert committed.kind == pb.COMMITTED
        assert dict(committed.labels) == {"containerd.io/snapshot.ref": "one"}  # replaced, not inherited
        assert error_code(stub.Stat, pb.StatSnapshotRequest(key=LAYER1)) == Code.NOT_FOUND

        second = prepare(stub, LAYER2, LAYER1_NAME)
        assert second[0][:2] == ("overlay", "overlay")
        assert second[0][2][-3:] == [f"workdir={snaps}/2/work", f"upperdir={snaps}/2/fs", f"lowerdir={snaps}/1/fs"]
        commit(stub, LAYER2, LAYER2_NAME)
        assert stat(stub, LAYER2_NAME).parent == LAYER1_NAME

        container = prepare(stub, "default/5/my container", LAYER2_NAME)
        assert container[0][2][-1] == f"lowerdir={snaps}/2/fs:{snaps}/1/fs"  # nearest parent first
        assert [(m.type, m.source, list(m.options)) for m in
                stub.Mounts(pb.MountsRequest(key="default/5/my container")).mounts] == container

        assert view(stub, "view of one", LAYER1_NAME) == [("bind", f"{snaps}/1/fs", ["ro", "rbind"])]
        two = view(stub, "view of two", LAYER2_NAME)
        assert two[0][0] == "overlay" and two[0][2][-1] == f"lowerdir={snaps}/2/fs:{snaps}/1/fs"
        assert not any(o.startswith(("upperdir=", "workdir=")) for o in two[0][2])
        assert view(stub, "empty view") == [("bind", f"{snaps}/6/fs", ["ro", "rbind"])]
        assert stat(stub, "empty view").kind == pb.VIEW
        assert not (snaps / "6" / "work").exists() and (snaps / "3" / "work").is_dir()


def test_error_codes(snapshotter: SnapshotterProcess) -> None:
    with snapshotter.client() as stub:
        two_layers(stub)
        prepare(stub, "active")
        view(stub, "a view", LAYER1_NAME)
        assert error_code(stub.Prepare, pb.PrepareSnapshotRequest(key="active")) == Code.ALREADY_EXISTS
        assert error_code(stub.View, pb.ViewSnapshotRequest(key=LAYER1_NAME)) == Code.ALREADY_EXISTS
        assert error_code(stub.Prepare, pb.PrepareSnapshotRequest(key="orphan", parent="nope")) == Code.NOT_FOUND
        assert error_code(stub.Prepare, pb.PrepareSnapshotRequest(key="k", parent="active")) == Code.INVALID_ARGUMENT
        assert error_code(stub.Prepare, pb.PrepareSnapshotRequest(key="")) == Code.INVALID_ARGUMENT
        assert "orphan" not in names(stub) and "k" not in names(stub)

        assert error_code(stub.Commit, pb.CommitSnapshotRequest(key="a view", name="x")) == Code.FAILED_PRECONDITION
        assert error_code(stub.Commit, pb.CommitSnapshotRequest(key=LAYER1_NAME, name="x")) == Code.FAILED_PRECONDITION
        assert error_code(stub.Commit, pb.CommitSnapshotRequest(key="active", name=LAYER2_NAME)) == Code.ALREADY_EXISTS
        assert error_code(stub.Commit, pb.CommitSnapshotRequest(key="missing", name="x")) == Code.NOT_FOUND
        assert stat(stub, "active").kind == pb.ACTIVE  # failed commits change nothing

        assert error_code(stub.Remove, pb.RemoveSnapshotRequest(key=LAYER1_NAME)) == Code.FAILED_PRECONDITION
        assert error_code(stub.Remove, pb.RemoveSnapshotRequest(key="missing")) == Code.NOT_FOUND
        assert error_code(stub.Mounts, pb.MountsRequest(key=LAYER1_NAME)) == Code.FAILED_PRECONDITION
        for rpc, request in [(stub.Stat, pb.StatSnapshotRequest), (stub.Mounts, pb.MountsRequest),
                             (stub.Usage, pb.UsageRequest)]:
            assert error_code(rpc, request(key="missing")) == Code.NOT_FOUND
        assert error_code(stub.List, pb.ListSnapshotsRequest(filters=["kind=="])) == Code.INVALID_ARGUMENT


def test_label_size_limit(snapshotter: SnapshotterProcess) -> None:
    at_limit = {"k": "v" * 4095}
    over = {"k": "v" * 4096}
    with snapshotter.client() as stub:
        prepare(stub, "fits", **at_limit)
        assert error_code(stub.Prepare, pb.PrepareSnapshotRequest(key="big", labels=over)) == Code.INVALID_ARGUMENT
        assert error_code(stub.View, pb.ViewSnapshotRequest(key="big", labels=over)) == Code.INVALID_ARGUMENT
        request = pb.CommitSnapshotRequest(key="fits", name="done", labels=over)
        assert error_code(stub.Commit, request) == Code.INVALID_ARGUMENT
        update = pb.UpdateSnapshotRequest(info=pb.Info(name="fits", labels=over))
        assert error_code(stub.Update, update) == Code.INVALID_ARGUMENT
        assert names(stub) == {"fits"}


def test_list_filters(snapshotter: SnapshotterProcess) -> None:
    with snapshotter.client() as stub:
        two_layers(stub)
        prepare(stub, "default/9/container one", LAYER2_NAME, app="web")
        view(stub, "default/10/view", LAYER1_NAME)
        everything = {LAYER1_NAME, LAYER2_NAME, "default/9/container one", "default/10/view"}
        assert names(stub) == names(stub, "") == everything
        assert names(stub, f'parent=="{LAYER1_NAME}"') == {LAYER2_NAME, "default/10/view"}
        assert names(stub, f"parent=={LAYER2_NAME}") == {"default/9/container one"}
        assert names(stub, "kind==committed") == {LAYER1_NAME, LAYER2_NAME}
        assert names(stub, "kind==view", "kind==active") == {"default/10/view", "default/9/container one"}
        assert names(stub, 'labels."containerd.io/snapshot.ref"==two') == {LAYER2_NAME}
        assert names(stub, f'labels."containerd.io/snapshot.ref"==one,parent=="{LAYER1_NAME}"') == set()
        assert names(stub, f'labels."containerd.io/snapshot.ref"==two,parent=="{LAYER1_NAME}"') == {LAYER2_NAME}
        assert names(stub, 'name=="default/9/container one"') == {"default/9/container one"}
        assert names(stub, "labels.app") == {"default/9/container one"}
        assert names(stub, "kind!=committed, labels.app!=web") == {"default/10/view"}
        assert names(stub, r"name~=/^default\/[24]\//") == {LAYER1_NAME, LAYER2_NAME}
        assert names(stub, "name~=|view$|") == {"default/10/view"}
        for bad in ("kind=view", "kind==view,", "=x", 'labels."open==x', "name~=(", "kind==a b"):
            assert error_code(stub.List, pb.ListSnapshotsRequest(filters=[bad])) == Code.INVALID_ARGUMENT, bad


def test_list_streams_in_batches(snapshotter: SnapshotterProcess) -> None:
    with snapshotter.client() as stub:
        for i in range(230):
            prepare(stub, f"key {i}")
        batches = [len(r.info) for r in stub.List(pb.ListSnapshotsRequest())]
    assert batches == [100, 100, 30]


def test_filter_syntax() -> None:
    assert parse('labels."a.b"==x,kind!=view') == [Selector(("labels", "a.b"), "==", "x"),
                                                  Selector(("kind",), "!=", "view")]
    assert parse(r'name=="tab\there \"q\" \x41\u00e9\101"') == [Selector(("name",), "==", 'tab\there "q" Aé' + "A")]
    assert parse("  parent == sha256:abc , labels.x ") == [Selector(("parent",), "==", "sha256:abc"),
                                                            Selector(("labels", "x"), "", "")]
    assert parse(r"name~=/a\/b/") == [Selector(("name",), "~=", "a/b")]
    for bad in (r'name=="\q"', r'name=="\x4"', '"unterminated', "a==b c", "a.", ".a"):
        with pytest.raises(InvalidArgument):
            parse(bad)


def test_update_labels_with_field_mask(snapshotter: SnapshotterProcess) -> None:
    def update(labels: dict[str, str], *paths: str) -> dict[str, str]:
        request = pb.UpdateSnapshotRequest(info=pb.Info(name="s p", labels=labels))
        request.update_mask.paths.extend(paths)
        info = stub.Update(request).info
        assert dict(stat(stub, "s p").labels) == dict(info.labels)
        return dict(info.labels)

    with snapshotter.client() as stub:
        prepare(stub, "s p", a="1", b="2")
        before = stat(stub, "s p")
        time.sleep(0.01)
        assert update({"c": "3"}) == {"c": "3"}  # no mask: replace every label
        assert update({"a": "9", "ignored": "x"}, "labels.a") == {"a": "9", "c": "3"}
        assert update({}, "labels.c") == {"a": "9"}  # a masked label missing from info is deleted
        assert update({"d": "4"}, "labels") == {"d": "4"}
        after = stat(stub, "s p")
        assert after.updated_at.ToNanoseconds() > before.updated_at.ToNanoseconds()
        assert after.created_at == before.created_at and after.kind == pb.ACTIVE
        bad = pb.UpdateSnapshotRequest(info=pb.Info(name="s p", parent="x"))
        bad.update_mask.paths.append("parent")
        assert error_code(stub.Update, bad) == Code.INVALID_ARGUMENT
        assert error_code(stub.Update, pb.UpdateSnapshotRequest(info=pb.Info(name="nope"))) == Code.NOT_FOUND


def test_usage(snapshotter: SnapshotterProcess) -> None:
    with snapshotter.client() as stub:
        prepare(stub, "layer")
        fs = fs_dir(snapshotter, "layer")
        (fs / "dir").mkdir()
        (fs / "dir" / "data").write_bytes(os.urandom(1 << 20))
        os.link(fs / "dir" / "data", fs / "hardlink")  # counted once
        (fs / "link").symlink_to("dir/data")
        usage = stub.Usage(pb.UsageRequest(key="layer"))
        assert usage.inodes == 4  # fs, dir, data, link
        assert 1 << 20 <= usage.size < (1 << 20) + 64 * 1024
        commit(stub, "layer", "committed")
        stored = stub.Usage(pb.UsageRequest(key="committed"))
        assert (stored.size, stored.inodes) == (usage.size, usage.inodes)
        (fs / "later").write_bytes(b"x" * 8192)  # committed usage is recorded, not recomputed
        assert stub.Usage(pb.UsageRequest(key="committed")).size == usage.size
        view(stub, "v", "committed")
        assert (stub.Usage(pb.UsageRequest(key="v")).size, stub.Usage(pb.UsageRequest(key="v")).inodes) == (0, 0)


def test_remove_and_cleanup(snapshotter: SnapshotterProcess) -> None:
    snaps = snapshotter.root / "snapshots"
    with snapshotter.client() as stub:
        two_layers(stub)
        prepare(stub, "c", LAYER2_NAME)
        (snaps / "3" / "fs" / "file").write_text("x")
        stub.Remove(pb.RemoveSnapshotRequest(key="c"))
        stub.Remove(pb.RemoveSnapshotRequest(key=LAYER2_NAME))
        assert sorted(p.name for p in snaps.iterdir()) == ["1"]
        assert names(stub) == {LAYER1_NAME}
        (snaps / "77" / "fs").mkdir(parents=True)  # a directory without metadata
        (snaps / "77" / "fs" / "f").write_text("orphan")
        (snapshotter.root / "trash" / "5-leftover").mkdir()
        stub.Cleanup(pb.CleanupRequest())
        assert sorted(p.name for p in snaps.iterdir()) == ["1"]
        assert list((snapshotter.root / "trash").iterdir()) == []
        stub.Remove(pb.RemoveSnapshotRequest(key=LAYER1_NAME))
        assert list(snaps.iterdir()) == [] and names(stub) == set()


def test_metadata_survives_restart(snapshotter: SnapshotterProcess) -> None:
    with snapshotter.client() as stub:
        two_layers(stub)
        prepare(stub, "default/5/container", LAYER2_NAME, app="x")
        stub.Remove(pb.RemoveSnapshotRequest(key="default/5/container"))
        before = list(stub.List(pb.ListSnapshotsRequest()))
        mounts = prepare(stub, "default/6/container", LAYER2_NAME)
    assert snapshotter.stop() == 0  # SIGTERM: a graceful exit that keeps everything
    assert not snapshotter.address.exists() and "event=stopped" in snapshotter.log_path.read_text()
    snapshotter.start()
    with snapshotter.client() as stub:
        after = list(stub.List(pb.ListSnapshotsRequest()))
        assert [i for r in before for i in r.info] == [i for r in after for i in r.info][:2]
        assert stat(stub, "default/6/container").parent == LAYER2_NAME
        assert prepare(stub, "default/7/new", LAYER2_NAME)[0][2][-2].endswith("/snapshots/5/fs")  # ids never reused
        assert [(m.type, m.source, list(m.options)) for m in
                stub.Mounts(pb.MountsRequest(key="default/6/container")).mounts] == mounts


def test_one_server_per_root(snapshotter: SnapshotterProcess, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "lazyfs.cli", "snapshotter", "--root", str(snapshotter.root),
               "--address", str(tmp_path / "other.sock")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "another snapshotter is using" in proc.stderr
    config = tmp_path / "snapshotter.toml"
    config.write_text(f'root = "{tmp_path / "root"}"\naddress = "{snapshotter.address}"\n')
    proc = subprocess.run([*command[:4], "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "in use by a running server" in proc.stderr
    config.write_text('root = "/x"\ncolour = "blue"\n')
    proc = subprocess.run([*command[:4], "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "unknown setting(s): colour" in proc.stderr


# --- lazyfs setup containerd ------------------------------------------------------------------------------

DEBIAN_CONFIG = """version = 2

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
"""


def test_setup_merges_into_existing_configs() -> None:
    import tomllib

    merged = configure_containerd(DEBIAN_CONFIG, "lazyfs", "/run/lazyfs/snapshotter.sock")
    assert merged.startswith(DEBIAN_CONFIG)  # only additions
    doc = tomllib.loads(merged)
    assert doc["proxy_plugins"]["lazyfs"] == {"type": "snapshot", "address": "/run/lazyfs/snapshotter.sock"}
    cri = doc["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["containerd"] == {"snapshotter": "lazyfs", "disable_snapshot_annotations": False}
    assert cri["cni"]["bin_dir"] == "/usr/lib/cni"
    assert configure_containerd(merged, "lazyfs", "/run/lazyfs/snapshotter.sock") == merged  # idempotent

    existing = ('version = 2  # keep me\n[proxy_plugins]\n  [proxy_plugins.lazyfs]\n    type = "snapshot"\n'
                '    address = "/old.sock"\n\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
                '  snapshotter = "overlayfs"  # old\n  default_runtime_name = "runc"\n'
                '  disable_snapshot_annotations = true\n'
                '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
                '  runtime_type = "io.containerd.runc.v2"\n')
    updated = configure_containerd(existing, "lazyfs", "/new.sock")
    assert '    address = "/new.sock"\n' in updated and "# keep me" in updated
    assert '  snapshotter = "lazyfs"\n' in updated and "disable_snapshot_annotations = false" in updated
    doc = tomllib.loads(updated)["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert doc["default_runtime_name"] == "runc" and doc["runtimes"]["runc"]["runtime_type"] == "io.containerd.runc.v2"

    fresh = tomllib.loads(configure_containerd("", "nydus", "/s.sock"))
    assert fresh["version"] == 2 and fresh["proxy_plugins"]["nydus"]["address"] == "/s.sock"


def test_setup_refuses_what_it_cannot_merge() -> None:
    from lazyfs.errors import LazyfsError

    for text, message in [
        ('[plugins.cri]\nsandbox_image = "x"\n', "version 2"),
        ('version = 2\nproxy_plugins = { lazyfs = { type = "snapshot", address = "/a" } }\n', "by hand"),
        ("version = 2\n[broken\n", "not valid TOML"),
    ]:
        with pytest.raises(LazyfsError, match=message):
            configure_containerd(text, "lazyfs", "/s.sock")


def test_setup_containerd_cli(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "config.toml"

    def lazyfs(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "lazyfs.cli", "setup", "containerd", "--config", str(config),
                               *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "[proxy_plugins.lazyfs]" in lazyfs("--print") and not config.exists()
    assert lazyfs("--address", "/s.sock").startswith("updated")
    assert 'address = "/s.sock"' in config.read_text()
    assert lazyfs("--address", "/s.sock").startswith("unchanged")
    if (default := subprocess.run(["containerd", "config", "default"], capture_output=True, text=True)).returncode == 0:
        config.write_text(default.stdout)
        lazyfs("--address", "/s.sock")
        text = config.read_text()
        assert 'snapshotter = "lazyfs"' in text and 'snapshotter = "overlayfs"' not in text
        assert text.count("disable_snapshot_annotations") == 1


# --- real containerd --------------------------------------------------------------------------------------


def busybox_layers() -> list[bytes]:
    """Two layer tars: busybox (sh, echo, cat) with /etc/msg "lower", then /etc/msg "upper"."""
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("busybox-static is not installed")
    return [
        layer_tar([("bin/busybox", busybox.read_bytes(), 0o755), ("etc/msg", b"lower\n", 0o644)],
                  [("bin/sh", "busybox"), ("bin/echo", "busybox"), ("bin/cat", "busybox")]),
        layer_tar([("etc/msg", b"upper\n", 0o644)], []),
    ]


def layer_tar(files: Iterable[tuple[str, bytes, int]], symlinks: Iterable[tuple[str, str]]) -> bytes:
    """An uncompressed layer tar with directories, regular *files* (path, data, mode) and *symlinks*."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        entries, links = list(files), list(symlinks)
        for directory in sorted({str(Path(entry[0]).parent) for entry in [*entries, *links]}):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for path, data, mode in entries:
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        for path, target in links:
            info = tarfile.TarInfo(path)
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, 1_700_000_000
            tar.addfile(info)
    return buffer.getvalue()


async def test_ctr_pull_run_and_gc_through_lazyfs(registry: RegistryServer, containerd: Containerd) -> None:
    async with registry.client() as client:
        image = await push_test_image(client, "lazyfs/busybox", "1", busybox_layers())
    ref = image.reference
    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "lazyfs", ref)
    listing = containerd.ctr("snapshots", "--snapshotter", "lazyfs", "ls").stdout.splitlines()
    assert len(listing) == 3 and all("Committed" in line for line in listing[1:]), listing

    run = containerd.ctr("run", "--rm", "--snapshotter", "lazyfs", ref, "hello-test",
                         "/bin/sh", "-c", "echo hello; /bin/cat /etc/msg")
    assert run.stdout == "hello\nupper\n"
    log = containerd.snapshotter.log_path.read_text()
    ns = re.escape(containerd.namespace)
    assert re.search(rf"rpc=Prepare key={ns}/\d+/hello-test parent={ns}/\d+/sha256:\w+ id=\d+ mount=overlay", log), log

    rows = [line.split() for line in listing[1:]]
    top = next(row[0] for row in rows if all(row[0] not in other[1:] for other in rows))
    containerd.ctr("snapshots", "--snapshotter", "lazyfs", "prepare", "scratch", top)  # labelled gc.root
    with containerd.snapshotter.client() as stub:
        assert any(name.endswith("/scratch") for name in names(stub))
    containerd.ctr("snapshots", "--snapshotter", "lazyfs", "rm", "scratch")
    containerd.ctr("image", "rm", "--sync", ref)  # synchronous GC removes the snapshots through Remove

    assert containerd.ctr("snapshots", "--snapshotter", "lazyfs", "ls").stdout.splitlines()[1:] == []
    with containerd.snapshotter.client() as stub:
        assert names(stub) == set()
    root = containerd.snapshotter.root
    assert list((root / "snapshots").iterdir()) == [] and list((root / "trash").iterdir()) == []
    assert mountpoints_under(containerd.workdir) == []
    assert "rpc=Cleanup" in containerd.snapshotter.log_path.read_text()

