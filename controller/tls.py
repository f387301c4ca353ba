"""TLS for the embedded broker: the quick-start CA and server certificate, or the operator's own.

``tether up --tls`` makes, once, in ``{data_dir}/tls/``: ``ca.pem`` (a CA valid for 10 years;
its key ``ca.key`` 0600 stays there to sign again), ``server.pem`` and ``server.key`` (0600),
for ``localhost``, ``127.0.0.1``, this host's name and any ``--tls-san`` names or addresses.
Agents and the CLI verify the server against ``ca.pem`` (``ca_file`` / ``--ca-file``).
``--tls-cert/--tls-key/--tls-ca`` use the operator's own files instead.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from tether.protocol.errors import ConfigError
from tether.protocol.secret_files import write_secret_text

CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _san(names: Iterable[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(n for n in names if n):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def quickstart(data_dir: Path, extra_names: Iterable[str] = ()) -> TlsFiles:
    """The quick-start CA and server certificate in ``{data_dir}/tls``, made if missing."""
    tls = data_dir / "tls"
    files = TlsFiles(tls / "server.pem", tls / "server.key", tls / "ca.pem")
    if files.cert.exists() and files.key.exists() and files.ca and files.ca.exists():
        return files
    tls.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Tether CA ({socket.gethostname()})")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), *extra_names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tether broker")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    write_secret_text(tls / "ca.key", _key_pem(ca_key))
    write_secret_text(files.key, _key_pem(key))
    files.cert.write_text(cert.public_bytes(serialization.Encoding.PEM).decode())
    assert files.ca is not None
    files.ca.write_text(ca_cert.public_bytes(serialization.Encoding.PEM).decode())
    return files


def operator_files(cert: Path, key: Path, ca: Path | None) -> TlsFiles:
    """The operator's own certificate files, checked to exist."""
    for path in (cert, key, ca):
        if path is not None and not path.is_file():
            raise ConfigError(f"TLS file {path} does not exist")
    return TlsFiles(cert, key, ca)
