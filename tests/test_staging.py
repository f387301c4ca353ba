"""The agent's image stager against a real registry (Debian's docker-registry) and Docker engine."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.images import skip_or_fail
from support.infra import wait_until
from support.linkproxy import LinkProxy
from support.registry import Registry, layer_size, push_image, registry_available
from support.tokenauth import TokenServer
from tether.agent.drivers.docker import DockerDriver
from tether.agent.staging import ImageStager

pytestmark = [pytest.mark.docker]

MB = 1_000_000


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reason = registry_available()
    if reason:
        skip_or_fail(reason)
    with Registry(tmp_path / "registry") as reg:
        yield reg


@pytest.fixture
def engine(docker_engine: Any, busybox_image: str) -> Iterator[DockerDriver]:
    driver = DockerDriver(f"stage-{uuid.uuid4().hex[:6]}")
    yield driver
    with contextlib.suppress(Exception):  # its containers, then its stacks' networks
        for instance in driver.observe():
            driver.remove(instance, 0)
        driver.prune(set())
    driver.close()


@pytest.fixture
def pushed(docker_engine: Any) -> Iterator[list[str]]:
    """References pushed by the test: removed from the engine afterwards."""
    refs: list[str] = []
    yield refs
    for ref in refs:
        with contextlib.suppress(Exception):
            docker_engine.images.remove(ref, force=True)


def _stager(root: Path, engine: DockerDriver, **kwargs: Any) -> ImageStager:
    return ImageStager(root, engine, **kwargs).start()


def _name() -> str:
    return f"t{uuid.uuid4().hex[:8]}/app:v1"


def test_image_is_fetched_loaded_and_only_its_new_layer_crosses_the_wire(
    registry: Registry, engine: DockerDriver, docker_engine: Any, pushed: list[str], tmp_path: Path
) -> None:
    """An image whose base layer the engine has: only the new layer is fetched, then it runs."""
    name = _name()
    ref = push_image(docker_engine, registry.host, name, 2 * MB)
    pushed.append(ref)
    assert engine.image_id(ref) is None
    stager = _stager(tmp_path / "images", engine)
    try:
        stager.want({ref}, {})
        wait_until(lambda: stager.present(ref), 60, message="image staged")
        size = layer_size(registry.host, name)
        assert size <= stager.bytes_fetched <= size * 1.05
        assert engine.image_id(ref) == next(iter(stager.loaded()))
        out = docker_engine.containers.run(ref, ["ls", "-l", "/blob"], remove=True)
        assert b"2000000" in out
        assert list((tmp_path / "images" / "blobs").iterdir()) == []  # the engine holds it now
    finally:
        stager.close()


def test_download_resumes_after_an_agent_restart(
    registry: Registry, engine: DockerDriver, docker_engine: Any, pushed: list[str], tmp_path: Path
) -> None:
    """A stager stopped mid-layer, then a new one on the same directory: the rest only is fetched."""
    name = _name()
    ref = push_image(docker_engine, registry.host, name, 4 * MB)
    pushed.append(ref)
    size = layer_size(registry.host, name)
    first = _stager(tmp_path / "images", engine, rate_limit=1.5 * MB)
    first.want({ref}, {})
    wait_until(lambda: first.bytes_fetched > size * 0.4, 30, message="40% fetched")
    first.close()
    assert not first.present(ref)
    partial = first.bytes_fetched
    second = _stager(tmp_path / "images", engine)
    try:
        second.want({ref}, {})
        wait_until(lambda: second.present(ref), 60, message="image staged after the restart")
        assert second.bytes_fetched < size - partial * 0.9  # resumed, not started over
        assert size <= partial + second.bytes_fetched <= size * 1.05
    finally:
        second.close()


def test_a_cut_is_retried_and_resumed(
    registry: Registry, engine: DockerDriver, docker_engine: Any, pushed: list[str], tmp_path: Path
) -> None:
    """The link drops mid-layer: retrying with the reason, then resumed where it stopped."""
    name = _name()
    push_image(docker_engine, registry.host, name, 4 * MB)
    size = layer_size(registry.host, name)
    with LinkProxy(("127.0.0.1", registry.port), rate=1.5 * MB) as link:
        ref = f"127.0.0.1:{link.port}/{name}"
        pushed.append(ref)
        stager = _stager(tmp_path / "images", engine)
        try:
            stager.want({ref}, {})
            wait_until(lambda: stager.bytes_fetched > size * 0.3, 30, message="30% fetched")
            link.cut()
            status = wait_until(
                lambda: (s := stager.status()[ref]).state == "retrying" and s, 30, message="retrying"
            )
            assert status.reason and "connection" in status.reason
            assert not stager.present(ref)
            link.heal()
            wait_until(lambda: stager.present(ref), 120, message="image staged after the cut")
            assert size <= stager.bytes_fetched <= size * 1.05
            assert link.down_bytes <= size * 1.05 + 64 * 1024  # manifests and config: a few KB
        finally:
            stager.close()


def test_unknown_image_fails_at_once_with_the_registrys_reason(
    registry: Registry, engine: DockerDriver, tmp_path: Path
) -> None:
    """A tag the registry does not have is a permanent error, in the registry's words."""
    ref = f"{registry.host}/nope/app:v9"
    stager = _stager(tmp_path / "images", engine)
    try:
        stager.want({ref}, {})
        status = wait_until(lambda: (s := stager.status()[ref]).state == "failed" and s, 30)
        assert "manifest unknown" in (status.reason or "")
        assert ref in (status.reason or "")
    finally:
        stager.close()


