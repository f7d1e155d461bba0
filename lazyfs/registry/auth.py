"""Registry authentication: Docker config credentials, WWW-Authenticate challenges, bearer tokens."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import trio

from lazyfs.registry.errors import AuthError, ProtocolError
from lazyfs.registry.reference import DOCKER_HUB

_DOCKER_HUB_KEYS = frozenset({DOCKER_HUB, "index.docker.io", "registry-1.docker.io"})
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME_RE = re.compile(rf"[\s,]*({_TOKEN})")
_PARAM_RE = re.compile(rf'[\s,]*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)')
_QUOTED_PAIR_RE = re.compile(r"\\(.)")
_MIN_TOKEN_LIFETIME = 60.0
_TOKEN_EXPIRY_MARGIN = 10.0


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A username and password (or identity token used as password)."""

    username: str
    password: str = dataclasses.field(repr=False)

    def basic_header(self) -> str:
        """The value of an ``Authorization: Basic`` header."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


def docker_config_path() -> Path:
    """Where the Docker CLI keeps its config: ``$DOCKER_CONFIG/config.json`` or ``~/.docker/``."""
    directory = os.environ.get("DOCKER_CONFIG")
    base = Path(directory) if directory else Path.home() / ".docker"
    return base / "config.json"


def load_docker_credentials(registry: str, config_path: Path | None = None) -> Credentials | None:
    """Credentials stored for *registry* in the Docker config's ``auths`` section, if any."""
    path = config_path or docker_config_path()
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuthError(f"cannot read Docker config {path}: {exc}") from exc
    auths = config.get("auths") if isinstance(config, dict) else None
    if not isinstance(auths, dict):
        return None
    wanted = _config_key(registry)
    for key, entry in auths.items():
        if _config_key(key) == wanted and isinstance(entry, dict):
            return _entry_credentials(entry, path, key)
    return None


def _config_key(name: str) -> str:
    """Normalise an ``auths`` key or registry name: no scheme, no path, Docker Hub aliases merged."""
    host = name.split("://", 1)[-1].split("/", 1)[0].lower()
    return DOCKER_HUB if host in _DOCKER_HUB_KEYS else host


def _entry_credentials(entry: dict[str, object], path: Path, key: str) -> Credentials | None:
    """Decode one ``auths`` entry: base64 ``auth`` or separate ``username``/``password``."""
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise AuthError(f"Docker config {path}: 'auth' for {key} is not base64 of user:password")
        return Credentials(user, password)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and isinstance(secret, str) and name:
        return Credentials(name, secret)
    return None


@dataclasses.dataclass(frozen=True)
class Challenge:
    """One ``WWW-Authenticate`` challenge: a lowercased scheme and its lowercased-name parameters."""

    scheme: str
    params: dict[str, str]


def parse_challenges(headers: Sequence[str]) -> list[Challenge]:
    """Parse every challenge in the given ``WWW-Authenticate`` header values."""
    challenges = []
    for header in headers:
        pos = 0
        while scheme := _SCHEME_RE.match(header, pos):
            params = {}
            pos = scheme.end()
            while param := _PARAM_RE.match(header, pos):
                value = param.group(2)
                if value.startswith('"'):
                    value = _QUOTED_PAIR_RE.sub(r"\1", value[1:-1])
                params[param.group(1).lower()] = value
                pos = param.end()
            challenges.append(Challenge(scheme.group(1).lower(), params))
    return challenges


@dataclasses.dataclass
class _Token:
    value: str
    expires: float


TokenFetcher = Callable[[str, list[tuple[str, str]], dict[str, str]], Awaitable[tuple[int, bytes]]]
"""GET (url, query params, headers) -> (status 200, 401 or 403, body); the transport raises on others."""


class Authenticator:
    """Chooses the ``Authorization`` header for registry requests and caches bearer tokens per scope.

    It learns the registry's scheme from the first 401 challenge; after that, requests for a new
    scope fetch their token up front instead of paying a 401 round trip each.
    """

    def __init__(self, registry: str, credentials: Credentials | None, fetch: TokenFetcher) -> None:
        self.registry = registry
        self._credentials = credentials
        self._fetch = fetch
        self._challenge: Challenge | None = None
        self._tokens: dict[tuple[str, ...], _Token] = {}
        self._token_lock = trio.Lock()

    @property
    def credentials(self) -> Credentials | None:
        """The credentials in use, if any."""
        return self._credentials

    async def header(self, scopes: tuple[str, ...]) -> str | None:
        """The ``Authorization`` value for a request needing *scopes*, or None to go anonymous."""
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._credentials.basic_header() if self._credentials else None
        async with self._token_lock:  # concurrent requests share one token fetch
            token = self._tokens.get(scopes)
            if token is None or token.expires <= time.monotonic():
                token = await self._fetch_token(challenge, scopes)
                self._tokens[scopes] = token
        return f"Bearer {token.value}"

    async def on_unauthorized(self, www_authenticate: Sequence[str], scopes: tuple[str, ...], what: str) -> None:
        """Learn from a 401 so that a retry can authenticate; raise :class:`AuthError` if none can."""
        challenges = parse_challenges(www_authenticate)
        usable = [c for c in challenges if c.scheme == "bearer" and "realm" in c.params]
        usable += [c for c in challenges if c.scheme == "basic"]
        if not usable:
            raise AuthError(f"{what}: 401 Unauthorized without a supported WWW-Authenticate challenge")
        challenge = self._challenge = usable[0]
        if challenge.scheme == "basic":
            if self._credentials is None:
                raise AuthError(f"{what}: 401 Unauthorized: {self.missing_login()}")
            return
        wanted = tuple(dict.fromkeys(scopes + tuple(challenge.params.get("scope", "").split())))
        self._tokens[scopes] = await self._fetch_token(challenge, wanted)

    def missing_login(self) -> str:
        """Explain that the registry wants a login we do not have."""
        return f"registry {self.registry} needs a login (none given or found in the Docker config)"

    async def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> _Token:
        """GET a bearer token for *scopes* from the challenge's realm."""
        realm = challenge.params["realm"]
        params = [("scope", scope) for scope in scopes]
        if "service" in challenge.params:
            params.insert(0, ("service", challenge.params["service"]))
        headers = {"Authorization": self._credentials.basic_header()} if self._credentials else {}
        status, body = await self._fetch(realm, params, headers)
        if status != 200:
            who = f"user {self._credentials.username!r}" if self._credentials else "anonymous access"
            raise AuthError(f"token service {realm} refused {who} for {self.registry} ({status})")
        return _parse_token(body, realm)


def _parse_token(body: bytes, realm: str) -> _Token:
    """Read ``token`` (or OAuth2 ``access_token``) and ``expires_in`` from a token response."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"token service {realm} sent invalid JSON: {exc}") from exc
    value = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"token service {realm} sent no token")
    lifetime = doc.get("expires_in")
    if not isinstance(lifetime, int | float) or lifetime < _MIN_TOKEN_LIFETIME:
        lifetime = _MIN_TOKEN_LIFETIME
    return _Token(value, time.monotonic() + lifetime - _TOKEN_EXPIRY_MARGIN)
