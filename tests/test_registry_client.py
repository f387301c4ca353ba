"""The pure parts of the agent's image downloads: references, platforms, archives, rates."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from tether.agent.config import parse_rate
from tether.agent.registry import Blob, Platform, RateLimit, RegistryError, ResolvedImage, parse_reference
from tether.agent.staging import archive_stream


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", None),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", None),
        ("user/app:v2", "docker.io", "user/app", "v2", None),
        ("docker.io/library/redis:7", "docker.io", "library/redis", "7", None),
        ("127.0.0.1:5000/team/app:v1", "127.0.0.1:5000", "team/app", "v1", None),
        ("localhost/app", "localhost", "app", "latest", None),
        ("reg.example/a/b/c@sha256:" + "a" * 64, "reg.example", "a/b/c", None, "sha256:" + "a" * 64),
    ],
)
def test_references_are_normalised_as_docker_reads_them(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    """Docker Hub short names get library/ and latest; a dotted or ported first part is a host."""
    ref = parse_reference(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


@pytest.mark.parametrize("text", ["", "UPPER/case", "app:", "app@sha256:xyz", "a" * 600, "host:99999999/app"])
def test_malformed_references_are_a_permanent_error(text: str) -> None:
    """Not a reference: one permanent error naming it."""
    with pytest.raises(RegistryError) as info:
        parse_reference(text)
    assert not info.value.transient and "not a valid image reference" in str(info.value)


def test_platforms_match_as_docker_picks_from_an_index() -> None:
    """uname -m maps to OCI names; arm variants must agree when both sides name one."""
    arm = Platform.from_machine("armv7l")
    assert (arm.architecture, arm.variant) == ("arm", "v7")
    assert arm.matches({"os": "linux", "architecture": "arm", "variant": "v7"})
    assert not arm.matches({"os": "linux", "architecture": "arm", "variant": "v6"})
    assert Platform.from_machine("aarch64").matches({"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert not Platform.from_machine("x86_64").matches({"os": "windows", "architecture": "amd64"})


def test_archive_is_a_docker_save_tar_without_the_layers_the_engine_has(tmp_path: Path) -> None:
    """manifest.json names every layer; only the given layer files are in the archive, whole."""
    base, new = Blob("sha256:" + "1" * 64, 3), Blob("sha256:" + "2" * 64, 1500)
    (tmp_path / "new").write_bytes(b"x" * 1500)
    config = json.dumps({"rootfs": {"diff_ids": ["sha256:" + "3" * 64, "sha256:" + "4" * 64]}}).encode()
    image = ResolvedImage(
        parse_reference("reg.example/app:v2"), "sha256:" + "5" * 64, "sha256:" + "6" * 64, config, (base, new)
    )
    data = b"".join(
        archive_stream(image, "reg.example/app:v2", lambda b: tmp_path / "new" if b is new else None)
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        layer = tar.extractfile("2" * 64 + "/layer.tar").read()  # type: ignore[union-attr]
    assert names == ["manifest.json", "6" * 64 + ".json", "2" * 64 + "/layer.tar"]
    assert manifest == [
        {
            "Config": "6" * 64 + ".json",
            "RepoTags": ["reg.example/app:v2"],
            "Layers": ["1" * 64 + "/layer.tar", "2" * 64 + "/layer.tar"],
        }
    ]
    assert layer == b"x" * 1500


def test_rate_limit_paces_a_stream() -> None:
    """1000 B/s from an empty bucket: 6500 bytes take 6.5 s (on a fake clock)."""
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    limit = RateLimit(1000.0, clock=lambda: now[0])
    for _ in range(100):
        limit.take(65, sleep)  # ~6.5 KB in small pieces
    assert 6.4 <= now[0] <= 6.6


@pytest.mark.parametrize(
    ("text", "rate"), [("2mbit", 250_000.0), ("256kbit", 32_000.0), ("500KB", 500_000.0), (1000, 1000.0)]
)
def test_rates_are_read_in_bits_or_bytes(text: str | int, rate: float) -> None:
    """download_rate_limit: kbit/mbit are bits per second, KB/MB bytes, a number bytes."""
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "-1", "0", "2 parsecs"])
def test_a_bad_rate_is_refused(text: str) -> None:
    """Not a rate: refused with an example of one."""
    with pytest.raises(ValueError, match="not a rate|positive"):
        parse_rate(text)
