"""Compose files to StackSpec: every supported key, and a clear error for everything else."""

from __future__ import annotations

import textwrap

import pytest
from tether.controller.compose import parse_compose
from tether.protocol.errors import ComposeError
from tether.protocol.models import HealthcheckSpec, PortSpec, StackSpec, VolumeSpec


def parse(text: str) -> StackSpec:
    return parse_compose(textwrap.dedent(text))


def rejects(text: str, *fragments: str) -> str:
    """Assert parse_compose raises ComposeError whose message contains every fragment."""
    with pytest.raises(ComposeError) as info:
        parse(text)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


FULL = """
    name: shop
    version: "3.8"
    services:
      web:
        image: registry.example/web:1.2
        command: serve --port "8080" --verbose
        entrypoint: ["/bin/tini", "--"]
        environment:
          - MODE=prod
          - EMPTY=
          - WITH_EQUALS=a=b
        ports:
          - "8080:80"
          - 9000
          - "127.0.0.1:8443:443"
          - "127.0.0.1::9100"
          - "5353:53/udp"
          - target: 7000
            published: "7001"
            host_ip: 0.0.0.0
            protocol: udp
          - target: 7002
        volumes:
          - /srv/config:/etc/web:ro
          - data:/var/lib/web
          - type: bind
            source: /dev/shm
            target: /shm
            read_only: true
          - type: volume
            source: cache
            target: /cache
        restart: no
        network_mode: bridge
        labels:
          team: shop
          tier: "1"
        healthcheck:
          test: ["CMD", "wget", "-q", "-O-", "http://localhost/"]
          interval: 1m30s
          timeout: 500ms
          retries: 5
          start_period: 10s
        depends_on:
          - db
        stop_grace_period: 1m
      db:
        image: postgres:16
        command: ["postgres", "-c", 42]
        environment:
          POSTGRES_DB: shop
          PORT: 5432
          DEBUG: false
        restart: unless-stopped
        labels: ["role=db"]
        healthcheck:
          test: pg_isready
        stop_grace_period: 45
      agent:
        image: monitor:3
        network_mode: host
        restart: on-failure
        depends_on:
          db:
            condition: service_started
      cron:
        image: cron:1
        restart: always
        healthcheck:
          disable: true
    volumes:
      data:
      cache: {}
"""


@pytest.fixture(scope="module")
def full() -> StackSpec:
    return parse(FULL)


def test_every_supported_key_is_parsed(full: StackSpec) -> None:
    """A file using every supported key parses to the expected normalised service specs."""
    web, db, agent, cron = (full.service(n) for n in ("web", "db", "agent", "cron"))
    assert web is not None and db is not None and agent is not None and cron is not None
    assert web.image == "registry.example/web:1.2"
    assert web.command == ("serve", "--port", "8080", "--verbose")
    assert web.entrypoint == ("/bin/tini", "--")
    assert web.environment == {"MODE": "prod", "EMPTY": "", "WITH_EQUALS": "a=b"}
    assert web.restart == "no"
    assert web.network_mode == "bridge"
    assert web.labels == {"team": "shop", "tier": "1"}
    assert web.depends_on == ("db",)
    assert web.stop_grace_period_s == 60.0
    assert db.command == ("postgres", "-c", "42")
    assert db.environment == {"POSTGRES_DB": "shop", "PORT": "5432", "DEBUG": "false"}
    assert db.restart == "unless-stopped"
    assert db.labels == {"role": "db"}
    assert db.stop_grace_period_s == 45.0
    assert agent.network_mode == "host"
    assert agent.restart == "on-failure"
    assert agent.depends_on == ("db",)
    assert cron.restart == "always"
    assert cron.healthcheck == HealthcheckSpec(test=("NONE",))  # the image's HEALTHCHECK is off
    assert full.volumes == ("cache", "data")


def test_ports_in_short_and_long_form(full: StackSpec) -> None:
    """Short ports (host:container, bare, ip:host:container, ip::container, /udp) and long ports."""
    web = full.service("web")
    assert web is not None
    assert web.ports == (
        PortSpec(container=80, host=8080),
        PortSpec(container=9000),
        PortSpec(container=443, host=8443, host_ip="127.0.0.1"),
        PortSpec(container=9100, host_ip="127.0.0.1"),
        PortSpec(container=53, host=5353, protocol="udp"),
        PortSpec(container=7000, host=7001, host_ip="0.0.0.0", protocol="udp"),
        PortSpec(container=7002),
    )


