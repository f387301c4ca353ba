"""The one-line device install served by ``tether up --http``: the script, the agent's wheel, the CA.

``curl -fsSL http://CONTROLLER:9100/install.sh | sudo sh -s -- --token tet_...`` installs
exactly the controller's own version, from the controller, never from a package index:

    /install.sh          packaging/install-agent.sh with the values below filled in
    /agent/{wheel}       a wheel of the running code (the same files, byte for byte, as this
                         controller imports), built once when the server starts
    /ca.pem              the CA that devices verify an mqtts:// broker with, when there is one
    /wheels/             --wheelhouse DIR: wheels of the agent's dependencies for devices that
                         cannot reach the package index, as a pip ``--find-links`` page whose
                         links carry each file's ``#sha256=`` (pip checks it)

The script checks the wheel's and the CA's SHA-256 (written into the script it is served
with) before it installs them. Whoever can change what the device downloads can change the
script too, so the script travels on a network the operator trusts (or behind an HTTPS
proxy): the checksums guard against a truncated or mixed-up download, not a forger.

The wheel is made from the installed package's files as they are (a wheel install or an
editable checkout alike), with its METADATA and entry points, so an agent is never a
version other than its controller. The zip is deterministic: the same code gives the same
checksum on every start.
"""

from __future__ import annotations

import base64
import hashlib
import html
import importlib
import importlib.metadata
import importlib.resources
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from tether.protocol import __version__, names
from tether.protocol.mqtt import BrokerAddress

DISTRIBUTION = "tether"
# The packages of the distribution (pyproject.toml [tool.setuptools] packages; a test keeps
# the two the same): a namespace package under an editable install cannot list them.
PACKAGES = (
    "tether.protocol",
    "tether.agent",
    "tether.agent.drivers",
    "tether.controller",
    "tether.controller.ui",
    "tether.controller.http",
    "tether.broker",
    "tether.cli",
    "tether.sim",
)
SCRIPT_NAME = "install-agent.sh"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
# The values the served script gets: `served_NAME=""` lines of the script.
_SERVED_LINE = re.compile(r'^served_([a-z0-9_]+)=""(?=\n)', re.M)
_SAFE_VALUE = re.compile(r"\A[A-Za-z0-9_.:/\[\]@%+=-]*\Z")
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "")


@dataclass(frozen=True)
class Download:
    name: str
    data: bytes
    content_type: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel() -> Download:
    """A py3-none-any wheel of the running code and the installed distribution's metadata."""
    dist = importlib.metadata.distribution(DISTRIBUTION)
    version = dist.version
    info = f"{DISTRIBUTION}-{version}.dist-info"
    files: dict[str, bytes] = {}
    for package in PACKAGES:
        module = importlib.import_module(package)
        directory = Path(next(iter(module.__path__)))
        prefix = package.replace(".", "/")
        for path in sorted(directory.glob("*.py")):
            files[f"{prefix}/{path.name}"] = path.read_bytes()
    # A .dist-info has METADATA; a source checkout's .egg-info has the same as PKG-INFO.
    for name, sources in (
        ("METADATA", ("METADATA", "PKG-INFO")),
        ("entry_points.txt", ("entry_points.txt",)),
    ):
        text = next((t for t in map(dist.read_text, sources) if t is not None), None)
        if text is None:
            raise RuntimeError(f"the installed {DISTRIBUTION} {version} has no {name}: reinstall it")
        files[f"{info}/{name}"] = text.encode()
    files[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: tether.controller.agent_install\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in sorted(files.items()))
    files[f"{info}/RECORD"] = (record + f"{info}/RECORD,,\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():  # RECORD last, the rest in order
            entry = zipfile.ZipInfo(name, _ZIP_TIME)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, data, compresslevel=9)
    return Download(
        f"{DISTRIBUTION}-{version}-py3-none-any.whl", buffer.getvalue(), "application/octet-stream"
    )


def script_template() -> str:
    """packaging/install-agent.sh, as installed with the controller (package data)."""
    return importlib.resources.files("tether.controller").joinpath(SCRIPT_NAME).read_text()


def _quoted(name: str, value: str) -> str:
    if not _SAFE_VALUE.match(value):
        raise ValueError(f"served_{name}: {value!r} cannot be put in the script")
    return f"served_{name}='{value}'"


