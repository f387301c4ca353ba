"""Real services for tests: a mosquitto broker per test, a busybox image built locally, polling waits."""

from __future__ import annotations

import contextlib
import io
import re
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


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 10) -> None:
    """Terminate ``proc`` if it still runs; kill it if it has not exited within ``timeout`` s."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


REGION_BRIDGE_CONF = (
    Path(__file__).resolve().parent.parent.parent / "packaging" / "mosquitto-region-bridge.conf"
)


def region_bridge_conf(central_port: int, region: str, restart_timeout: str | None = None) -> str:
    """The shipped regional bridge configuration (docs/scaling.md), pointed at a central
    broker on 127.0.0.1:``central_port`` with the client ids of ``region``.

    ``persistence`` is left to the broker that includes it; ``restart_timeout`` (e.g. "1 2")
    replaces the production backoff of the bridge's reconnects when given."""
    text = REGION_BRIDGE_CONF.read_text()
    text = re.sub(r"^persistence .*$", "", text, flags=re.M)
    text = re.sub(r"^address .*$", f"address 127.0.0.1:{central_port}", text, flags=re.M)
    text = text.replace("tether-bridge-region-1", f"tether-bridge-{region}")
    if restart_timeout is not None:
        text = re.sub(r"^restart_timeout .*$", f"restart_timeout {restart_timeout}", text, flags=re.M)
    return text


class Mosquitto:
    """A private mosquitto broker on 127.0.0.1, logging into `tmp_path`. Use as a context manager."""

    def __init__(self, tmp_path: Path, attempts: int = 5, extra_conf: str = "") -> None:
        self.dir = Path(tmp_path)
        self.attempts = attempts
        self.extra_conf = extra_conf
        """Appended to the generated mosquitto.conf (e.g. a bridge: ``connection ...``)."""
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
            # What compose/mosquitto.conf and docs/scaling.md prescribe for Tether: the default
            # (1,000) makes Mosquitto drop QoS 1 messages to a client that falls behind a burst.
            "max_queued_messages 100000\n"
            f"log_dest file {self.log_path}\n"
            "log_type all\n"
            # As root, mosquitto would drop to its own user, which cannot write into tmp_path.
            "user root\n"
            f"{self.extra_conf}\n"
        )
        with self.output_path.open("wb") as out:
            proc = subprocess.Popen([MOSQUITTO_BIN, "-c", str(self.conf_path)], stdout=out, stderr=out)
        self.proc = proc
        # Another program may hold the port, so a connection alone proves nothing: wait for
        # mosquitto's own "running" line (logged once its listeners are open) as well.
        wait_until(
            lambda: proc.poll() is not None or (" running" in self.log_text() and accepts(self.port)),
            timeout=15,
            message=f"mosquitto to listen on {self.port}",
        )
        return proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc)

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


def remove_tether_containers(client: Any, device_prefix: str = "") -> None:
    """Force-remove Tether's containers and networks (of devices whose id starts with ``device_prefix``).

    Tests pass the prefix of their own device ids, so that they never touch containers of
    anything else running on the same engine.
    """
    import docker.errors

    def mine(labels: dict[str, str] | None) -> bool:
        return (labels or {}).get("io.tether.device", "").startswith(device_prefix)

    for container in client.containers.list(all=True, filters={"label": "io.tether.managed"}):
        if mine(container.labels):
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
    for network in client.networks.list(filters={"label": MANAGED_LABEL}):
        if mine(network.attrs.get("Labels")):
            with contextlib.suppress(docker.errors.NotFound):
                network.remove()


def _pg_bin(name: str) -> str | None:
    import glob

    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else None


class Postgres:
    """A private PostgreSQL cluster on 127.0.0.1, in ``tmp_path``, run as the ``postgres`` user.

    Use as a context manager; :meth:`create_database` gives each test its own database.
    """

    def __init__(self, tmp_path: Path) -> None:
        import pwd
        import tempfile

        # pytest's tmp dirs are private to root; the server runs as `postgres`.
        del tmp_path
        self.dir = Path(tempfile.mkdtemp(prefix="tether-pg-")) / "pgdata"
        self.user = "postgres"
        self.uid = pwd.getpwnam(self.user).pw_uid
        self.port = 0
        self.url = ""

    def _run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        import os

        prefix = ["runuser", "-u", self.user, "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120, check=False)

    def __enter__(self) -> Postgres:
        import os

        initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not initdb or not pg_ctl:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        os.chown(self.dir.parent, self.uid, -1)
        result = self._run(initdb, "-D", str(self.dir), "--auth=trust", "-U", self.user, "--no-sync")
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr}")
        for _ in range(5):
            self.port = free_port()
            result = self._run(
                pg_ctl, "-D", str(self.dir), "-w", "-t", "60", "-l", str(self.dir / "server.log"),
                "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
                "start",
            )  # fmt: skip
            if result.returncode == 0:
                self.url = f"postgresql://{self.user}@127.0.0.1:{self.port}/postgres"
                return self
        raise RuntimeError(f"pg_ctl start failed: {result.stderr}\n{(self.dir / 'server.log').read_text()}")

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{name}"

    def __exit__(self, *exc: object) -> None:
        import shutil

        pg_ctl = _pg_bin("pg_ctl")
        if pg_ctl:
            self._run(pg_ctl, "-D", str(self.dir), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir.parent, ignore_errors=True)
