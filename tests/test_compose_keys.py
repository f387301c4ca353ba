"""Compose keys beyond the first thirteen (issue 14): every key a device honours, all problems
at once, structural errors worded like Compose's, the same meaning as ``docker compose``, and
stable hashes for files accepted before."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from jsonschema import Draft7Validator
from tether.controller.compose import parse_compose, parse_stack_warnings
from tether.controller.compose_schema import SCHEMA
from tether.protocol.errors import ComposeError
from tether.protocol.models import (
    Dependency,
    DeviceMapping,
    GpuRequest,
    HealthcheckSpec,
    LoggingSpec,
    NetworkAttachment,
    PortSpec,
    StackSpec,
    Ulimit,
    VolumeSpec,
)

ROOT = Path(__file__).resolve().parent.parent
FILES = Path(__file__).resolve().parent / "compose_files"


def parse(text: str) -> StackSpec:
    return parse_compose(textwrap.dedent(text))


def problems(text: str) -> list[str]:
    with pytest.raises(ComposeError) as info:
        parse(text)
    return info.value.problems


def test_the_compose_schema_is_a_valid_draft7_schema() -> None:
    """The structure checked (controller/compose_schema.SCHEMA) is a valid JSON Schema: the
    controller no longer checks it at run time."""
    Draft7Validator.check_schema(SCHEMA)
    broken = {**SCHEMA, "properties": {**SCHEMA["properties"], "services": {"type": "no such type"}}}
    with pytest.raises(Exception, match="no such type"):
        Draft7Validator.check_schema(broken)


@pytest.fixture(scope="module")
def every() -> tuple[StackSpec, list[str]]:
    spec, _placement, warnings = parse_stack_warnings((FILES / "every-key.yml").read_text())
    return spec, warnings


def test_every_key_file_parses(every: tuple[StackSpec, list[str]]) -> None:
    """The every-key file becomes the expected fields, dependencies first."""
    spec, warnings = every
    assert [s.name for s in spec.services] == ["db", "init-job", "cache", "app"]
    app = spec.service("app")
    assert app is not None
    assert (app.container_name, app.hostname, app.domainname) == ("app-main", "app-host", "example.internal")
    assert (app.user, app.working_dir) == ("1000:1000", "/tmp")
    assert app.networks == {
        "front": NetworkAttachment(aliases=("app-alias",), ipv4_address="10.213.5.10"),
        "back": NetworkAttachment(),
    }
    assert app.expose == ("8000/tcp", "8001/udp")
    assert (app.read_only, app.privileged, app.init, app.tty, app.stdin_open) == (
        True,
        False,
        True,
        True,
        True,
    )
    assert (app.cap_add, app.cap_drop) == (("NET_ADMIN", "SYS_TIME"), ("MKNOD",))
    assert app.security_opt == ("no-new-privileges:true",)
    assert app.devices == (DeviceMapping(source="/dev/null", target="/dev/app-null", permissions="rw"),)
    assert app.device_cgroup_rules == ("c 1:3 rmw",)
    assert app.group_add == ("20", "2000")
    assert (app.dns, app.dns_search, app.dns_opt) == (("9.9.9.9",), ("example.internal",), ("ndots:2",))
    assert app.extra_hosts == ("gateway:10.0.0.1", "other:10.0.0.2")
    assert app.sysctls == {"net.ipv4.tcp_keepalive_time": "600"}
    assert app.tmpfs == {"/run": "", "/var/run/app": "size=8m,mode=1770"}
    assert (app.shm_size, app.mem_limit, app.mem_reservation, app.memswap_limit) == (
        64 << 20,
        256 << 20,
        64 << 20,
        512 << 20,
    )
    assert (app.cpus, app.cpu_shares, app.pids_limit, app.oom_score_adj) == (0.5, 512, 200, 100)
    assert app.ulimits == (
        Ulimit(name="nofile", soft=1024, hard=2048),
        Ulimit(name="nproc", soft=512, hard=512),
    )
    assert app.logging == LoggingSpec(driver="json-file", options={"max-size": "1m", "max-file": "2"})
    assert (app.stop_signal, app.stop_grace_period_s, app.ipc) == ("SIGINT", 5.0, "shareable")
    assert app.links == {"db": "database"}
    assert app.dependencies == {
        "db": Dependency(condition="service_healthy", restart=True),
        "init-job": Dependency(condition="service_completed_successfully"),
    }
    assert app.depends_on == ("db", "init-job", "cache")
    assert (app.restart, app.restart_max_attempts) == ("on-failure", 3)
    assert [(m.source, m.target) for m in app.configs] == [
        ("app.conf", "/app.conf"),
        ("secret.token", "/run/secrets/token"),
    ]
    assert spec.configs == {"app.conf": "listen 80\n", "secret.token": "s3cret\n"}
    assert spec.networks["front"].ipam_config[0].subnet == "10.213.5.0/24"
    assert spec.networks["back"].internal is True
    assert spec.volume_options["data"].labels == {"purpose": "data"}
    cache, db, job = spec.service("cache"), spec.service("db"), spec.service("init-job")
    assert cache is not None and db is not None and job is not None
    assert (cache.network_mode, cache.pid, cache.platform) == ("service:db", "service:db", "linux/amd64")
    assert (db.cpus, db.mem_limit) == (0.25, 128 << 20)
    assert job.network_mode == "none"
    assert warnings == [
        "service 'app': build is ignored: devices run the prebuilt image 'busybox:latest' (build and push it first)"
    ]


def test_ports_keep_every_binding_and_expand_ranges(every: tuple[StackSpec, list[str]]) -> None:
    """Two bindings of one container port stay two; a range becomes one binding per port."""
    app = every[0].service("app")
    assert app is not None
    assert app.ports == (
        PortSpec(container=80, host=18080),
        PortSpec(container=80, host=18081),
        PortSpec(container=9000, host=19000, host_ip="127.0.0.1", protocol="udp"),
        PortSpec(container=9001, host=19001, host_ip="127.0.0.1", protocol="udp"),
        PortSpec(container=7000, host=17000),
    )


def test_volumes_in_every_form(every: tuple[StackSpec, list[str]]) -> None:
    """One source at several targets, anonymous volumes, bind/volume/tmpfs options."""
    app = every[0].service("app")
    assert app is not None
    assert app.volumes == (
        VolumeSpec(type="volume", source="data", target="/data"),
        VolumeSpec(type="bind", source="/srv/shared", target="/a", read_only=True),
        VolumeSpec(type="bind", source="/srv/shared", target="/b"),
        VolumeSpec(type="volume", source="", target="/cache"),
        VolumeSpec(type="bind", source="/srv/conf", target="/conf", read_only=True, propagation="rprivate"),
        VolumeSpec(type="volume", source="data", target="/data-nocopy", nocopy=True),
        VolumeSpec(type="tmpfs", source="", target="/scratch", tmpfs_size=16 << 20, tmpfs_mode=0o1777),
    )


def test_healthcheck_disable_none_and_timings_only(every: tuple[StackSpec, list[str]]) -> None:
    """disable: true and test: [NONE] turn the image's check off; timings alone keep its test."""
    spec = every[0]
    assert spec.service("init-job").healthcheck == HealthcheckSpec(test=("NONE",))  # type: ignore[union-attr]
    assert spec.service("cache").healthcheck == HealthcheckSpec(test=("NONE",))  # type: ignore[union-attr]
    assert spec.service("db").healthcheck == HealthcheckSpec(test=(), interval_s=1.0)  # type: ignore[union-attr]


