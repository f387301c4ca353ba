"""The agent's own client of the Docker Registry HTTP API v2: manifests and resumable blobs.

Theory of operation
-------------------
Docker's own pull starts a layer over after a failed pull, so on a link that drops every
few minutes a large layer never arrives. The agent therefore fetches images itself
(:mod:`.staging` drives this module) and hands them to the engine complete:

* :func:`parse_reference` normalises an image reference as Docker does (``busybox`` is
  ``docker.io/library/busybox:latest``; a first component with a dot, a colon or
  ``localhost`` is a registry host).
* :meth:`RegistryClient.resolve` reads the manifest (Docker schema 2 or OCI; an index or
  manifest list is narrowed to this device's platform) and the image config, which holds
  the layers' uncompressed digests (diff ids) the engine knows layers by.
* :meth:`RegistryClient.fetch_blob` appends to a partial file with ``Range: bytes=N-``
  (RFC 9110 section 14.2), so a blob interrupted at 80% continues from 80%, after a cut,
  an agent restart or a reboot; the SHA-256 of the whole file is checked against the
  blob's digest before the blob counts as present.
* Authentication follows the registry's ``WWW-Authenticate`` challenge: Docker's token
  protocol (``Bearer realm=...,service=...``: a token for ``repository:NAME:pull``,
  asked with the device's credentials if it has some) or HTTP basic.

Errors are :class:`RegistryError`, *transient* (the network, a timeout, 5xx, 429: retried
with backoff by the caller) or *permanent* (manifest unknown, unauthorized, no image for
this platform: reported at once, in the registry's words, cut to a safe length).
Registries on loopback addresses, and hosts listed as insecure, are spoken to over plain
HTTP (as Docker treats 127.0.0.0/8); every other one over HTTPS.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.protocol.errors import TetherError
from tether.protocol.names import DOCKER_HUB, registry_of

from .drivers.docker_sdk import requests

DOCKER_HUB_API = "registry-1.docker.io"

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
ACCEPT = ", ".join((MANIFEST_V2, MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX))
MANIFEST_LIMIT = 4 * 1024 * 1024
"""Manifests and image configs larger than this are refused (a registry is not trusted)."""
CHUNK = 16 * 1024
"""Bytes read and written at a time: what a cut can cost (a partly read chunk is lost)."""
TIMEOUT = (10.0, 30.0)
"""(connect, read) seconds: a stalled connection is given up and resumed."""

_REF_RE = re.compile(
    r"^(?P<name>[a-z0-9]+(?:[._-]+[a-z0-9]+|__)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?\Z"
)
_HOST_RE = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]{1,5})?\Z")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}\Z")


class RegistryError(TetherError):
    """A registry could not give an image: ``transient`` errors are worth retrying."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


def _safe(text: object, limit: int = 200) -> str:
    """A remote string made safe to show: printable, one line, at most ``limit`` characters."""
    cleaned = "".join(c if c.isprintable() else " " for c in str(text)).strip()
    return cleaned[:limit] + ("..." if len(cleaned) > limit else "")


@dataclass(frozen=True)
class ImageRef:
    """A normalised image reference."""

    registry: str
    """As image references name it: ``docker.io``, ``registry.example:5000``."""
    repository: str
    tag: str | None
    digest: str | None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> ImageRef:
    """Normalise ``text`` as Docker does; :class:`RegistryError` (permanent) if it is not one."""
    registry = registry_of(text)
    rest = text[len(registry) + 1 :] if text.startswith(registry + "/") else text
    match = _REF_RE.match(rest) if _HOST_RE.match(registry) else None
    if not match or len(text) > 512:
        raise RegistryError(f"{_safe(text)!r} is not a valid image reference", transient=False)
    name = match.group("name")
    if registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    tag, digest = match.group("tag"), match.group("digest")
    return ImageRef(registry, name, tag if tag or digest else "latest", digest)


PINNED_TAG = "tether-sha256-"
"""How the engine names an image loaded for a digest-pinned reference (``docker load`` cannot
give an image a digest name): ``{registry}/{repository}:tether-sha256-{hex}``."""


