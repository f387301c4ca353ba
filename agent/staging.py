"""Staging images: download what the desired stacks need, off the agent's thread, resumably.

Theory of operation
-------------------
The agent's thread (:class:`~.core.AgentCore`) tells the :class:`ImageStager` which images
it wants (:meth:`ImageStager.want`, the images of every stack version it runs, is about to
run or stages) and asks which are on the device (:meth:`ImageStager.present`). It switches
a stack to a new version only when every image of that version is present, so the old
version keeps running, and restarting, for as long as a download takes.

The stager's own thread does the slow part, one image at a time:

1. **Present?** Each new reference is looked up in the engine once (``image_id``).
2. **Resolve** with the agent's registry client (:mod:`.registry`): manifest for this
   platform, config, layers. Layers the engine already has (a local image whose diff ids
   start with the same chain) are not fetched.
3. **Disk check**: the bytes still to fetch must fit in the content store's file system,
   and about :data:`ENGINE_FACTOR` times the compressed size must fit where the engine
   keeps its images, with :data:`DISK_RESERVE` to spare; otherwise the image fails at
   once with the numbers, instead of filling the disk halfway.
4. **Fetch** every missing layer into the content store under the data directory::

       {data_dir}/images/partial/{hex}         a layer being fetched (resumed with Range)
       {data_dir}/images/blobs/{hex}           a layer fetched and digest-checked
       {data_dir}/images/loaded.json           images this agent loaded: the only ones it prunes

5. **Load**: a ``docker save``-format archive (manifest, config, the fetched layers) is
   streamed to the engine (``docker load``), which skips layers it has; the blobs are then
   deleted (the engine holds the image now).

A transient error (network, registry unavailable) is shown as ``retrying`` with its
reason and retried with capped, jittered backoff, forever: the controller's
``--download-deadline`` decides when a slow device has failed. A permanent error
(manifest unknown, unauthorized, no image for this platform, not enough disk) is shown as
``failed`` at once and tried again only after :data:`PERMANENT_RETRY` seconds or when the
wanted images or credentials change.

Digest-pinned references (``image@sha256:...``) are fetched the same way, the manifest
checked against the digest; ``docker load`` cannot give an image a digest name, so they are
loaded as ``{registry}/{repository}:tether-sha256-{hex}`` (:func:`.registry.engine_name`),
the name the docker driver runs them by.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

from tether.protocol.backoff import Backoff
from tether.protocol.errors import DriverError

from .registry import (
    Blob,
    Platform,
    RateLimit,
    RegistryClient,
    RegistryError,
    ResolvedImage,
    engine_name,
    parse_reference,
)
from .store import atomic_write

log = logging.getLogger(__name__)

ENGINE_FACTOR = 4.0
"""The engine needs about this many times an image's compressed size while loading it: its
own copy of the archive, then the extracted layers (compression ratios of 2 to 3)."""
DISK_RESERVE = 64 * 1024 * 1024
"""Bytes left free on each file system after a download."""
PERMANENT_RETRY = 300.0
RETRY_CAP = 15.0
"""Longest wait (jittered) before retrying a transient error: a link that comes back is used
within 15 s (7.5 s on average), not after a minute of backoff that outlasted the cut."""
RATE_WINDOW = 10.0
"""Seconds over which the download rate is measured."""

ImageStateName = Literal["checking", "present", "downloading", "retrying", "failed"]


@dataclass(frozen=True)
class ImageStatus:
    """Where one wanted image stands. ``done``/``total``: bytes of the layers it needs."""

    state: ImageStateName = "checking"
    done: int = 0
    total: int | None = None
    reason: str | None = None


class ImageEngine(Protocol):
    """What the stager needs from a driver that runs images (the docker driver)."""

    def image_id(self, ref: str) -> str | None:
        """The id of the local image ``ref`` names, or None."""
        ...

    def layer_chains(self) -> set[tuple[str, ...]]:
        """Every prefix of every local image's diff ids: the layer chains the engine has."""
        ...

    def load_image(self, archive: Iterable[bytes]) -> None:
        """Load a ``docker save``-format archive, streamed."""
        ...

    def remove_image(self, ref: str) -> None:
        """Remove the name ``ref`` (or the image, if ``ref`` is an id); never forced."""
        ...

    def storage_path(self) -> str | None:
        """Where the engine keeps images, if the agent can see that directory."""
        ...


def _hex(digest: str) -> str:
    return digest.split(":", 1)[1]


