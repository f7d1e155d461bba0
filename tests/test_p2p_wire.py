"""Dragonfly v2 wire details: task ids (the Rust client's vectors), piece maths, Vortex frames."""

from __future__ import annotations

import contextlib
import hashlib
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2p import vortex
from p2p.pieces import piece_digest, piece_length, pieces, verify_piece
from p2p.taskid import blob_digest_task_id, content_task_id, host_id, normalize_url, peer_id, task_id


def test_task_id_vectors_from_the_rust_client() -> None:
    assert task_id("https://example.com", tag="foo", application="bar", revision="v1.0", piece_length=1024) == (
        "5844f27a257287e9b734256bb25603d8005422ced8c0377f15063ec11963b25f")
    assert task_id("https://example.com", tag="foo", application="bar") == (
        "06408fbf247ddaca478f8cb9565fe5591c28efd0994b8fea80a6a87d3203c5ca")
    assert task_id("https://example.com?foo=foo&bar=bar", filtered_query_params=["foo", "bar"]) == (
        "457b4328cde278e422c9e243f7bfd1e97f511fec43a80f535cf6b0ef6b086776")


def test_url_normalisation() -> None:
    signed = "https://bucket.s3.amazonaws.com/blob?X-Amz-Signature=abc&X-Amz-Date=1&keep=1&ns=docker.io"
    assert normalize_url(signed) == "https://bucket.s3.amazonaws.com/blob?keep=1"
    assert normalize_url("https://Example.COM/") == "https://example.com"
    assert normalize_url("https://e.com/?a=x y~*") == "https://e.com/?a=x+y%7E*"
    assert task_id("https://e.com/f?Expires=1") == task_id("https://e.com/f?Expires=2")


def test_other_task_id_modes() -> None:
    digest = "a" * 64
    assert blob_digest_task_id(f"http://127.0.0.1:5000/v2/lib/app/blobs/sha256:{digest}") == digest
    assert blob_digest_task_id("http://127.0.0.1:5000/v2/lib/app/manifests/1") is None
    assert content_task_id(b"x") == hashlib.sha256(b"x").hexdigest()


@pytest.mark.parametrize(("size", "expected"), [(0, 4 << 20), (1 << 30, 4 << 20), (10 << 30, 32 << 20),
                                                (100 << 30, 64 << 20), (4 << 40, 64 << 20)])
def test_piece_length(size: int, expected: int) -> None:
    assert piece_length(size) == expected


def test_piece_layout_and_digest() -> None:
    layout = pieces(10 << 20, 4 << 20)
    assert [(p.number, p.offset, p.length) for p in layout] == [(0, 0, 4 << 20), (1, 4 << 20, 4 << 20),
                                                                 (2, 8 << 20, 2 << 20)]
    assert piece_digest(b"hello") == f"crc32:{zlib.crc32(b'hello')}" == "crc32:907060870"
    assert verify_piece(b"hello", "crc32:907060870") and not verify_piece(b"hellp", "crc32:907060870")
    with pytest.raises(ValueError, match="4 MiB"):
        piece_length(1, requested=1 << 20)


def test_vortex_round_trip_and_errors() -> None:
    task = "f" * 64
    frame = vortex.decode(vortex.encode(vortex.Tag.DOWNLOAD_PIECE, vortex.download_piece(task, 7), frame_id=9))
    assert (frame.id, frame.tag) == (9, vortex.Tag.DOWNLOAD_PIECE)
    assert vortex.parse_download_piece(frame.value) == (task, 7)
    err = vortex.parse_error(vortex.decode(vortex.encode(vortex.Tag.ERROR, vortex.error(
        vortex.ErrorCode.NOT_FOUND, "piece 7 not found"))).value)
    assert err.code is vortex.ErrorCode.NOT_FOUND and str(err) == "piece 7 not found"
    with pytest.raises(vortex.VortexError, match="64 characters"):
        vortex.download_piece("short", 1)
    with pytest.raises(vortex.VortexError, match="more than"):
        vortex.decode_header(bytes([1, 1]) + (1 << 31).to_bytes(4, "big"))
    with pytest.raises(vortex.VortexError, match="header says"):
        vortex.decode(vortex.encode(vortex.Tag.PIECE_CONTENT, b"abc")[:-1])


@given(st.binary(max_size=80))
def test_vortex_parsers_reject_garbage_cleanly(data: bytes) -> None:
    for parse in (vortex.decode, vortex.parse_download_piece):
        with contextlib.suppress(vortex.VortexError):
            parse(data)
    assert isinstance(vortex.parse_error(data), vortex.VortexError)


def test_host_and_peer_ids() -> None:
    assert host_id("10.0.0.2", "node-a") == "10.0.0.2-node-a"
    assert host_id("10.0.0.2", "node-a", seed=True) == "10.0.0.2-node-a-seed"
    first, second = peer_id("10.0.0.2", "node-a"), peer_id("10.0.0.2", "node-a")
    assert first.startswith("10.0.0.2-node-a-") and first != second  # a new id for every download
    assert peer_id("10.0.0.2", "node-a", seed=True).endswith("-seed")