def test_gpus_and_device_reservations() -> None:
    """gpus: all and deploy.resources.reservations.devices become device requests."""
    spec = parse("""
        services:
          a: {image: x, gpus: all}
          b:
            image: x
            deploy:
              resources:
                reservations:
                  devices: [{driver: nvidia, count: 1, capabilities: [gpu, utility]}]
    """)
    assert spec.service("a").gpus == (GpuRequest(count=-1, capabilities=("gpu",)),)  # type: ignore[union-attr]
    assert spec.service("b").gpus == (  # type: ignore[union-attr]
        GpuRequest(driver="nvidia", count=1, capabilities=("gpu", "utility")),
    )


def test_all_problems_at_once() -> None:
    """Every problem of a file comes in one error, each naming its service and key."""
    found = problems("""
        services:
          web:
            image: x
            ports: ["http:80"]
            restrat: always
            mem_limit: lots
          api:
            build: .
            privileged: "maybe"
          db:
            image: y
            networks: [nowhere]
            volumes: ["../rel:/data"]
        volumes:
          bad: {driver_opts: [1]}
    """)
    expected = [
        "service 'web': additional property 'restrat' not allowed",
        "service 'web': ports.0: invalid port 'http:80'",
        "service 'web': mem_limit: invalid size 'lots'",
        "service 'api': build: build without image",
        "service 'api': privileged: must be true or false",
        "service 'db': networks: network 'nowhere' is not declared",
        "service 'db': volumes.0: bind mount source '../rel' is outside the stack's directory",
        "volume 'bad': driver_opts: must be a map",
    ]
    for fragment in expected:
        assert any(fragment in p for p in found), (fragment, found)
    assert len(found) == len(expected), found


