"""A Debian root filesystem with Python, made locally (no registry needed), and images built on it.

``debootstrap --variant=minbase`` from the Debian mirror this machine's apt uses gives a
root filesystem with Debian's python3; it is cached in :func:`cache_dir` and imported
once as the image :data:`DEBIAN_PYTHON_TAG`, the ``BASE`` of the Tether Dockerfiles in
tests. Both caches live across test runs: delete the directory or the image to rebuild.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

DEBIAN_SUITE = "bookworm"
DEBIAN_PYTHON_TAG = "tether-test/debian-python:12"
DEBIAN_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
IMAGE_CHANGES = (
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["/bin/bash"]',
)
REPO_ROOT = Path(__file__).resolve().parents[2]
# What a copy of the repository for an install leaves out (as a clean checkout would).
COPY_IGNORE = (".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "tether-data", "results")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test for ``reason``, or fail it with TETHER_REQUIRE_DOCKER=1 (as on CI)."""
    import pytest

    if os.environ.get("TETHER_REQUIRE_DOCKER") == "1":
        pytest.fail(f"TETHER_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(f"{reason} (set TETHER_REQUIRE_DOCKER=1 to fail instead)")


def cache_dir() -> Path:
    """Where the root filesystem is cached: $TETHER_TEST_CACHE, else a system or user cache."""
    if os.environ.get("TETHER_TEST_CACHE"):
        return Path(os.environ["TETHER_TEST_CACHE"])
    if os.geteuid() == 0:
        return Path("/var/cache/tether-test")
    return Path.home() / ".cache" / "tether-test"


def _sources_entries(etc_apt: Path) -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of every enabled ``deb`` entry in sources.list and sources.list.d."""
    files = [etc_apt / "sources.list"] + sorted((etc_apt / "sources.list.d").glob("*.list"))
    for path in files:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^\]]*\]", " ", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    yield words[1], [words[2]]
    for path in sorted((etc_apt / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", path.read_text()):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if (
                    fields.get("enabled", "yes").lower() == "no"
                    or "deb" not in fields.get("types", "").split()
                ):
                    continue
                for uri in fields.get("uris", "").split():
                    yield uri, fields.get("suites", "").split()


def debian_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian archive this machine's apt uses ($TETHER_TEST_DEBIAN_MIRROR overrides).

    The first entry for a Debian release suite (not -security, -updates or -backports)
    whose URI looks like a Debian archive; deb.debian.org if there is none.
    """
    if os.environ.get("TETHER_TEST_DEBIAN_MIRROR"):
        return os.environ["TETHER_TEST_DEBIAN_MIRROR"]
    candidates = [
        (uri, suites)
        for uri, suites in _sources_entries(etc_apt)
        if uri.startswith(("http://", "https://", "file:/"))
        and "security" not in uri
        and any(re.fullmatch(r"[a-z]+", suite) for suite in suites)
    ]
    for uri, suites in candidates:
        if DEBIAN_SUITE in suites:
            return uri.rstrip("/")
    for uri, _suites in candidates:
        if re.search(r"/debian/?$", uri):
            return uri.rstrip("/")
    return DEFAULT_MIRROR


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file, so that concurrent test sessions build a cache once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def host_arch() -> str:
    """This machine's Debian architecture (amd64, arm64, ...)."""
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def rootfs_dir(arch: str | None = None) -> Path:
    """The cached root filesystem: this machine's architecture, or ``arch`` (arm64, armhf, ...)."""
    suffix = f"-{arch}" if arch and arch != host_arch() else ""
    return cache_dir() / f"debian-{DEBIAN_SUITE}-python{suffix}"


def foreign_arch_problem(arch: str) -> str | None:
    """Why a root filesystem of ``arch`` cannot run here, or None: qemu-user-static's binfmt_misc
    entry must be registered and enabled (``update-binfmts --enable``; the kernel's binfmt_misc
    file system mounted on /proc/sys/fs/binfmt_misc)."""
    qemu = {"arm64": "aarch64", "armhf": "arm", "armel": "arm", "i386": "i386"}.get(arch, arch)
    if arch == host_arch() or (arch == "i386" and host_arch() == "amd64"):
        return None
    entry = Path("/proc/sys/fs/binfmt_misc") / f"qemu-{qemu}"
    try:
        state = entry.read_text().splitlines()[0]
    except OSError:
        return (
            f"no binfmt_misc entry {entry} for {arch} (apt-get install qemu-user-static binfmt-support; "
            "mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable)"
        )
    if state != "enabled":
        return f"{entry} is {state} (update-binfmts --enable qemu-{qemu})"
    return None


def image_exists(client: Any, tag: str) -> bool:
    import docker.errors

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def ensure_debian_rootfs(client: Any | None = None, arch: str | None = None) -> Path:
    """The cached Debian root filesystem with python3 (made on first use; root needed).

    From the image :data:`DEBIAN_PYTHON_TAG` if ``client`` has it, else with debootstrap.
    ``arch`` (arm64, armhf): a foreign architecture's, made by debootstrap and run under
    qemu-user-static (:func:`foreign_arch_problem` says whether it can run here).
    """
    foreign = arch is not None and arch != host_arch()
    root = rootfs_dir(arch)
    done = root / ".tether-rootfs-complete"
    if done.exists():
        return root
    with _locked(root.with_name(root.name + ".lock")):
        if done.exists():
            return root
        shutil.rmtree(root, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
        try:
            if not foreign and client is not None and image_exists(client, DEBIAN_PYTHON_TAG):
                _export_image(client, DEBIAN_PYTHON_TAG, work)
            else:
                _debootstrap(work, arch if foreign else None)
            (work / done.name).write_text(f"{DEBIAN_SUITE} {' '.join(DEBIAN_PACKAGES)}\n")
            work.rename(root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return root


def _debootstrap(target: Path, arch: str | None = None) -> None:
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    argv = [
        debootstrap, "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
        *([f"--arch={arch}"] if arch else []), DEBIAN_SUITE, str(target), debian_mirror(),
    ]  # fmt: skip
    # A foreign architecture's second stage runs under qemu: several times slower.
    result = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False)
    if result.returncode != 0:
        log = target / "debootstrap" / "debootstrap.log"
        detail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stderr[-4000:]}\n{detail}")
    # The downloaded packages are installed; an image does not need them.
    for deb in (target / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    _add_local_cas(target)


def _add_local_cas(target: Path) -> None:
    """Trust this machine's local CAs (/usr/local/share/ca-certificates) in ``target`` too.

    Where HTTPS goes through an intercepting proxy, pip in the image (which trusts the
    system store on Debian) then reaches PyPI as the host does. Nothing to do elsewhere.
    """
    local = Path("/usr/local/share/ca-certificates")
    certs = sorted(local.rglob("*.crt")) if local.is_dir() else []
    if not certs:
        return
    for cert in certs:
        dest = target / "usr/local/share/ca-certificates" / cert.relative_to(local)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cert, dest)
    subprocess.run(
        ["chroot", str(target), "update-ca-certificates"], capture_output=True, check=True, timeout=300
    )


def _export_image(client: Any, tag: str, target: Path) -> None:
    """Unpack the filesystem of image ``tag`` into ``target``."""
    container = client.containers.create(tag, command=["true"])
    try:
        with subprocess.Popen(["tar", "-x", "-C", str(target)], stdin=subprocess.PIPE) as tar:
            assert tar.stdin is not None
            for chunk in container.export():
                tar.stdin.write(chunk)
            tar.stdin.close()
            if tar.wait() != 0:
                raise RuntimeError(f"unpacking the filesystem of {tag} failed")
    finally:
        container.remove(force=True)


def ensure_debian_python_image(client: Any, tag: str = DEBIAN_PYTHON_TAG) -> str:
    """Make sure image ``tag`` exists: the cached root filesystem, imported (no registry needed)."""
    if image_exists(client, tag):
        return tag
    root = ensure_debian_rootfs()
    with _locked(root.with_name(root.name + ".image.lock")):
        if image_exists(client, tag):
            return tag
        repository, _, version = tag.rpartition(":")
        with tempfile.TemporaryDirectory(prefix="tether-rootfs-tar.") as tmp:
            archive = Path(tmp) / "rootfs.tar"
            subprocess.run(
                ["tar", "-C", str(root), "--exclude", "./.tether-rootfs-complete", "-cf", str(archive), "."],
                check=True,
                timeout=600,
            )
            client.api.import_image_from_file(
                str(archive), repository=repository, tag=version, changes=list(IMAGE_CHANGES)
            )
        client.images.get(tag)  # raises if the import did not produce the image
    return tag


def build_image(
    client: Any, dockerfile: str, tag: str, buildargs: dict[str, str], timeout: float = 1800
) -> tuple[str, float]:
    """``docker build -f dockerfile -t tag`` with the repository as context; (log, seconds).

    Host networking, so that pip reaches PyPI wherever the host does. Layers are cached by
    the engine: a second build with unchanged inputs takes seconds.
    """
    import docker.errors

    started = time.monotonic()
    lines: list[str] = []
    try:
        previous = client.images.get(tag).id
    except docker.errors.ImageNotFound:
        previous = None
    try:
        for chunk in client.api.build(
            path=str(REPO_ROOT),
            dockerfile=dockerfile,
            tag=tag,
            buildargs=buildargs,
            network_mode="host",
            rm=True,
            forcerm=True,
            decode=True,
            timeout=int(timeout),
        ):
            if "stream" in chunk:
                lines.append(chunk["stream"])
            if "error" in chunk:
                raise RuntimeError(f"docker build {dockerfile} failed: {chunk['error']}\n{''.join(lines)}")
    except docker.errors.APIError as exc:
        raise RuntimeError(f"docker build {dockerfile} failed: {exc}\n{''.join(lines)}") from exc
    # The image this tag named before is garbage now (its layers still shared stay).
    if previous is not None and previous != client.images.get(tag).id:
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(previous)
    return "".join(lines), time.monotonic() - started


def copy_repo(target: Path) -> Path:
    """A copy of the repository's working tree without build products, virtualenvs and .git."""
    shutil.copytree(REPO_ROOT, target, ignore=shutil.ignore_patterns(*COPY_IGNORE), symlinks=True)
    return target


def chroot_command(root: Path, argv: list[str], binds: dict[Path, str] | None = None) -> list[str]:
    """``argv`` chrooted into ``root``, with /proc and /dev, in a private mount namespace.

    The mounts (and ``binds``: host path to path in the root) exist only for this command:
    they vanish with its namespace, whatever happens. Every step execs the next, so the
    pid of the process started is the command's. Root and util-linux's unshare needed.
    """
    script = ["set -e", f'R="{root}"', 'mount -t proc proc "$R/proc"', 'mount --rbind /dev "$R/dev"']
    for host, inside in (binds or {}).items():
        script += [f'mkdir -p "$R{inside}"', f'mount --bind "{host}" "$R{inside}"']
    script.append('exec chroot "$R" "$@"')
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script), "sh", *argv]


def chroot_env() -> dict[str, str]:
    """A plain root environment (and this machine's proxy settings) for commands in a chroot."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    env.update({k: v for k, v in os.environ.items() if k.lower().endswith("_proxy")})
    return env


def chroot_run(
    root: Path,
    argv: list[str],
    binds: dict[Path, str] | None = None,
    timeout: float = 900,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``root`` (see :func:`chroot_command`) to completion, ``stdin`` as its input."""
    return subprocess.run(
        chroot_command(root, argv, binds),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=chroot_env(),
        check=False,
        input=stdin if stdin is not None else "",
    )
