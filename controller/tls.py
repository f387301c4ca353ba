"""TLS for the embedded broker: the quick-start CA and server certificate, or the operator's own.

``tether up --tls`` makes, once, in ``{data_dir}/tls/``: ``ca.pem`` (a CA valid for 10 years;
its key ``ca.key`` 0600 stays there to sign again), ``server.pem`` and ``server.key`` (0600),
for ``localhost``, ``127.0.0.1``, this host's name and any ``--tls-san`` names or addresses.
Agents and the CLI verify the server against ``ca.pem`` (``ca_file`` / ``--ca-file``).
``--tls-cert/--tls-key/--tls-ca`` use the operator's own files instead.

Client certificates (mTLS, ``--require-client-cert``): :func:`issue_client` signs one with
the quick-start CA for a broker user (a device id, the controller's user, ``admin``); its
common name is the identity the broker authenticates (docs/security.md).
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
CLIENT_DAYS = 825


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


def _load_ca(data_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    tls = data_dir / "tls"
    try:
        cert = x509.load_pem_x509_certificate((tls / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((tls / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"no quick-start CA in {tls} ({exc.filename} missing): client certificates are signed by "
            "the CA that `tether up --tls` or `tether mosquitto-config --tls` makes"
        ) from exc
    except ValueError as exc:
        raise ConfigError(f"the quick-start CA in {tls} is unreadable: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{tls / 'ca.key'} is not the quick-start CA's EC key")
    return cert, key


def issue_client(data_dir: Path, name: str) -> tuple[str, str]:
    """(certificate PEM, key PEM) for broker user ``name`` (the common name), signed by the
    quick-start CA in ``{data_dir}/tls``, for client authentication only."""
    ca_cert, ca_key = _load_ca(data_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CLIENT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode(), _key_pem(key)


def common_name(cert_pem: bytes) -> str | None:
    """The subject common name of a PEM certificate (None if it has none)."""
    names = x509.load_pem_x509_certificate(cert_pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def client_files(data_dir: Path, name: str, stem: str | None = None) -> tuple[Path, Path]:
    """``{data_dir}/tls/{stem}.pem`` and ``.key`` (0600): a client certificate for ``name``,
    issued by the quick-start CA if missing or made for another name."""
    tls = data_dir / "tls"
    cert, key = tls / f"{stem or name}.pem", tls / f"{stem or name}.key"
    try:
        if key.is_file() and common_name(cert.read_bytes()) == name:
            return cert, key
    except (OSError, ValueError):
        pass  # missing or broken: issue a new one
    cert_pem, key_pem = issue_client(data_dir, name)
    write_secret_text(key, key_pem)
    cert.write_text(cert_pem)
    return cert, key


def operator_files(cert: Path, key: Path, ca: Path | None) -> TlsFiles:
    """The operator's own certificate files, checked to exist."""
    for path in (cert, key, ca):
        if path is not None and not path.is_file():
            raise ConfigError(f"TLS file {path} does not exist")
    return TlsFiles(cert, key, ca)
