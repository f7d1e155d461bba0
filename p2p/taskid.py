"""Dragonfly v2 identifiers, computed byte for byte as Dragonfly's Rust client does.

task_id = sha256 hex of ``url (filtered query) + tag + application + revision + str(piece_length) +
"STANDARD"``, optional parts only when set, no separators (../shared/docs/dragonfly-protocol.md §2.1).
"""

from __future__ import annotations

import hashlib
import re
import socket
import uuid
from collections.abc import Iterable
from urllib.parse import parse_qsl, quote_plus, urlsplit, urlunsplit

DEFAULT_FILTERED_PREFIXES = ("X-Amz-", "X-Goog-", "q-")
DEFAULT_FILTERED_KEYS = frozenset({
    "OSSAccessKeyId", "Expires", "Signature", "SecurityToken",  # Alibaba OSS
    "AccessKeyId", "X-Obs-Date", "X-Obs-Security-Token",  # Huawei OBS
    "x-cos-security-token",  # Tencent COS
    "ns",  # containerd's mirror namespace parameter
})
_BLOB_URL = re.compile(r"/v2/.+/blobs/(?:sha256|sha512|crc32):([0-9a-f]+)$")


def _filtered(key: str, extra: Iterable[str]) -> bool:
    return key in DEFAULT_FILTERED_KEYS or key.startswith(DEFAULT_FILTERED_PREFIXES) or key in extra


def _form_quote(text: str) -> str:
    """application/x-www-form-urlencoded as WHATWG serialises it (``*`` kept, ``~`` escaped)."""
    return quote_plus(text, safe="*").replace("~", "%7E")


def normalize_url(url: str, filtered_query_params: Iterable[str] = ()) -> str:
    """The URL the task id hashes: filtered query keys dropped (others kept in order), a bare ``/`` path trimmed."""
    extra = frozenset(filtered_query_params)
    parts = urlsplit(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _filtered(k, extra)]
    path = parts.path or "/"
    query = "&".join(f"{_form_quote(k)}={_form_quote(v)}" for k, v in kept)
    text = urlunsplit((parts.scheme, parts.netloc.lower(), path, query, parts.fragment))
    if path == "/" and not kept and not parts.fragment:
        text = text.removesuffix("/")
    return text


def task_id(url: str, *, tag: str = "", application: str = "", revision: str = "", piece_length: int | None = None,
            filtered_query_params: Iterable[str] = ()) -> str:
    """The URL-based task id of a download."""
    h = hashlib.sha256(normalize_url(url, filtered_query_params).encode())
    for part in (tag, application, revision):
        if part:
            h.update(part.encode())
    if piece_length is not None:
        h.update(str(piece_length).encode())
    h.update(b"STANDARD")
    return h.hexdigest()


def blob_digest_task_id(url: str) -> str | None:
    """For ``enable_task_id_based_blob_digest``: the hex of a registry blob URL's digest, else None."""
    match = _BLOB_URL.search(urlsplit(url).path)
    return match.group(1) if match else None


def content_task_id(content: bytes) -> str:
    """For ``content_for_calculating_task_id``: sha256 hex of the given content."""
    return hashlib.sha256(content).hexdigest()


def host_id(ip: str, hostname: str | None = None, *, seed: bool = False) -> str:
    """``{ip}-{hostname}``, with ``-seed`` for seed peers."""
    return f"{ip}-{hostname or socket.gethostname()}" + ("-seed" if seed else "")


def peer_id(ip: str, hostname: str | None = None, *, seed: bool = False) -> str:
    """``{ip}-{hostname}-{uuid4}``, new for every download, with ``-seed`` for seed peers."""
    return f"{ip}-{hostname or socket.gethostname()}-{uuid.uuid4()}" + ("-seed" if seed else "")