def render_script(template: str, values: dict[str, str]) -> str:
    """The script with its ``served_NAME=""`` lines set (every name in ``values`` must be there)."""
    missing = set(values) - set(_SERVED_LINE.findall(template))
    if missing:
        raise ValueError(f"the install script has no served_{sorted(missing)[0]} line")
    return _SERVED_LINE.sub(
        lambda m: _quoted(m.group(1), values[m.group(1)]) if m.group(1) in values else m.group(0), template
    )


def split_host(host_header: str) -> tuple[str, str] | None:
    """(host, host[:port]) of an HTTP Host header, or None if it is not a plain host name,
    IPv4 or [IPv6] address with an optional port (the header is the client's to choose)."""
    if not names.HTTP_HOST.ok(host_header):
        return None
    host = host_header[1:].partition("]")[0] if host_header.startswith("[") else host_header.partition(":")[0]
    return host, host_header


def device_broker_url(broker: BrokerAddress, request_host: str) -> str:
    """The broker URL a device should use: the controller's own, with a loopback or wildcard
    host replaced by the host the device reached the controller at."""
    host = broker.host
    if host in _LOOPBACK:
        host = request_host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{'mqtts' if broker.tls else 'mqtt'}://{host}:{broker.port}"


@dataclass
class InstallFiles:
    """What /install.sh, /agent/..., /ca.pem and /wheels/ serve (see the module's docstring)."""

    broker: BrokerAddress
    wheel: Download
    template: str
    ca: Download | None = None
    wheelhouse: Path | None = None
    scheme: str = "http"
    """``https`` when ``tether up --http-tls`` serves them."""

    @property
    def version(self) -> str:
        return __version__

    @classmethod
    def load(cls, broker: BrokerAddress, ca_file: Path | None, wheelhouse: Path | None) -> InstallFiles:
        if wheelhouse is not None and not wheelhouse.is_dir():
            raise FileNotFoundError(f"--wheelhouse {wheelhouse}: not a directory")
        ca = Download("ca.pem", ca_file.read_bytes(), "application/x-pem-file") if ca_file else None
        return cls(broker, build_wheel(), script_template(), ca, wheelhouse)

    def script(self, host_header: str) -> str | None:
        """The script for a device that asked at ``{scheme}://{host_header}``; None for a bad header."""
        split = split_host(host_header)
        if split is None:
            return None
        host, netloc = split
        server = f"{self.scheme}://{netloc}"
        values = {
            "version": __version__,
            "server": server,
            "broker": device_broker_url(self.broker, host),
            "wheel_url": f"{server}/agent/{quote(self.wheel.name)}",
            "wheel_sha256": self.wheel.sha256,
            "ca_url": f"{server}/ca.pem" if self.ca else "",
            "ca_sha256": self.ca.sha256 if self.ca else "",
            "find_links": f"{server}/wheels/" if self.wheelhouse else "",
        }
        return render_script(self.template, values)

    def get(self, path: str, host_header: str) -> Download | None:
        """What ``GET path`` answers, or None (not found)."""
        if path == "/install.sh":
            text = self.script(host_header)
            return Download(SCRIPT_NAME, text.encode(), "text/x-shellscript; charset=utf-8") if text else None
        if path == f"/agent/{self.wheel.name}":
            return self.wheel
        if path == "/ca.pem":
            return self.ca
        if self.wheelhouse is not None and path.startswith("/wheels/"):
            return self._wheelhouse(path.removeprefix("/wheels/"))
        return None

    def _wheelhouse(self, name: str) -> Download | None:
        assert self.wheelhouse is not None
        wheels = {p.name: p for p in self.wheelhouse.iterdir() if p.suffix == ".whl" and p.is_file()}
        if name == "":
            links = "".join(
                f'<a href="{quote(n)}#sha256={hashlib.sha256(p.read_bytes()).hexdigest()}">{html.escape(n)}</a><br>\n'
                for n, p in sorted(wheels.items())
            )
            page = f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n"
            return Download("index.html", page.encode(), "text/html; charset=utf-8")
        path = wheels.get(name)
        return Download(name, path.read_bytes(), "application/octet-stream") if path else None