def test_unreachable_registry_is_transient(engine: DockerDriver, tmp_path: Path) -> None:
    """Nothing listening where the registry should be: retrying (connection refused), not failed."""
    from support.infra import free_port

    ref = f"127.0.0.1:{free_port()}/gone/app:v1"
    stager = _stager(tmp_path / "images", engine)
    try:
        stager.want({ref}, {})
        status = wait_until(lambda: (s := stager.status()[ref]).state == "retrying" and s, 30)
        assert status.reason is not None and "connection refused" in status.reason
    finally:
        stager.close()


def test_credentials_open_a_private_registry_and_wrong_ones_fail_clearly(
    engine: DockerDriver, docker_engine: Any, pushed: list[str], tmp_path: Path
) -> None:
    """htpasswd registry: no or wrong credentials fail as unauthorized; the right ones fetch the image."""
    reason = registry_available()
    if reason:
        skip_or_fail(reason)
    with Registry(tmp_path / "registry", htpasswd={"edge": "s3cret"}) as reg:
        name = _name()
        ref = push_image(docker_engine, reg.host, name, MB, auth=("edge", "s3cret"))
        pushed.append(ref)
        stager = _stager(tmp_path / "images", engine)
        try:
            stager.want({ref}, {})
            status = wait_until(lambda: (s := stager.status()[ref]).state == "failed" and s, 30)
            assert "unauthorized" in (status.reason or "") and "tether registries add" in (
                status.reason or ""
            )
            stager.want({ref}, {reg.host: ("edge", "wrong")})
            status = wait_until(
                lambda: (
                    (s := stager.status()[ref]).state == "failed"
                    and "tether registries add" not in (s.reason or "")
                    and s
                ),
                30,
                message="failed with the wrong credentials",
            )
            assert "unauthorized" in (status.reason or "")
            stager.want({ref}, {reg.host: ("edge", "s3cret")})
            wait_until(lambda: stager.present(ref), 60, message="image staged with credentials")
        finally:
            stager.close()


