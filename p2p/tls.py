"""TLS for the peer's proxy: whom origins are trusted by, and HTTPS interception of CONNECT tunnels (Dragonfly
dfdaemon's ``hijackHTTPS``).

An intercepted tunnel is answered with a leaf certificate for the CONNECT host (SAN dNSName or iPAddress, ECDSA
P-256, valid for a day) signed by the configured CA; leaves are minted on first use, off the trio thread, and
cached per host until an hour before they expire.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import ssl
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2p.config import PeerConfig

LEAF_LIFETIME = datetime.timedelta(days=1)
CLOCK_SKEW = datetime.timedelta(hours=1)  # leaves are valid from an hour ago
RENEW_BEFORE = 3600.0  # seconds before a cached leaf expires that it is minted anew
MAX_CACHED = 1024  # leaf contexts kept (least recently used go first)
_DNS_NAME = re.compile(r"(?=.{1,253}$)[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")

CAKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class TLSConfigError(ValueError):
    """A CA, key or bundle that cannot be used; the message names the file."""


def origin_context(bundle: Path | None) -> ssl.SSLContext:
    """Verification of origins: the system trust store, plus the CA certificates in *bundle* if given."""
    context = ssl.create_default_context()
    if bundle is not None:
        try:
            context.load_verify_locations(cafile=bundle)
        except OSError as exc:  # ssl.SSLError too
            raise TLSConfigError(f"origin CA bundle {bundle}: {_reason(exc)}") from None
    return context


@dataclass(frozen=True)
class CertificateAuthority:
    """The proxy's CA: signs the leaf certificates of intercepted hosts."""

    cert: x509.Certificate
    key: CAKey

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """Read and check a PEM CA certificate and its unencrypted PEM key (RSA or ECDSA)."""
        cert_pem, key_pem = _read(cert_path, "proxy CA certificate"), _read(key_path, "proxy CA key")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise TLSConfigError(f"proxy CA certificate {cert_path} is not a PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise TLSConfigError(f"proxy CA key {key_path} is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, CAKey):
            raise TLSConfigError(f"proxy CA key {key_path}: {type(key).__name__} is not supported (RSA or ECDSA)")
        if _spki(key.public_key()) != _spki(cert.public_key()):
            raise TLSConfigError(f"proxy CA key {key_path} does not match the certificate {cert_path}")
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if not is_ca:
            raise TLSConfigError(f"proxy CA certificate {cert_path} is not a CA certificate (no basicConstraints "
                                 "CA:TRUE)")
        ca = cls(cert, key)
        ca.check_validity(str(cert_path))
        return ca

    def check_validity(self, name: str) -> None:
        """Raise TLSConfigError if the CA certificate (called *name*) has expired."""
        if self.cert.not_valid_after_utc <= _now():
            expired = self.cert.not_valid_after_utc
            raise TLSConfigError(f"proxy CA certificate {name} expired at {expired:%Y-%m-%d %H:%M:%S} UTC")

    def issue(self, host: str) -> tuple[bytes, datetime.datetime]:
        """A leaf certificate for *host* (a DNS name or an IP address): PEM chain plus key, and its expiry.
        TLSConfigError once the CA has expired."""
        self.check_validity(self.cert.subject.rfc4514_string())
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        expires = min(now + LEAF_LIFETIME, self.cert.not_valid_after_utc)
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])])
        authority_key = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._key_id())
        leaf = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - CLOCK_SKEW).not_valid_after(expires)
                .add_extension(x509.SubjectAlternativeName([san]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(authority_key, critical=False)
                .sign(self.key, hashes.SHA256()))
        pem = b"".join((leaf.public_bytes(serialization.Encoding.PEM),
                        self.cert.public_bytes(serialization.Encoding.PEM),
                        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())))
        return pem, expires

    def _key_id(self) -> x509.SubjectKeyIdentifier:
        """The CA's subject key identifier, for its leaves' authority key identifier."""
        try:
            return self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            return x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())


class Interceptor:
    """Which CONNECT targets are intercepted, and the server-side TLS context for each."""

    def __init__(self, ca: CertificateAuthority, hosts: Iterable[str]) -> None:
        self.ca = ca
        self.hosts = [_compile(pattern) for pattern in hosts]
        self._contexts: OrderedDict[str, tuple[ssl.SSLContext, float]] = OrderedDict()
        self._lock = trio.Lock()

    def intercepts(self, authority: str) -> bool:
        """Whether a CONNECT to *authority* (lowercase ``host:port``, IPv6 in brackets) is intercepted."""
        return any(pattern.search(authority) for pattern in self.hosts)

    async def context(self, host: str) -> ssl.SSLContext:
        """The TLS server context presenting a leaf certificate for *host* (lowercase name or IP)."""
        async with self._lock:
            cached = self._contexts.get(host)
            if cached is not None and cached[1] > time.time():
                self._contexts.move_to_end(host)
                return cached[0]
            context, expires = await trio.to_thread.run_sync(self._mint, host)
            self._contexts[host] = (context, expires.timestamp() - RENEW_BEFORE)
            self._contexts.move_to_end(host)
            while len(self._contexts) > MAX_CACHED:
                self._contexts.popitem(last=False)
            return context

    def _mint(self, host: str) -> tuple[ssl.SSLContext, datetime.datetime]:
        pem, expires = self.ca.issue(host)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        with tempfile.NamedTemporaryFile(suffix=".pem") as chain:  # ssl loads chains from files only; mode 0600
            chain.write(pem)
            chain.flush()
            context.load_cert_chain(chain.name)
        return context, expires


def interceptor(config: PeerConfig) -> Interceptor | None:
    """The proxy's interceptor from *config*, or None when no CA is configured; TLSConfigError if unusable."""
    cert, key, hosts = config.proxy_ca_cert, config.proxy_ca_key, config.proxy_intercept_hosts
    if cert is None and key is None:
        if hosts:
            raise TLSConfigError("proxy_intercept_hosts needs proxy_ca_cert and proxy_ca_key")
        return None
    if cert is None or key is None:
        raise TLSConfigError("proxy_ca_cert and proxy_ca_key go together: "
                             f"{'proxy_ca_cert' if cert is None else 'proxy_ca_key'} is missing")
    if not hosts:
        raise TLSConfigError("proxy_ca_cert is set but proxy_intercept_hosts is empty: nothing would be intercepted")
    return Interceptor(CertificateAuthority.load(cert, key), hosts)


def check(config: PeerConfig) -> None:
    """Raise TLSConfigError if the proxy's CA or the origin CA bundle in *config* cannot be used."""
    origin_context(config.origin_ca_bundle)
    if config.proxy_port:
        interceptor(config)


def leaf_host(host: str) -> str | None:
    """*host* as a leaf certificate names it (lowercase DNS name or canonical IP), or None if it is neither."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower().rstrip(".")
        return host if _DNS_NAME.fullmatch(host) else None


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TLSConfigError(f"proxy_intercept_hosts: bad regex {pattern!r}: {exc}") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"{what} {path}: {_reason(exc)}") from None


def _reason(exc: OSError) -> str:
    return str(exc) if isinstance(exc, ssl.SSLError) or not exc.strerror else exc.strerror


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)  # as certificates store times