def engine_name(ref: ImageRef) -> str:
    """The name the agent loads ``ref`` under: its tag, or for a digest-pinned reference a
    tag made of the digest (the manifest, checked against the digest, is what was loaded)."""
    if ref.digest:
        return f"{ref.registry}/{ref.repository}:{PINNED_TAG}{ref.digest.split(':', 1)[1]}"
    return f"{ref.registry}/{ref.repository}:{ref.tag or 'latest'}"


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1 : host.index("]")]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Platform:
    """The device's platform in OCI terms (``linux``, ``arm64``, variant ``v8``)."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def from_machine(cls, machine: str, os_name: str = "linux") -> Platform:
        """From ``uname -m`` (``x86_64``, ``aarch64``, ``armv7l``...)."""
        table = {
            "x86_64": ("amd64", None),
            "amd64": ("amd64", None),
            "aarch64": ("arm64", None),
            "arm64": ("arm64", None),
            "armv7l": ("arm", "v7"),
            "armv6l": ("arm", "v6"),
            "i386": ("386", None),
            "i686": ("386", None),
            "ppc64le": ("ppc64le", None),
            "s390x": ("s390x", None),
            "riscv64": ("riscv64", None),
        }
        arch, variant = table.get(machine, (machine, None))
        return cls(os_name, arch, variant)

    def matches(self, entry: Mapping[str, Any]) -> bool:
        if entry.get("os") != self.os or entry.get("architecture") != self.architecture:
            return False
        want = self.variant or ("v8" if self.architecture == "arm64" else None)
        variant = entry.get("variant") or ("v8" if self.architecture == "arm64" else None)
        return want is None or variant is None or variant == want

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Blob:
    """A blob a manifest names: its digest, size and media type."""

    digest: str
    size: int
    media_type: str = ""


@dataclass(frozen=True)
class ResolvedImage:
    """What the registry says an image is: its config (JSON bytes) and layers, in order."""

    ref: ImageRef
    manifest_digest: str
    config_digest: str
    config: bytes
    layers: tuple[Blob, ...]

    @property
    def diff_ids(self) -> tuple[str, ...]:
        """The layers' uncompressed digests, from the config."""
        data = json.loads(self.config)
        return tuple(data.get("rootfs", {}).get("diff_ids", ()))

    @property
    def image_id(self) -> str:
        """The engine's id of this image (the config's digest)."""
        return self.config_digest


