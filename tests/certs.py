"""Test-only certificate authorities and server certificates, made with ``cryptography``."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.registry_fixtures import KeyPair

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class TestCA:
    """A CA certificate and key, in memory and as PEM files."""

    __test__ = False  # not a pytest test class

    cert: x509.Certificate
    key: PrivateKey
    cert_path: Path
    key_path: Path

    def trust(self) -> ssl.SSLContext:
        """A client context trusting this CA only."""
        return ssl.create_default_context(cafile=self.cert_path)

    def issue(self, directory: Path, hosts: list[str]) -> KeyPair:
        """A server certificate for *hosts* (DNS names or IPs) signed by this CA, as PEM files in *directory*."""
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - _DAY).not_valid_after(now + _DAY)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        pair = KeyPair(directory / "server.key", directory / "server.crt")
        _write_key(pair.key_path, key)
        pair.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return pair


def make_ca(directory: Path, name: str, *, rsa_key: bool = False, ca: bool = True,
            lifetime: datetime.timedelta = 30 * _DAY) -> TestCA:
    """A self-signed CA (ECDSA P-256, or RSA 2048) valid for *lifetime* from now, written to ``DIRECTORY/NAME.crt``
    and ``NAME.key``; ``ca=False`` leaves out basicConstraints CA:TRUE."""
    directory.mkdir(parents=True, exist_ok=True)
    key: PrivateKey = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - _DAY)
               .not_valid_after(now + lifetime)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        builder = (builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False, key_agreement=False,
                                                key_cert_sign=True, crl_sign=True, encipher_only=False,
                                                decipher_only=False), critical=True))
    cert = builder.sign(key, hashes.SHA256())
    made = TestCA(cert, key, directory / f"{name}.crt", directory / f"{name}.key")
    made.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(made.key_path, key)
    return made


def _write_key(path: Path, key: PrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
