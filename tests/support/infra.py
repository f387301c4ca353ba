"""Real services for tests: a mosquitto broker per test, a busybox image built locally, polling waits."""

from __future__ import annotations

import contextlib
import io
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MOSQUITTO_BIN = "/usr/sbin/mosquitto"
BUSYBOX_BIN = "/bin/busybox"
BUSYBOX_TAG = "tether-test/busybox:1"
BUSYBOX_APPLETS = [
    "sh", "httpd", "sleep", "echo", "cat", "ls", "mkdir", "env", "true", "false", "wget",
    "nc", "kill", "ps", "date", "touch", "rm", "test", "[",
]  # fmt: skip
MANAGED_LABEL = "io.tether.managed=true"


def wait_until(
    predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, message: str = ""
) -> T:
    """Poll `predicate` until it returns something truthy and return that; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s: {message or predicate!r}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for programs that cannot bind port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Mosquitto:
    """A private mosquitto broker on 127.0.0.1, logging into `tmp_path`. Use as a context manager."""

    def __init__(self, tmp_path: Path, attempts: int = 5) -> None:
        self.dir = Path(tmp_path)
        self.attempts = attempts
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "mosquitto.log"
        self.conf_path = self.dir / "mosquitto.conf"
        self.output_path = self.dir / "mosquitto.out"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        parts = [p.read_text(errors="replace") for p in (self.log_path, self.output_path) if p.exists()]
        return "".join(parts)

    def start(self) -> Mosquitto:
        for _ in range(self.attempts):
            self.port = free_port()
            if self._launch():
                return self
            if "in use" not in self.log_text():
                raise RuntimeError(f"mosquitto exited at start:\n{self.log_text()}")
        raise RuntimeError(f"mosquitto found no free port in {self.attempts} attempts:\n{self.log_text()}")

    def _launch(self) -> bool:
        """Start mosquitto on self.port; True once it serves, False if it exited instead."""
        self.log_path.unlink(missing_ok=True)
        self.conf_path.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            f"log_dest file {self.log_path}\n"
            "log_type all\n"
            # As root, mosquitto would drop to its own user, which cannot write into tmp_path.
            "user root\n"
        )
        with self.output_path.open("wb") as out:
            proc = subprocess.Popen([MOSQUITTO_BIN, "-c", str(self.conf_path)], stdout=out, stderr=out)
        self.proc = proc
        # Another program may hold the port, so a connection alone proves nothing: wait for
        # mosquitto's own "running" line (logged once its listeners are open) as well.
        wait_until(
            lambda: proc.poll() is not None or (" running" in self.log_text() and _accepts(self.port)),
            timeout=15,
            message=f"mosquitto to listen on {self.port}",
        )
        return proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Mosquitto:
        try:
            return self.start()
        except BaseException:
            self.stop()  # __exit__ does not run when __enter__ raises
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def docker_client() -> Any | None:
    """A `docker.DockerClient` for the engine in the environment, or None if none answers."""
    try:
        import docker

        client = docker.from_env(timeout=30)
        client.ping()
        return client
    except Exception:
        return None


def ensure_busybox_image(client: Any, tag: str = BUSYBOX_TAG) -> str:
    """Make sure image `tag` exists: a root filesystem of static busybox, imported (no registry needed)."""
    import docker.errors

    try:
        client.images.get(tag)
        return tag
    except docker.errors.ImageNotFound:
        pass

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:

        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size, info.linkname = kind, mode, len(data), link
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(data) if data else None)

        for d in ("bin", "etc", "www"):
            add(d, tarfile.DIRTYPE, 0o755)
        add("tmp", tarfile.DIRTYPE, 0o1777)
        add("etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/:/bin/sh\n")
        add("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\n")
        with open(BUSYBOX_BIN, "rb") as f:
            add("bin/busybox", tarfile.REGTYPE, 0o755, f.read())
        for applet in BUSYBOX_APPLETS:
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")

    repository, _, version = tag.rpartition(":") if ":" in tag else (tag, "", "latest")
    client.api.import_image_from_data(
        buf.getvalue(), repository=repository, tag=version, changes=["ENV PATH=/bin"]
    )
    client.images.get(tag)  # raises if the import did not produce the image
    return tag


def remove_tether_containers(client: Any) -> None:
    """Force-remove every container and network labelled io.tether.managed=true."""
    import docker.errors

    for container in client.containers.list(all=True, filters={"label": MANAGED_LABEL}):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
    for network in client.networks.list(filters={"label": MANAGED_LABEL}):
        with contextlib.suppress(docker.errors.NotFound):
            network.remove()