def test_not_enough_disk_refuses_before_downloading(
    registry: Registry, engine: DockerDriver, docker_engine: Any, pushed: list[str], tmp_path: Path
) -> None:
    """A content store on a 4 MB file system and an 8 MB layer: refused with the numbers, nothing written."""
    name = _name()
    ref = push_image(docker_engine, registry.host, name, 8 * MB)
    pushed.append(ref)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        stager = _stager(small / "images", engine, reserve=0)
        try:
            stager.want({ref}, {})
            status = wait_until(lambda: (s := stager.status()[ref]).state == "failed" and s, 30)
            assert "not enough disk space" in (status.reason or "")
            assert str(small / "images") in (status.reason or "")
            assert stager.bytes_fetched == 0
            assert list((small / "images" / "partial").iterdir()) == []
        finally:
            stager.close()
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_prune_removes_only_what_the_stager_loaded_and_keeps_what_is_asked(
    registry: Registry,
    engine: DockerDriver,
    docker_engine: Any,
    pushed: list[str],
    tmp_path: Path,
    busybox_image: str,
) -> None:
    """Of two loaded images the one not kept is removed; the kept one and images it did not load stay."""
    old = push_image(docker_engine, registry.host, _name(), MB // 2)
    new = push_image(docker_engine, registry.host, _name(), MB // 2)
    pushed += [old, new]
    stager = _stager(tmp_path / "images", engine)
    try:
        stager.want({old, new, busybox_image}, {})
        wait_until(lambda: all(stager.present(r) for r in (old, new, busybox_image)), 60)
        assert set(stager.loaded().values()) == {old, new}  # busybox was already there
        stager.prune({new})
        wait_until(lambda: engine.image_id(old) is None, 30, message="old image removed")
        assert engine.image_id(new) is not None
        assert engine.image_id(busybox_image) is not None
        assert set(stager.loaded().values()) == {new}
    finally:
        stager.close()


def test_token_authentication_as_docker_hub_does_it(
    engine: DockerDriver, docker_engine: Any, pushed: list[str], tmp_path: Path
) -> None:
    """A registry with token auth (Bearer challenge, a token server asked with basic auth):
    without credentials the token is refused, a permanent unauthorized; with them, fetched."""
    reason = registry_available()
    if reason:
        skip_or_fail(reason)
    storage = tmp_path / "storage"
    name = _name()
    with Registry(tmp_path / "open", storage=storage) as open_registry:
        pushed.append(push_image(docker_engine, open_registry.host, name, MB // 2))
    with (
        TokenServer(tmp_path / "tokens", {"edge": "s3cret"}) as tokens,
        Registry(tmp_path / "token", storage=storage, auth=tokens.config()) as registry,
    ):
        ref = f"{registry.host}/{name}"
        pushed.append(ref)
        stager = _stager(tmp_path / "images", engine)
        try:
            stager.want({ref}, {})
            status = wait_until(lambda: (s := stager.status()[ref]).state == "failed" and s, 30)
            assert "unauthorized" in (status.reason or "") and tokens.refused >= 1
            stager.want({ref}, {registry.host: ("edge", "s3cret")})
            wait_until(lambda: stager.present(ref), 60, message="image staged with a token")
            assert tokens.issued >= 1
        finally:
            stager.close()


def _manifest_digest(host: str, name: str) -> str:
    import urllib.request

    repo, _, tag = name.rpartition(":")
    req = urllib.request.Request(
        f"http://{host}/v2/{repo}/manifests/{tag}",
        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        method="HEAD",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.headers["Docker-Content-Digest"])


def test_digest_pinned_and_job_images_go_through_the_resumable_path(
    registry: Registry, engine: DockerDriver, docker_engine: Any, pushed: list[str], tmp_path: Path
) -> None:
    """An image@sha256 reference is fetched by the stager (resumed after a restart, not pulled
    by the engine), loaded under its pinned name, and runs as a service and as a job."""
    from tether.agent.registry import engine_name, parse_reference
    from tether.protocol.models import JobSpec, ServiceSpec, StackSpec

    name = _name()
    push_image(docker_engine, registry.host, name, 3 * MB)
    size = layer_size(registry.host, name)
    ref = f"{registry.host}/{name.rpartition(':')[0]}@{_manifest_digest(registry.host, name)}"
    local = engine_name(parse_reference(ref))
    pushed += [ref, local]
    first = _stager(tmp_path / "images", engine, rate_limit=1.5 * MB)
    first.want({ref}, {})
    wait_until(lambda: first.bytes_fetched > size * 0.3, 30, message="30% fetched")
    first.close()
    assert not first.present(ref) and engine.image_id(ref) is None
    second = _stager(tmp_path / "images", engine)
    try:
        second.want({ref}, {})
        wait_until(lambda: second.present(ref), 60, message="pinned image staged")
        assert size <= first.bytes_fetched + second.bytes_fetched <= size * 1.05, "resumed, once"
        assert engine.image_id(ref) == engine.image_id(local) == next(iter(second.loaded()))
        assert second.loaded()[engine.image_id(local) or ""] == local
        exit_code, output, _ = engine.run_job(JobSpec(name="size", image=ref, command=("ls", "-l", "/blob")))
        assert exit_code == 0 and "3000000" in output
        svc = ServiceSpec(name="app", image=ref, command=("sleep", "300"))
        engine.create("pinned", StackSpec(services=(svc,)), svc)
        running = wait_until(lambda: [i for i in engine.observe() if i.state == "running"], 30)
        assert [i.spec_hash for i in running] == [svc.spec_hash()]
        second.close()
        second._do_prune(frozenset({ref}))  # on this thread, the stager's is stopped: kept by its pin
        assert engine.image_id(ref) is not None and second.loaded()
    finally:
        second.close()
        for inst in engine.observe():
            engine.remove(inst, 0)