class RateLimit:
    """A token bucket shared by every download: at most ``rate`` bytes/s (None: no limit)."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.clock = clock
        self._lock = threading.Lock()
        self._available = 0.0
        self._at = clock()

    def take(self, n: int, sleep: Callable[[float], None] = time.sleep) -> None:
        if not self.rate:
            return
        with self._lock:
            now = self.clock()
            burst = max(self.rate / 4, CHUNK)
            self._available = min(burst, self._available + (now - self._at) * self.rate) - n
            self._at = now
            wait = -self._available / self.rate if self._available < 0 else 0.0
        if wait > 0:
            sleep(wait)


class RegistryClient:
    """Talks to registries for one set of credentials (``host`` -> (username, password))."""

    def __init__(
        self,
        credentials: Mapping[str, tuple[str, str]] | None = None,
        platform: Platform | None = None,
        insecure: frozenset[str] = frozenset(),
        session: Any = None,
        timeout: tuple[float, float] = TIMEOUT,
    ) -> None:
        self.credentials = {host.lower(): creds for host, creds in (credentials or {}).items()}
        self.platform = platform or Platform()
        self.insecure = insecure
        self.session = session or requests.Session()
        self.timeout = timeout
        self._auth: dict[tuple[str, str], dict[str, str]] = {}  # (registry, repo) -> headers

    def close(self) -> None:
        self.session.close()

    def _base(self, ref: ImageRef) -> str:
        host = ref.api_host
        scheme = "http" if is_loopback(host) or host in self.insecure else "https"
        return f"{scheme}://{host}/v2/{ref.repository}"

    # --- HTTP with authentication ---

    def _get(self, ref: ImageRef, url: str, headers: dict[str, str], stream: bool = False) -> Any:
        """GET ``url``, answering one authentication challenge; transient errors raised."""
        key = (ref.registry, ref.repository)
        for attempt in range(2):
            try:
                resp = self.session.get(
                    url, headers={**headers, **self._auth.get(key, {})}, stream=stream, timeout=self.timeout
                )
            except requests.RequestException as exc:
                raise RegistryError(f"{ref.registry}: {_network_reason(exc)}", transient=True) from exc
            if resp.status_code != 401 or attempt:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            self._auth[key] = self._authenticate(ref, challenge)
        raise AssertionError("unreachable")

    def _authenticate(self, ref: ImageRef, challenge: str) -> dict[str, str]:
        scheme, _, params = challenge.partition(" ")
        creds = self.credentials.get(ref.registry.lower())
        if scheme.lower() == "basic":
            if creds is None:
                raise self._unauthorized(ref, "the registry asks for credentials and this device has none")
            return {"Authorization": requests.auth._basic_auth_str(*creds)}
        if scheme.lower() != "bearer":
            raise RegistryError(
                f"{ref.registry}: unsupported authentication {_safe(scheme, 40)!r}", transient=False
            )
        fields = dict(re.findall(r'(\w+)="([^"]*)"', params))
        realm = fields.get("realm", "")
        if not realm.startswith(("https://", "http://")):
            raise RegistryError(f"{ref.registry}: token realm {_safe(realm)!r} is not a URL", transient=False)
        query = {"scope": f"repository:{ref.repository}:pull"}
        if fields.get("service"):
            query["service"] = fields["service"]
        try:
            resp = self.session.get(realm, params=query, auth=creds, timeout=self.timeout)
        except requests.RequestException as exc:
            raise RegistryError(f"{ref.registry} token: {_network_reason(exc)}", transient=True) from exc
        with resp:
            if resp.status_code in (401, 403):
                raise self._unauthorized(ref, _registry_reason(resp))
            if resp.status_code != 200:
                raise _status_error(f"{ref.registry} token", resp)
            try:
                body = json.loads(resp.content[:MANIFEST_LIMIT])
                token = body.get("token") or body.get("access_token")
            except (ValueError, AttributeError):
                token = None
            if not isinstance(token, str) or not token:
                raise RegistryError(f"{ref.registry}: the token endpoint gave no token", transient=True)
        return {"Authorization": f"Bearer {token}"}

    def _unauthorized(self, ref: ImageRef, reason: str) -> RegistryError:
        hint = "" if ref.registry.lower() in self.credentials else " (tether registries add)"
        return RegistryError(f"{ref.registry}: unauthorized: {reason}{hint}", transient=False)

    def _small(self, ref: ImageRef, url: str, accept: str, what: str) -> tuple[bytes, Any]:
        resp = self._get(ref, url, {"Accept": accept}, stream=True)
        with resp:
            if resp.status_code != 200:
                if resp.status_code in (401, 403):
                    raise self._unauthorized(ref, _registry_reason(resp))
                raise _status_error(f"{ref} {what}", resp)
            try:
                body = resp.raw.read(MANIFEST_LIMIT + 1, decode_content=True)
            except (requests.RequestException, OSError) as exc:
                raise RegistryError(f"{ref.registry}: {_network_reason(exc)}", transient=True) from exc
            if len(body) > MANIFEST_LIMIT:
                raise RegistryError(f"{ref} {what}: larger than {MANIFEST_LIMIT} bytes", transient=False)
            return body, resp.headers

    # --- manifests ---

    def resolve(self, ref: ImageRef) -> ResolvedImage:
        """The image's manifest (for this platform) and config; :class:`RegistryError` if not."""
        body, headers = self._small(ref, f"{self._base(ref)}/manifests/{ref.reference}", ACCEPT, "manifest")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if ref.digest and digest != ref.digest:
            raise RegistryError(f"{ref}: the manifest does not match its digest", transient=True)
        manifest = _json(body, f"{ref} manifest")
        media = manifest.get("mediaType") or headers.get("Content-Type", "").split(";")[0]
        if media in (MANIFEST_LIST, OCI_INDEX) or "manifests" in manifest:
            entries = manifest.get("manifests") or []
            chosen = next(
                (
                    m
                    for m in entries
                    if isinstance(m, dict) and self.platform.matches(m.get("platform") or {})
                ),
                None,
            )
            if chosen is None:
                found = sorted(
                    {
                        "/".join(str(v) for v in (p.get("os"), p.get("architecture"), p.get("variant")) if v)
                        for m in entries
                        if isinstance(m, dict) and isinstance(p := m.get("platform"), dict)
                    }
                )
                raise RegistryError(
                    f"{ref}: no image for this device's platform {self.platform} "
                    f"(the registry has {_safe(', '.join(found)) or 'none'})",
                    transient=False,
                )
            sub = str(chosen.get("digest", ""))
            if not _DIGEST_RE.match(sub):
                raise RegistryError(f"{ref}: index entry with a malformed digest", transient=False)
            body, headers = self._small(ref, f"{self._base(ref)}/manifests/{sub}", ACCEPT, "manifest")
            if "sha256:" + hashlib.sha256(body).hexdigest() != sub:
                raise RegistryError(f"{ref}: the manifest does not match its digest", transient=True)
            digest = sub
            manifest = _json(body, f"{ref} manifest")
            media = manifest.get("mediaType") or headers.get("Content-Type", "").split(";")[0]
        if manifest.get("schemaVersion") != 2 or "layers" not in manifest:
            raise RegistryError(
                f"{ref}: unsupported manifest ({_safe(media or 'schema 1', 80)})", transient=False
            )
        config = _blob(manifest.get("config"), f"{ref} config")
        layers = tuple(_blob(layer, f"{ref} layer") for layer in manifest.get("layers") or ())
        for layer in layers:
            if (
                "zstd" in layer.media_type
                or "foreign" in layer.media_type
                or "nondistributable" in layer.media_type
            ):
                raise RegistryError(
                    f"{ref}: unsupported layer type {_safe(layer.media_type, 80)}", transient=False
                )
        config_body, _ = self._small(
            ref, f"{self._base(ref)}/blobs/{config.digest}", "application/octet-stream", "config"
        )
        if "sha256:" + hashlib.sha256(config_body).hexdigest() != config.digest:
            raise RegistryError(f"{ref}: the image config does not match its digest", transient=True)
        diff_ids = _json(config_body, f"{ref} config").get("rootfs", {}).get("diff_ids")
        if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
            raise RegistryError(f"{ref}: the config's diff ids do not match its layers", transient=False)
        if any(not isinstance(d, str) or not _DIGEST_RE.match(d) for d in diff_ids):
            raise RegistryError(f"{ref}: malformed diff id in the image config", transient=False)
        return ResolvedImage(ref, digest, config.digest, config_body, layers)

    # --- blobs ---

    def fetch_blob(
        self,
        ref: ImageRef,
        blob: Blob,
        partial: Path,
        on_bytes: Callable[[int], None] = lambda n: None,
        limit: RateLimit | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> bool:
        """Append the rest of ``blob`` to ``partial`` (resuming where it ends) and check its
        digest. True when the file is complete and verified, False if ``cancelled``.

        A file that turns out not to match the digest is deleted (the next attempt starts
        over) and raises a transient error.
        """
        partial.parent.mkdir(parents=True, exist_ok=True)
        have = partial.stat().st_size if partial.exists() else 0
        if have > blob.size:
            partial.unlink()
            have = 0
        hasher = hashlib.sha256()
        if have:
            with partial.open("rb") as f:
                while chunk := f.read(1024 * 1024):
                    hasher.update(chunk)
        if have < blob.size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            resp = self._get(ref, f"{self._base(ref)}/blobs/{blob.digest}", headers, stream=True)
            with resp:
                if resp.status_code == 206:
                    start = _range_start(resp.headers.get("Content-Range", ""))
                    if start != have:
                        raise RegistryError(
                            f"{ref.registry}: the registry answered another range than asked for",
                            transient=True,
                        )
                elif resp.status_code == 200:
                    have, hasher = 0, hashlib.sha256()  # no range support: from the start
                elif resp.status_code == 416:
                    partial.unlink(missing_ok=True)
                    raise RegistryError(f"{ref.registry}: range not satisfiable, starting over", True)
                elif resp.status_code in (401, 403):
                    raise self._unauthorized(ref, _registry_reason(resp))
                else:
                    raise _status_error(f"{ref} blob {blob.digest[:19]}", resp)
                # Unbuffered: every byte received is the kernel's at once, so a killed agent
                # loses nothing it has read (a power cut is caught by the digest check).
                with partial.open("r+b" if have else "wb", buffering=0) as out:
                    out.seek(have)
                    out.truncate()
                    try:
                        for chunk in resp.iter_content(CHUNK):
                            if cancelled():
                                return False
                            if have + len(chunk) > blob.size:
                                raise RegistryError(f"{ref}: blob larger than its manifest says", True)
                            out.write(chunk)
                            hasher.update(chunk)
                            have += len(chunk)
                            on_bytes(len(chunk))
                            if limit is not None:
                                limit.take(len(chunk))
                    except requests.RequestException as exc:
                        raise RegistryError(
                            f"{ref.registry}: {_network_reason(exc)}", transient=True
                        ) from exc
        if have < blob.size:
            raise RegistryError(f"{ref.registry}: connection closed before the blob ended", transient=True)
        if "sha256:" + hasher.hexdigest() != blob.digest:
            partial.unlink(missing_ok=True)
            raise RegistryError(f"{ref}: blob {blob.digest[:19]} does not match its digest", transient=True)
        return True


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise RegistryError(f"{what}: not JSON", transient=False) from exc
    if not isinstance(data, dict):
        raise RegistryError(f"{what}: not a JSON object", transient=False)
    return data


def _blob(entry: Any, what: str) -> Blob:
    if not isinstance(entry, dict):
        raise RegistryError(f"{what}: missing", transient=False)
    digest, size = entry.get("digest"), entry.get("size")
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise RegistryError(f"{what}: malformed digest", transient=False)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(f"{what}: malformed size", transient=False)
    return Blob(digest, size, str(entry.get("mediaType") or ""))


def _range_start(content_range: str) -> int | None:
    match = re.match(r"^bytes (\d+)-\d+/(?:\d+|\*)\Z", content_range.strip())
    return int(match.group(1)) if match else None


def _registry_reason(resp: Any) -> str:
    """The registry's own words for an error (its ``errors`` list), else the HTTP status."""
    try:
        body = json.loads(resp.content[:65536])
        errors = body.get("errors") if isinstance(body, dict) else None
        if isinstance(errors, list) and errors:
            parts = []
            for err in errors[:3]:
                if isinstance(err, dict):
                    message = str(err.get("message") or "").strip()
                    code = str(err.get("code") or "").strip()
                    parts.append(f"{message} ({code})" if message and code else message or code)
            if any(parts):
                return _safe("; ".join(p for p in parts if p))
    except (ValueError, requests.RequestException, OSError):
        pass
    return f"HTTP {resp.status_code} {_safe(resp.reason or '', 60)}".strip()


def _status_error(what: str, resp: Any) -> RegistryError:
    transient = resp.status_code >= 500 or resp.status_code in (408, 425, 429)
    return RegistryError(f"{what}: {_registry_reason(resp)}", transient=transient)


def _network_reason(exc: Exception) -> str:
    """A short reason for a network error: the innermost cause, without urllib3's wrapping."""
    if isinstance(exc, requests.Timeout):
        return "timed out"
    text = str(exc)
    for pattern, reason in (
        (r"Connection refused", "connection refused"),
        (
            r"Name or service not known|nodename nor servname|Temporary failure in name resolution",
            "name not resolved",
        ),
        (r"Connection reset", "connection reset"),
        (r"Network is unreachable", "network unreachable"),
        (r"No route to host", "no route to host"),
        (r"IncompleteRead|Connection broken|ChunkedEncodingError", "connection broken"),
        (r"certificate verify failed|SSLError|SSL", "TLS error"),
    ):
        if re.search(pattern, text):
            return reason
    return _safe(f"{exc.__class__.__name__}: {text}", 120)