def test_volumes_bind_and_named(full: StackSpec) -> None:
    """Absolute bind mounts and declared named volumes, short and long form, with read-only."""
    web = full.service("web")
    assert web is not None
    assert web.volumes == (
        VolumeSpec(type="bind", source="/srv/config", target="/etc/web", read_only=True),
        VolumeSpec(type="volume", source="data", target="/var/lib/web"),
        VolumeSpec(type="bind", source="/dev/shm", target="/shm", read_only=True),
        VolumeSpec(type="volume", source="cache", target="/cache"),
    )


def test_healthcheck_durations(full: StackSpec) -> None:
    """Healthcheck durations become seconds; a string test becomes CMD-SHELL with defaults."""
    web, db = full.service("web"), full.service("db")
    assert web is not None and db is not None
    assert web.healthcheck == HealthcheckSpec(
        test=("CMD", "wget", "-q", "-O-", "http://localhost/"),
        interval_s=90.0,
        timeout_s=0.5,
        retries=5,
        start_period_s=10.0,
    )
    assert db.healthcheck == HealthcheckSpec(test=("CMD-SHELL", "pg_isready"))


@pytest.mark.parametrize("restart", ["no", '"no"', "'no'"])
def test_restart_no_bare_or_quoted(restart: str) -> None:
    """restart: no (YAML 1.1 reads a bare no as false) and "no" both mean no restarts."""
    spec = parse(f"services:\n  a:\n    image: x\n    restart: {restart}\n")
    assert spec.services[0].restart == "no"


def test_services_are_ordered_by_depends_on(full: StackSpec) -> None:
    """Dependencies come before their dependents; otherwise file order is kept."""
    assert [s.name for s in full.services] == ["db", "web", "agent", "cron"]
    chain = parse("""
        services:
          web: {image: w, depends_on: [api]}
          api: {image: a, depends_on: {db: {condition: service_started}, cache: {}}}
          cache: {image: c}
          db: {image: d}
    """)
    assert [s.name for s in chain.services] == ["db", "cache", "api", "web"]


def test_same_content_same_hash_and_changed_command_another() -> None:
    """Identical files give the same spec hash (whatever the formatting); a changed command does not."""
    one = parse("services:\n  a:\n    image: x\n    command: run --fast\n")
    same = parse('services:\n  a: {image: x, command: ["run", "--fast"]}\n')
    other = parse("services:\n  a:\n    image: x\n    command: run --slow\n")
    assert one == same
    assert one.spec_hash() == same.spec_hash()
    assert one.spec_hash() != other.spec_hash()
    assert one.services[0].spec_hash() != other.services[0].spec_hash()