def archive_stream(
    image: ResolvedImage, tag: str, layer_file: Callable[[Blob], Path | None]
) -> Iterator[bytes]:
    """A ``docker save`` archive of ``image`` named ``tag``, as chunks, without a temporary file.

    Layers for which ``layer_file`` gives None are left out: the engine has them (its load
    skips every layer whose chain it already holds)."""
    config_name = f"{_hex(image.config_digest)}.json"
    layer_names = [f"{_hex(layer.digest)}/layer.tar" for layer in image.layers]
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]

    def member(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        return info.tobuf(format=tarfile.USTAR_FORMAT)

    def pad(size: int) -> bytes:
        return b"\0" * (-size % tarfile.BLOCKSIZE)

    for name, data in (("manifest.json", json.dumps(manifest).encode()), (config_name, image.config)):
        yield member(name, len(data)) + data + pad(len(data))
    for layer, name in zip(image.layers, layer_names, strict=True):
        path = layer_file(layer)
        if path is None:
            continue
        yield member(name, layer.size)
        with path.open("rb") as f:
            while chunk := f.read(1024 * 1024):
                yield chunk
        yield pad(layer.size)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


class ContentStore:
    """Layers on disk: partial (being fetched) and complete (digest-checked) blobs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "partial").mkdir(parents=True, exist_ok=True)
        (root / "blobs").mkdir(parents=True, exist_ok=True)

    def partial(self, blob: Blob) -> Path:
        return self.root / "partial" / _hex(blob.digest)

    def complete(self, blob: Blob) -> Path:
        return self.root / "blobs" / _hex(blob.digest)

    def have(self, blob: Blob) -> int:
        """Bytes of ``blob`` on disk, complete or partial."""
        if self.complete(blob).exists():
            return blob.size
        try:
            return min(blob.size, self.partial(blob).stat().st_size)
        except OSError:
            return 0

    def finish(self, blob: Blob) -> None:
        """A verified partial becomes complete (atomically, durably)."""
        partial = self.partial(blob)
        with partial.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, self.complete(blob))

    def discard(self, keep: set[str]) -> None:
        """Delete every blob and partial whose digest hex is not in ``keep``."""
        for sub in ("partial", "blobs"):
            for path in (self.root / sub).iterdir():
                if path.name not in keep:
                    path.unlink(missing_ok=True)


class ImageStager:
    """Fetches wanted images on its own thread; the agent's thread reads where each stands."""

    def __init__(
        self,
        root: Path,
        engine: ImageEngine,
        *,
        platform: Platform | None = None,
        rate_limit: float | None = None,
        insecure: frozenset[str] = frozenset(),
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        disk_usage: Callable[[str], tuple[int, int, int]] = shutil.disk_usage,
        reserve: int = DISK_RESERVE,
        backoff: Backoff | None = None,
    ) -> None:
        self.root = root
        self.content = ContentStore(root)
        self.engine = engine
        self.platform = platform or Platform()
        self.limit = RateLimit(rate_limit)
        self.insecure = insecure
        self.on_change = on_change
        self.clock = clock
        self.disk_usage = disk_usage
        self.reserve = reserve
        self.backoff = backoff or Backoff(base=1.0, cap=RETRY_CAP)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._wanted: frozenset[str] = frozenset()
        self._credentials: dict[str, tuple[str, str]] = {}
        self._status: dict[str, ImageStatus] = {}
        self._attempts: dict[str, int] = {}
        self._retry_at: dict[str, float] = {}
        self._loaded_path = root / "loaded.json"
        self._loaded: dict[str, str] = self._read_loaded()  # image id -> the name it was loaded as
        self._prune: frozenset[str] | None = None
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self.bytes_fetched = 0
        """Bytes received from registries since start (for tests and benchmarks)."""
        self._thread = threading.Thread(target=self._run, name="image-stager", daemon=True)

    # --- the agent's thread ---

    def start(self) -> ImageStager:
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def want(self, images: Iterable[str], credentials: Mapping[str, tuple[str, str]]) -> None:
        """The images the agent needs now, and the registry credentials it has."""
        wanted = frozenset(images)
        creds = {host.lower(): pair for host, pair in credentials.items()}
        with self._lock:
            if wanted == self._wanted and creds == self._credentials:
                return
            if creds != self._credentials:
                self._retry_at = {
                    r: t
                    for r, t in self._retry_at.items()
                    if self._status.get(r, ImageStatus()).state != "failed"
                }
            for ref in wanted - self._wanted:
                if self._status.get(ref, ImageStatus()).state == "failed":
                    self._retry_at.pop(ref, None)
            self._wanted, self._credentials = wanted, creds
            self._status = {r: s for r, s in self._status.items() if r in wanted}
        self._wake.set()

    def present(self, ref: str) -> bool:
        with self._lock:
            return self._status.get(ref, ImageStatus()).state == "present"

    def status(self) -> dict[str, ImageStatus]:
        with self._lock:
            return {ref: self._status.get(ref, ImageStatus()) for ref in self._wanted}

    def rate(self) -> float:
        """Bytes/s received over the last :data:`RATE_WINDOW` seconds."""
        now = self.clock()
        with self._lock:
            while self._samples and self._samples[0][0] < now - RATE_WINDOW:
                self._samples.popleft()
            if not self._samples:
                return 0.0
            span = max(1.0, now - self._samples[0][0])
            return sum(n for _, n in self._samples) / span

    def recheck(self, ref: str) -> None:
        """``ref`` turned out missing (removed behind the agent's back): look again."""
        with self._lock:
            if self._status.get(ref, ImageStatus()).state == "present":
                self._status[ref] = ImageStatus()
        self._wake.set()

    def prune(self, keep: Iterable[str]) -> None:
        """Remove images this agent loaded whose name is not in ``keep`` (on the stager's thread)."""
        with self._lock:
            self._prune = frozenset(keep)
        self._wake.set()

    # --- the stager's thread ---

    def _set(self, ref: str, status: ImageStatus, notify: bool = True) -> None:
        with self._lock:
            if ref not in self._wanted:
                return
            changed = self._status.get(ref) != status
            self._status[ref] = status
        if changed and notify:
            self.on_change()

    def _get(self, ref: str) -> ImageStatus:
        with self._lock:
            return self._status.get(ref, ImageStatus())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                timeout = self._round()
            except Exception:  # noqa: BLE001 - a bug must not end the thread: logged, retried
                log.exception("image stager failed")
                timeout = 10.0
            if not self._stop.is_set():
                self._wake.wait(timeout)

    def _round(self) -> float | None:
        """One pass over the wanted images; how long to sleep after it (None: until woken)."""
        with self._lock:
            wanted, creds, prune = self._wanted, dict(self._credentials), self._prune
            self._prune = None
        if prune is not None:
            self._do_prune(prune)
        for ref in sorted(wanted):
            if self._get(ref).state == "checking":
                try:
                    found = self.engine.image_id(ref) is not None
                except DriverError as exc:
                    log.warning("cannot inspect image %s: %s", ref, exc)
                    return 10.0
                self._set(ref, ImageStatus("present") if found else ImageStatus("downloading"))
        now = self.clock()
        todo = [
            r for r in sorted(wanted) if self._get(r).state != "present" and self._retry_at.get(r, 0) <= now
        ]
        if not todo:
            waits = [
                t - now for r, t in self._retry_at.items() if r in wanted and self._get(r).state != "present"
            ]
            return max(0.5, min(waits)) if waits else None
        self._stage(todo, creds)
        return 0.0

    def _fail(self, ref: str, exc: Exception, transient: bool) -> None:
        reason = str(exc)
        attempt = self._attempts.get(ref, 0)
        self._attempts[ref] = attempt + 1
        delay = max(1.0, self.backoff.delay(attempt)) if transient else PERMANENT_RETRY
        self._retry_at[ref] = self.clock() + delay
        state: ImageStateName = "retrying" if transient else "failed"
        log.warning("image download: %s (%s)", reason, "retrying" if transient else "failed")
        self._set(ref, replace(self._get(ref), state=state, reason=reason))

    def _stage(self, todo: list[str], creds: dict[str, tuple[str, str]]) -> None:
        client = RegistryClient(creds, self.platform, self.insecure)
        try:
            resolved: dict[str, ResolvedImage] = {}
            for ref in todo:
                try:
                    resolved[ref] = client.resolve(parse_reference(ref))
                except RegistryError as exc:
                    self._fail(ref, exc, exc.transient)
            if not resolved:
                return
            chains = self.engine.layer_chains()
            needed: dict[str, list[Blob]] = {}
            for ref, image in resolved.items():
                ids = image.diff_ids
                needed[ref] = [b for i, b in enumerate(image.layers) if tuple(ids[: i + 1]) not in chains]
                total = sum(b.size for b in needed[ref])
                done = sum(self.content.have(b) for b in needed[ref])
                status = self._get(ref)
                self._set(
                    ref,
                    ImageStatus(
                        "retrying" if status.state == "retrying" else "downloading",
                        done,
                        total,
                        status.reason,
                    ),
                )
            problem = self._disk_problem(needed)
            if problem is not None:
                for ref in resolved:
                    self._fail(ref, RegistryError(f"{ref}: {problem}", transient=False), transient=False)
                return
            for ref, image in resolved.items():
                if not self._fetch(client, ref, image, needed[ref], needed):
                    return
        finally:
            client.close()

    def _fetch(
        self,
        client: RegistryClient,
        ref: str,
        image: ResolvedImage,
        layers: list[Blob],
        needed: dict[str, list[Blob]],
    ) -> bool:
        """Fetch and load one image; False if the round should end (an error, or cancelled)."""

        def cancelled() -> bool:
            with self._lock:
                return self._stop.is_set() or ref not in self._wanted

        def on_bytes(n: int) -> None:
            with self._lock:
                self.bytes_fetched += n
                self._samples.append((self.clock(), n))
                status = self._status.get(ref)
                if status is not None:
                    self._status[ref] = replace(status, done=status.done + n)

        before = self.bytes_fetched
        try:
            for blob in layers:
                if self.content.complete(blob).exists():
                    continue
                if self._get(ref).state == "retrying":
                    self._set(ref, replace(self._get(ref), state="downloading", reason=None))
                if not client.fetch_blob(
                    image.ref, blob, self.content.partial(blob), on_bytes, self.limit, cancelled
                ):
                    return False
                self.content.finish(blob)
                self._set(
                    ref, replace(self._get(ref), done=sum(self.content.have(b) for b in layers)), notify=False
                )
            tag = engine_name(image.ref)
            mine = {b.digest for b in layers}
            self.engine.load_image(
                archive_stream(image, tag, lambda b: self.content.complete(b) if b.digest in mine else None)
            )
        except RegistryError as exc:
            if self.bytes_fetched > before:  # the link worked until it broke: retry soon
                self._attempts.pop(ref, None)
            self._fail(ref, exc, exc.transient)
            return False
        except DriverError as exc:
            self._fail(ref, exc, transient=False)
            return False
        self._loaded[image.image_id] = tag
        self._write_loaded()
        still = {_hex(b.digest) for r, bs in needed.items() if r != ref for b in bs}
        for blob in layers:
            if _hex(blob.digest) not in still:
                self.content.complete(blob).unlink(missing_ok=True)
        self._done(ref)
        return True

    def _done(self, ref: str) -> None:
        self._attempts.pop(ref, None)
        self._retry_at.pop(ref, None)
        status = self._get(ref)
        log.info("image %s is on the device", ref)
        self._set(ref, ImageStatus("present", status.done, status.total))

    def _disk_problem(self, needed: Mapping[str, list[Blob]]) -> str | None:
        unique = {b.digest: b for bs in needed.values() for b in bs}
        store_need = sum(b.size - self.content.have(b) for b in unique.values())
        engine_need = int(sum(b.size for b in unique.values()) * ENGINE_FACTOR)
        places = [(str(self.root), store_need)]
        engine_path = self.engine.storage_path()
        if engine_path and os.path.isdir(engine_path):
            if os.stat(engine_path).st_dev == os.stat(self.root).st_dev:
                places = [(str(self.root), store_need + engine_need)]
            else:
                places.append((engine_path, engine_need))
        for path, need in places:
            free = self.disk_usage(path)[2]
            if need + self.reserve > free:
                return (
                    f"not enough disk space: the download needs {_mb(need)} "
                    f"(+{_mb(self.reserve)} kept free) on {path}, {_mb(free)} free"
                )
        return None

    # --- what this agent loaded: the only images it ever removes ---

    def _read_loaded(self) -> dict[str, str]:
        try:
            data = json.loads(self._loaded_path.read_text())
            return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_loaded(self) -> None:
        atomic_write(self._loaded_path, json.dumps(self._loaded, sort_keys=True).encode())

    def loaded(self) -> dict[str, str]:
        """Image id -> the name it was loaded as, for every image this agent loaded and still tracks."""
        return dict(self._loaded)

    def _do_prune(self, keep: frozenset[str]) -> None:
        keep_names = set(keep)
        for name in keep:
            with contextlib.suppress(RegistryError):
                keep_names.add(engine_name(parse_reference(name)))
        keep_ids = set()
        for name in keep:
            try:
                image_id = self.engine.image_id(name)
            except DriverError:
                return  # the engine is not answering: prune another time
            if image_id:
                keep_ids.add(image_id)
        for image_id, tag in sorted(self._loaded.items()):
            if image_id in keep_ids or tag in keep_names:
                continue
            try:
                current = self.engine.image_id(tag)
                target = tag if current == image_id else image_id
                if current != image_id and self.engine.image_id(image_id) is None:
                    del self._loaded[image_id]  # gone already
                    continue
                self.engine.remove_image(target)
                log.info("removed image %s (%s), no longer used", tag, image_id[:19])
                if self.engine.image_id(image_id) is None:
                    del self._loaded[image_id]
            except DriverError as exc:
                log.info("image %s (%s) not removed: %s", tag, image_id[:19], exc)
        self._write_loaded()
        with self._lock:
            wanted = set(self._wanted)
        if not any(self._get(r).state != "present" for r in wanted):
            self.content.discard(set())


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
