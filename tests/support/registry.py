"""A real image registry for tests (Debian's ``docker-registry``) and images pushed to it.

:class:`Registry` runs the registry on 127.0.0.1 with port 0 (the port is read back from
its log), storage in a temporary directory, optionally with htpasswd (basic) auth.
:func:`push_image` builds an image on the local busybox image plus one layer of random
bytes and pushes it. Loopback registries are plain HTTP both for dockerd (127.0.0.0/8 is
an insecure registry by default) and for the agent.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from support.infra import BUSYBOX_TAG, stop_process, wait_until

REGISTRY_BIN = "/usr/bin/docker-registry"
HTPASSWD_BIN = "/usr/bin/htpasswd"


def registry_available() -> str | None:
    """Why registry tests cannot run here, or None."""
    if not os.access(REGISTRY_BIN, os.X_OK):
        return f"{REGISTRY_BIN} not installed (apt-get install docker-registry)"
    if not os.access(HTPASSWD_BIN, os.X_OK):
        return f"{HTPASSWD_BIN} not installed (apt-get install apache2-utils)"
    return None


class Registry:
    """A private registry on 127.0.0.1; ``htpasswd`` ({user: password}) turns basic auth on.

    Use as a context manager. :meth:`stop` and :meth:`start` again keep the same port and
    content (a registry that goes away and comes back)."""

    def __init__(
        self,
        tmp_path: Path,
        htpasswd: dict[str, str] | None = None,
        storage: Path | None = None,
        auth: str = "",
    ) -> None:
        """``auth``: a raw ``auth:`` section instead (e.g. :meth:`TokenServer.config`);
        ``storage``: share content with another registry (push to an open one, pull here)."""
        self.dir = Path(tmp_path)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage = storage or self.dir / "storage"
        self.htpasswd = htpasswd
        self.auth = auth
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self, port: int) -> Path:
        auth = self.auth
        if self.htpasswd is not None:
            lines = []
            for user, password in self.htpasswd.items():
                out = subprocess.run(
                    [HTPASSWD_BIN, "-Bbn", user, password], capture_output=True, text=True, check=True
                )
                lines.append(out.stdout.strip())
            (self.dir / "htpasswd").write_text("\n".join(lines) + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: tether-test\n    path: {self.dir / 'htpasswd'}\n"
        path = self.dir / "config.yml"
        path.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
            f"{auth}"
        )
        return path

    def start(self) -> Registry:
        config = self._config(self.port)
        self.log_path.write_text("")
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=out, stderr=out)
        proc = self.proc

        def listening() -> int | None:
            if proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited:\n{self.log_path.read_text()}")
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log_path.read_text(errors="replace"))
            return int(m.group(1)) if m else None

        self.port = wait_until(listening, 30, message="docker-registry to listen")
        return self

    def kill(self) -> None:
        """Gone at once, open connections reset (a cut, not a graceful stop that drains them)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> Registry:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def push_image(
    docker: Any,
    host: str,
    name: str,
    layer_bytes: int,
    auth: tuple[str, str] | None = None,
    base: str = BUSYBOX_TAG,
    command: str | None = None,
) -> str:
    """Build ``base`` + one layer of ``layer_bytes`` random bytes, push it as ``host/name``
    (``repo:tag``) and remove it from the engine again; the reference pushed."""
    ref = f"{host}/{name}"
    repo, _, tag = ref.rpartition(":")
    dockerfile = f"FROM {base}\nCOPY blob /blob\n" + (f"CMD {command}\n" if command else "")
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        for member, data in (("Dockerfile", dockerfile.encode()), ("blob", os.urandom(layer_bytes))):
            info = tarfile.TarInfo(member)
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    docker.images.build(fileobj=context, custom_context=True, tag=ref, rm=True)
    auth_config = {"username": auth[0], "password": auth[1]} if auth else None
    for line in docker.api.push(repo, tag=tag, stream=True, decode=True, auth_config=auth_config):
        if "error" in line:
            raise RuntimeError(f"push {ref}: {line['error']}")
    docker.images.remove(ref, force=True)
    return ref


def layer_size(host: str, name: str) -> int:
    """The compressed size of the last layer of ``host/name`` as the registry stores it."""
    import json
    import urllib.request

    repo, _, tag = name.rpartition(":")
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return int(json.load(resp)["layers"][-1]["size"])