def test_many_problems_read_as_one_list() -> None:
    """The error message counts the problems and lists each on a line of its own."""
    with pytest.raises(ComposeError) as info:
        parse("services:\n  a: {image: x, tty: 3}\n  b: {image: x, init: 4}\n")
    lines = str(info.value).splitlines()
    assert lines[0] == "2 problems in the compose file:"
    assert lines[1].startswith("  - service 'a': tty")
    assert lines[2].startswith("  - service 'b': init")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "services: {web: {image: x, ports: [[1]]}}",
            "service 'web': ports.0: must be a number or a string or a map",
        ),
        ("services: {web: {image: 3}}", "service 'web': image: must be a string"),
        ("services: {web: {image: x, cap_add: NET_ADMIN}}", "service 'web': cap_add: must be a list"),
        ("services: {web: {image: x}}\nnetwork: {}", "additional property 'network' not allowed"),
        ("services: {web: {image: x, cgroup: shared}}", "cgroup: must be one of host, private, not 'shared'"),
        (
            "services: {web: {image: x, depends_on: {db: {condition: 1}}}}",
            "depends_on.db.condition: must be a string",
        ),
    ],
)
def test_structural_errors_read_like_compose(text: str, message: str) -> None:
    """Unknown keys and wrong types are worded as docker compose words them."""
    found = problems(text)
    assert any(message in p for p in found), found


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("services: {web: {image: x, deploy: {replicas: 3}}}", "x-tether"),
        ("services: {web: {image: x, scale: 2}}", "one instance"),
        ("services: {web: {image: x, network_mode: 'service:nope'}}", "unknown service 'nope'"),
        ("services: {web: {image: x, pid: 'container:abc'}}", "service:NAME"),
        ("services: {web: {image: x, links: [db]}}", "unknown service 'db'"),
        ("services: {a: {image: x, container_name: same}, b: {image: x, container_name: same}}", "also used"),
        ("services: {a: {image: x, container_name: b}, b: {image: x}}", "another service"),
        ("services: {web: {image: x, devices: ['dev/ttyUSB0']}}", "absolute path"),
        ("services: {web: {image: x, devices: ['nvidia.com/gpu=all']}}", "CDI"),
        ("services: {web: {image: x, profiles: [debug]}}", "profiles"),
        ("services: {web: {image: x, network_mode: host, networks: [a]}}\nnetworks: {a: {}}", "network_mode"),
        ("services: {web: {image: x, volumes: [{type: npipe, source: a, target: /a}]}}", "npipe"),
        ("services: {web: {image: x, gpus: [{count: 1}]}}", "capabilities"),
        ("services: {web: {image: x, ulimits: {nofile: {soft: 9, hard: 1}}}}", "above the hard limit"),
        ("services: {web: {image: x}}\nsecrets: {s: {file: ./s.txt}}", "file is not supported"),
        ("services: {web: {image: x}}\nconfigs: {secret.x: {content: a}}", "reserved for secrets"),
        ("services: {web: {image: x, stop_signal: 'kill -9'}}", "signal name"),
    ],
)
def test_what_a_device_cannot_do_is_refused_with_a_hint(text: str, fragment: str) -> None:
    """Keys valid in Compose that make no sense on one device are refused, saying what to do."""
    found = problems(text)
    assert any(fragment in p for p in found), found


