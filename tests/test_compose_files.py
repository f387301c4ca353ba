"""The Compose files in compose/: valid (``docker compose config``, or the structural check of
tests/support/compose_check.py where the Compose plugin is missing), and the production one
has what running Tether for real needs. Its health check commands are run for real where the
programs are installed.
"""

from __future__ import annotations

import shlex
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.compose_check import InterpolationError, check_compose, compose_command, interpolate
from support.infra import _pg_bin

COMPOSE_DIR = Path(__file__).resolve().parent.parent / "compose"
COMPOSE_FILES = sorted(COMPOSE_DIR.glob("*.yml"))
ENV = {"POSTGRES_PASSWORD": "test-password", "TETHER_MQTT_HOST": "mqtt.test"}


def load(name: str, env: dict[str, str] = ENV) -> dict[str, Any]:
    doc: dict[str, Any] = interpolate(yaml.safe_load((COMPOSE_DIR / name).read_text()), env)
    return doc


def test_the_compose_files_are_there() -> None:
    names = {p.name for p in COMPOSE_FILES}
    assert {"quickstart.yml", "production.yml", "mosquitto.yml"} <= names


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_file_structure(path: Path) -> None:
    assert check_compose(path, ENV) == []


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_docker_compose_config(path: Path) -> None:
    command = compose_command()
    if command is None:
        pytest.skip(
            "neither the Docker Compose plugin nor docker-compose is installed; "
            "test_compose_file_structure checks these files instead"
        )
    result = subprocess.run(
        [*command, "-f", str(path), "config", "--quiet"],
        capture_output=True,
        text=True,
        env={**ENV, "PATH": "/usr/local/bin:/usr/bin:/bin"},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_production_needs_a_database_password() -> None:
    """Without the variables production.yml requires, each is named."""
    (problem,) = check_compose(COMPOSE_DIR / "production.yml", {"TETHER_MQTT_HOST": "mqtt.test"})
    assert "POSTGRES_PASSWORD" in problem
    (problem,) = check_compose(COMPOSE_DIR / "production.yml", {"POSTGRES_PASSWORD": "x"})
    assert "TETHER_MQTT_HOST" in problem


def test_production_file() -> None:
    doc = load("production.yml")
    services = doc["services"]
    assert set(services) == {"controller", "postgres", "mosquitto", "broker-setup"}
    assert set(doc["volumes"]) == {"postgres-data", "mosquitto-data", "mosquitto-tether", "tether-data"}
    for name in ("controller", "postgres", "mosquitto"):
        svc = services[name]
        assert svc["restart"] in ("always", "unless-stopped"), name
        assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name

    controller = services["controller"]
    assert controller["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.controller"}
    assert (COMPOSE_DIR / ".." / "docker" / "Dockerfile.controller").is_file()
    command = controller["command"]
    assert command[:2] == ["tether", "up"]
    assert command[command.index("--broker") + 1] == "mqtts://mosquitto:8883"
    assert command[command.index("--mosquitto-dir") + 1] == "/mosquitto/tether"
    assert command[command.index("--log-format") + 1] == "json"
    http_port = command[command.index("--http") + 1].rpartition(":")[2]
    assert controller["environment"]["TETHER_DB"].startswith("postgresql://tether@postgres:5432/")
    assert controller["environment"]["PGPASSWORD"] == ENV["POSTGRES_PASSWORD"]
    assert f"http://127.0.0.1:{http_port}/readyz" in " ".join(controller["healthcheck"]["test"])
    assert controller["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "mosquitto": {"condition": "service_healthy"},
    }
    assert any(v.endswith(":/data") for v in controller["volumes"])
    # The metrics port stays on the host's loopback.
    assert all(p.startswith("127.0.0.1:") for p in controller["ports"])

    postgres = services["postgres"]
    assert postgres["healthcheck"]["test"][1] == "pg_isready"
    assert "postgres-data:/var/lib/postgresql/data" in postgres["volumes"]
    assert "ports" not in postgres
    mosquitto = services["mosquitto"]
    assert "mosquitto-data:/mosquitto/data" in mosquitto["volumes"]
    assert mosquitto["depends_on"] == {"broker-setup": {"condition": "service_completed_successfully"}}
    assert [p.rpartition(":")[2] for p in mosquitto["ports"]] == ["8883"]  # TLS only
    setup = services["broker-setup"]
    assert setup["restart"] == "no" and "tether mosquitto-config" in setup["command"][-1]
    # Anonymous access is never configured (the listener comes from tether mosquitto-config).
    assert "allow_anonymous true" not in (COMPOSE_DIR / "mosquitto.conf").read_text()


@pytest.mark.parametrize("name", ["quickstart.yml", "mosquitto.yml"])
def test_other_files_build_the_controller_image(name: str) -> None:
    controller = load(name)["services"]["controller"]
    assert controller["build"]["dockerfile"] == "docker/Dockerfile.controller"


def test_postgres_healthcheck_runs(postgres_server: Any) -> None:
    """The production PostgreSQL health check against a real server (its address added)."""
    argv = load("production.yml")["services"]["postgres"]["healthcheck"]["test"][1:]
    binary = _pg_bin(argv[0])
    assert binary is not None
    result = subprocess.run(
        [binary, *argv[1:], "--host", "127.0.0.1", "--port", str(postgres_server.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, f"{shlex.join(argv)}: {result.stdout}{result.stderr}"


# --- the checker itself ---------------------------------------------------------------------

VALID = """
    name: demo
    services:
      db:
        image: postgres:16
        volumes: ["db-data:/var/lib/postgresql/data"]
        healthcheck:
          test: ["CMD", "pg_isready"]
          interval: 10s
      app:
        image: example/app:1
        depends_on:
          db: {condition: service_healthy}
        networks: [back]
        restart: unless-stopped
        ports: ["127.0.0.1:8080:80", "9000", "127.0.0.1::81/udp"]
    networks:
      back:
    volumes:
      db-data:
"""


def check_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    path = tmp_path / "compose.yml"
    path.write_text(textwrap.dedent(text))
    return check_compose(path, env)


def test_checker_accepts_a_valid_file(tmp_path: Path) -> None:
    assert check_text(tmp_path, VALID) == []


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("image: example/app:1", "labels: {a: b}", "needs an image or a build"),
        ('"db-data:/var', '"other:/var', "named volume 'other' is not declared"),
        ("networks: [back]", "networks: [front]", "network 'front' is not declared"),
        ('test: ["CMD", "pg_isready"]', 'test: ["pg_isready"]', "must start with CMD"),
        ('test: ["CMD", "pg_isready"]', 'test: ["CMD"]', "without a command"),
        ("interval: 10s", "interval: 10", "is not a duration"),
        ("db: {condition: service_healthy}", "cache: {condition: service_started}", "unknown service"),
        ("db: {condition: service_healthy}", "db: {condition: healthy}", "unknown condition"),
        ("restart: unless-stopped", "restart: sometimes", "restart 'sometimes'"),
        ("restart: unless-stopped", "restrat: always", "unknown key 'restrat'"),
        ('"127.0.0.1:8080:80"', '"localhost:8080:80"', "is not [IP:][HOST:]CONTAINER"),
        ("image: example/app:1", "build: {context: ., dockerfile: Nope}", "Dockerfile"),
        ("image: example/app:1", "build: ./missing", "is not a directory"),
    ],
)
def test_checker_finds_mistakes(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in VALID
    problems = check_text(tmp_path, VALID.replace(old, new, 1))
    assert any(expected in p for p in problems), problems


def test_checker_service_healthy_needs_a_healthcheck(tmp_path: Path) -> None:
    text = VALID.replace('test: ["CMD", "pg_isready"]', "disable: true")
    assert any("has no healthcheck" in p for p in check_text(tmp_path, text))


def test_checker_bind_mount_sources(tmp_path: Path) -> None:
    text = VALID.replace('"db-data:/var/lib/postgresql/data"', '"./conf.d:/etc/conf.d:ro"')
    text = text.replace("volumes:\n      db-data:\n", "")
    assert any("conf.d" in p and "missing" in p for p in check_text(tmp_path, text))
    (tmp_path / "conf.d").mkdir()
    assert check_text(tmp_path, text) == []


def test_interpolation() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("$SET ${SET} $$SET", env) == "x x $SET"
    assert interpolate("${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d}", env) == "d d  d"
    assert interpolate("${SET:+alt} ${EMPTY:+alt} ${EMPTY+alt}|", env) == "alt  alt|"
    assert interpolate({"k": ["${SET}", 3]}, env) == {"k": ["x", 3]}
    assert interpolate("${UNSET:-${SET}}", env) == "x"
    with pytest.raises(InterpolationError, match="UNSET is missing: tell me"):
        interpolate("${UNSET:?tell me}", env)
    with pytest.raises(InterpolationError):
        interpolate("${EMPTY:?}", env)
    assert interpolate("${EMPTY?}", env) == ""


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_no_top_level_name(path: Path) -> None:
    """No top-level `name:`: Debian 12's docker-compose 1.29 refuses it (the project name is -p)."""
    assert "name" not in yaml.safe_load(path.read_text())