@pytest.mark.parametrize(
    ("key", "value", "fragments"),
    [
        ("blkio_config", "{weight: 300}", ("'web'", "blkio_config", "not supported")),
        ("cpu_count", "2", ("'web'", "cpu_count", "Windows only")),
        ("env_file", ".env", ("'web'", "env_file", "environment")),
        ("volumes_from", "[db]", ("'web'", "volumes_from", "named volume")),
        ("bogus", "1", ("'web'", "additional property 'bogus' not allowed")),
    ],
)
def test_unsupported_service_keys_are_rejected(key: str, value: str, fragments: tuple[str, ...]) -> None:
    """A service key Tether does not support is an error naming the service and the key."""
    rejects(f"services:\n  web:\n    image: x\n    {key}: {value}\n", *fragments)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            "services: {a: {image: x}}\nnetworks: {front: {external: true, driver: x}}\n",
            ("'front'", "external"),
        ),
        ("services: {a: {image: x}}\nsecrets: {s: {external: true}}\n", ("secret 's'", "external")),
        ("services: {a: {image: x}}\nvolumes: {data: {drivr: nfs}}\n", ("'data'", "'drivr' not allowed")),
        ("services: {web: {build: .}}\n", ("'web'", "build without image", "prebuilt")),
        ("services: {web: {image: x, volumes: ['data:/data']}}\n", ("'web'", "'data'", "not declared")),
        ("services: {web: {image: x, volumes: ['../data:/data']}}\n", ("'web'", "'../data'", "outside")),
        ("services: {web: {image: x, volumes: ['~/data:/data']}}\n", ("'web'", "'~/data'", "tether CLI")),
        ("services: {web: {image: x, volumes: ['/data:rel']}}\n", ("'web'", "volume option 'rel'")),
        ("services: {web: {image: x, volumes: ['/a:/b:ro', '/c:/b/']}}\n", ("'web'", "same target '/b'")),
        ("services: {web: {image: x, depends_on: [db]}}\n", ("'web'", "unknown service 'db'")),
        ("services: {web: {image: x, depends_on: [web]}}\n", ("'web'", "itself")),
        (
            "services: {a: {image: x, depends_on: [b]}, b: {image: x, depends_on: [c]}, "
            "c: {image: x, depends_on: [a]}}\n",
            ("cycle", "a -> b -> c -> a"),
        ),
        (
            "services: {web: {image: x, depends_on: {db: {condition: service_ready}}}, db: {image: y}}\n",
            ("'web'", "service_healthy", "service_ready"),
        ),
        ("services: {web: {image: x, stop_grace_period: 10x}}\n", ("'web'", "stop_grace_period", "10x")),
        ("services: {web: {image: x, stop_grace_period: -1}}\n", ("'web'", "negative")),
        ("services: {web: {image: x, healthcheck: {test: t, interval: soon}}}\n", ("'web'", "interval")),
        ("services: {web: {image: x, ports: ['http:80']}}\n", ("'web'", "ports", "http:80")),
        ("services: {web: {image: x, ports: ['70000:80']}}\n", ("'web'", "ports", "70000:80")),
        ("services: {web: {image: x, ports: ['8000-8010:80']}}\n", ("'web'", "range must be as long")),
        ("services: {web: {image: x, ports: [{published: 80}]}}\n", ("'web'", "invalid port")),
        (
            "services: {web: {image: x, network_mode: none, ports: ['80:80']}}\n",
            ("'web'", "network_mode: none"),
        ),
        ("services: {web: {image: x, network_mode: 'container:db'}}\n", ("'web'", "network_mode")),
        ("services: {web: {image: x, restart: sometimes}}\n", ("'web'", "restart", "sometimes")),
        ("services: {web: {image: x, environment: [NOVALUE]}}\n", ("'web'", "environment", "NOVALUE")),
        ("services: {web: {image: x, labels: {io.tether.stack: evil}}}\n", ("'web'", "'io.tether.stack'")),
        ("services: {web: {command: [sleep, 1], image: ''}}\n", ("'web'", "image")),
        ("services: {web: {restart: always}}\n", ("'web'", "image", "command")),
        ("services: {Web: {image: x}}\n", ("'Web'", "invalid service name")),
        ("services: {}\n", ("no services",)),
        ("services: [\n", ("not valid YAML", "line")),
        ("", ("must be a map",)),
        ("- just\n- a list\n", ("must be a map",)),
        ("just a string\n", ("must be a map",)),
    ],
)
def test_invalid_files_are_rejected_with_a_message_naming_the_problem(
    text: str, fragments: tuple[str, ...]
) -> None:
    """Each invalid file raises ComposeError naming the service and key (or file-level problem)."""
    rejects(text, *fragments)


def test_oversize_file_is_rejected() -> None:
    """A compose file larger than 256 KiB is refused before YAML parsing."""
    rejects("services: {a: {image: x}}\n" + "#" * (256 * 1024), "larger than")


def _alias_bomb(levels: int, key: str) -> str:
    """A billion laughs under a service key: each level is nine aliases of the one below."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    body = "\n".join("      " + line for line in lines)
    return f"services:\n  web:\n    image: busybox\n    {key}:\n{body}\n"


@pytest.mark.parametrize("key", ["labels", "environment", "x-unknown"])
def test_alias_bomb_is_refused_before_it_is_expanded(key: str) -> None:
    """A few hundred bytes of nested anchors are refused at once (not walked for seconds)."""
    import time

    text = _alias_bomb(8, key)  # 9**8 = 43 million nodes once expanded
    assert len(text) < 600
    started = time.monotonic()
    rejects(text, "expands to more than")
    assert time.monotonic() - started < 1.0


def test_self_referring_alias_and_deep_nesting_are_one_clear_error() -> None:
    """A recursive alias and a document nested past Python's stack are ComposeErrors, not crashes."""
    rejects("services:\n  a: &a\n    image: x\n    labels: [*a]\n", "refers to itself")
    rejects("services: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply")


def test_small_anchors_and_merge_keys_still_work() -> None:
    """Ordinary anchors, aliases and << merge keys parse as before."""
    spec = parse_compose(
        textwrap.dedent(
            """
            services:
              a:
                image: busybox
                environment: &env {MODE: prod, LEVEL: "3"}
              b:
                image: busybox
                environment:
                  <<: *env
                  EXTRA: "1"
            """
        )
    )
    env = {s.name: dict(s.environment) for s in spec.services}
    assert env["a"] == {"MODE": "prod", "LEVEL": "3"}
    assert env["b"] == {"MODE": "prod", "LEVEL": "3", "EXTRA": "1"}