def test_an_empty_volume_section_is_an_error_as_in_compose() -> None:
    """An unset variable leaves ':/target' or 'name::ro': refused (Compose refuses it too), each
    named at once, instead of becoming an anonymous volume."""
    found = problems("""
        services:
          recorder:
            image: x
            volumes: [":/var/lib/recorder", "clips::ro", "/srv/media:/media"]
        volumes: {clips: {}}
    """)
    assert [p for p in found if "empty section between colons" in p] == [
        "service 'recorder': volumes.0: invalid volume ':/var/lib/recorder': empty section between colons "
        "(is a variable in it unset?)",
        "service 'recorder': volumes.1: invalid volume 'clips::ro': empty section between colons "
        "(is a variable in it unset?)",
    ]


def test_ports_on_the_host_network_are_ignored_with_a_warning() -> None:
    """network_mode: host with ports runs as under docker compose: the engine discards the
    published ports, so the service gets none and the deploy says so."""
    spec, _placement, warnings = parse_stack_warnings(
        textwrap.dedent("""
            services:
              hub:
                image: x
                network_mode: host
                ports: ["8123:8123", "5683:5683/udp"]
              side:
                image: x
                ports: ["9000:9000"]
        """)
    )
    hub, side = spec.service("hub"), spec.service("side")
    assert hub is not None and side is not None
    assert hub.network_mode == "host" and hub.ports == ()
    assert side.ports == (PortSpec(container=9000, host=9000),)
    assert warnings == [
        "service 'hub': ports are ignored with network_mode: host (the service listens on the "
        "device's own ports; Docker discards them too)"
    ]


def test_a_later_volume_at_the_same_target_replaces_the_earlier() -> None:
    """Two volumes at one target: the last is used in the first one's place, as docker compose
    loads it (a dashboard's bind mount shadowed by its named volume), with a warning."""
    spec, _placement, warnings = parse_stack_warnings(
        textwrap.dedent("""
            services:
              dash:
                image: x
                volumes:
                  - /srv/dash/provisioning:/var/lib/dash
                  - /srv/dash/plugins:/plugins
                  - dash-data:/var/lib/dash
            volumes: {dash-data: {}}
        """)
    )
    dash = spec.service("dash")
    assert dash is not None
    assert dash.volumes == (
        VolumeSpec(type="volume", source="dash-data", target="/var/lib/dash"),
        VolumeSpec(type="bind", source="/srv/dash/plugins", target="/plugins"),
    )
    assert warnings == [
        "service 'dash': volumes.2 replaces volumes.0: both are mounted at '/var/lib/dash'; "
        "the last one is used, as docker compose does"
    ]


def test_host_names_take_underscores_as_docker_does() -> None:
    """hostname and domainname with '_' run under docker compose: accepted as given; a space
    or a leading '-' is still no host name."""
    spec = parse("services: {gw: {image: x, hostname: gateway_2, domainname: site_a.lan}}")
    gw = spec.service("gw")
    assert gw is not None and (gw.hostname, gw.domainname) == ("gateway_2", "site_a.lan")
    assert any(
        "is not a valid host name" in p for p in problems("services: {gw: {image: x, hostname: 'a b'}}")
    )
    assert any("is not a valid host name" in p for p in problems("services: {gw: {image: x, hostname: -gw}}"))


def test_logging_options_without_a_driver_keep_the_engine_default_driver() -> None:
    """logging with options only means the engine's default driver with them, as in Compose;
    an explicit driver is kept as it is."""
    spec = parse("""
        services:
          quiet: {image: x, logging: {options: {max-size: 5m}}}
          loud: {image: x, logging: {driver: json-file, options: {max-size: 5m}}}
    """)
    assert spec.service("quiet").logging == LoggingSpec(options={"max-size": "5m"})  # type: ignore[union-attr]
    assert spec.service("loud").logging == LoggingSpec(driver="json-file", options={"max-size": "5m"})  # type: ignore[union-attr]
    quiet = spec.service("quiet").model_dump(mode="json")  # type: ignore[union-attr]
    assert quiet["logging"] == {"options": {"max-size": "5m"}}


def test_extension_fields_are_ignored_everywhere() -> None:
    """x-* keys at the top, in services, networks, volumes and long-form entries change nothing."""
    plain = parse("""
        services:
          a: {image: x, ports: [{target: 80}], networks: [n]}
        networks: {n: {}}
        volumes: {v: {}}
    """)
    extended = parse("""
        x-anchor: {a: 1}
        services:
          a:
            x-note: 1
            image: x
            ports: [{target: 80, x-port: 1}]
            networks: {n: {x-net: 1}}
        networks: {n: {x-n: 1}}
        volumes: {v: {x-v: 1}}
    """)
    assert plain.spec_hash() == extended.spec_hash()


def test_depends_on_started_adds_nothing_new() -> None:
    """service_started without restart is what a list means: the spec is the list's."""
    as_list = parse("services: {a: {image: x, depends_on: [b]}, b: {image: y}}")
    as_map = parse("services: {a: {image: x, depends_on: {b: {condition: service_started}}}, b: {image: y}}")
    assert as_list.spec_hash() == as_map.spec_hash()
    restarting = parse(
        "services: {a: {image: x, depends_on: {b: {condition: service_started, restart: true}}}, b: {image: y}}"
    )
    assert restarting.service("a").dependencies == {"b": Dependency(restart=True)}  # type: ignore[union-attr]


# The hashes the parser gave these files before issue 14 (computed with that parser): a file
# accepted then must keep its hash, or every device would replace its containers on upgrade.
ACCEPTED_BEFORE = {
    "docs/examples/hello-process.yml": "6310a8e3796919fcf709477cd5b87c852d735075f25bfaa7a039effd24dd5915",
    "docs/examples/hello-vars.yml": "1ebb9ea8804e46db937d17e2cb07446683375d542e2294d34cfa2efcc4646627",
    "docs/examples/web-busybox.yml": "4037631b9239e37c71f4a0631e6b3d39ce9181954ae6a8dc9a11a63dc54db25f",
    "docs/examples/web-with-volume.yml": "4a649cf6a927908383771c82af33467a9dc8e3a65a32eecd880a8317891956b4",
    "tests/compose_files/accepted/everything-v1.yml": "0e8bb97d5935809c0d0e84724d1bf27c3652623f39686ff95d4d4838a5db078d",
}


@pytest.mark.parametrize("path", sorted(ACCEPTED_BEFORE))
def test_hash_of_files_accepted_before_is_unchanged(path: str) -> None:
    """Files the old parser accepted keep the exact stack hash they had."""
    assert parse_compose((ROOT / path).read_text()).spec_hash() == ACCEPTED_BEFORE[path]
