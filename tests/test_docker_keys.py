"""The docker driver honours every Compose key a device runs: each checked on the real engine
with ``docker inspect`` (tests/compose_files/every-key.yml), and container names and networks
stay per device, so two devices (or stacks) on one engine never collide."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.infra import wait_until
from tether.agent.drivers.docker import DockerDriver
from tether.agent.drivers.docker_spec import DEFAULT_LOG_CONFIG
from tether.controller.compose import parse_compose
from tether.protocol.models import StackSpec

pytestmark = pytest.mark.docker

FILES = Path(__file__).resolve().parent / "compose_files"
STACK = "ek"


def load(name: str, image: str, tmp: Path) -> StackSpec:
    """A test Compose file with the local busybox image and bind sources under ``tmp``."""
    text = (FILES / name).read_text().replace("busybox:latest", image)
    text = text.replace("/srv/", f"{tmp}/srv/")
    for sub in ("shared", "conf"):
        (tmp / "srv" / sub).mkdir(parents=True, exist_ok=True)
    return parse_compose(text)


def rendered(spec: StackSpec, tmp: Path) -> StackSpec:
    """Configs and secrets written to files, as the agent renders them."""
    services = []
    for s in spec.services:
        mounts = []
        for m in s.configs:
            path = tmp / "configs" / m.source
            path.parent.mkdir(exist_ok=True)
            path.write_text(spec.configs[m.source])
            mounts.append(m.model_copy(update={"host_path": str(path)}))
        services.append(s.model_copy(update={"configs": tuple(mounts)}))
    return spec.model_copy(update={"services": tuple(services)})


def cleanup(client: Any, device: str) -> None:
    label = f"io.tether.device={device}"
    for c in client.containers.list(all=True, filters={"label": label}):
        with contextlib.suppress(Exception):
            c.remove(force=True)
    for n in client.networks.list(filters={"label": label}):
        with contextlib.suppress(Exception):
            n.remove()
    for v in client.volumes.list(filters={"label": label}):
        with contextlib.suppress(Exception):
            v.remove(force=True)


def deploy(device: str, spec: StackSpec, stack: str = STACK) -> DockerDriver:
    driver = DockerDriver(device)
    for service in spec.services:
        driver.create(stack, spec, service)
    return driver


@pytest.fixture(scope="module")
def every(
    docker_engine: Any, busybox_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("every-key")
    device = f"ek-{uuid.uuid4().hex[:6]}"
    spec = rendered(load("every-key.yml", busybox_image, tmp), tmp)
    try:
        deploy(device, spec)
        names = {s.name: f"tether-{device}-{STACK}-{s.name}" for s in spec.services}
        yield {
            "device": device,
            "tmp": tmp,
            "inspect": {s: docker_engine.api.inspect_container(n) for s, n in names.items()},
            "client": docker_engine,
            "names": names,
        }
    finally:
        cleanup(docker_engine, device)


def test_host_config_keys(every: dict[str, Any]) -> None:
    """Capabilities, devices, limits, sysctls, tmpfs, ulimits and the rest reach HostConfig."""
    host = every["inspect"]["app"]["HostConfig"]
    assert host["CapAdd"] == ["NET_ADMIN", "SYS_TIME"] and host["CapDrop"] == ["MKNOD"]
    assert host["Devices"] == [
        {"PathOnHost": "/dev/null", "PathInContainer": "/dev/app-null", "CgroupPermissions": "rw"}
    ]
    assert host["DeviceCgroupRules"] == ["c 1:3 rmw"]
    assert host["GroupAdd"] == ["20", "2000"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert host["ReadonlyRootfs"] is True and host["Privileged"] is False and host["Init"] is True
    assert host["Tmpfs"] == {"/run": "", "/var/run/app": "size=8m,mode=1770"}
    assert (host["Dns"], host["DnsSearch"], host["DnsOptions"]) == (
        ["9.9.9.9"],
        ["example.internal"],
        ["ndots:2"],
    )
    assert host["ExtraHosts"] == ["gateway:10.0.0.1", "other:10.0.0.2"]
    assert host["Sysctls"] == {"net.ipv4.tcp_keepalive_time": "600"}
    assert host["ShmSize"] == 64 << 20
    assert (host["Memory"], host["MemoryReservation"], host["MemorySwap"]) == (256 << 20, 64 << 20, 512 << 20)
    assert (host["NanoCpus"], host["CpuShares"], host["PidsLimit"], host["OomScoreAdj"]) == (
        500_000_000,
        512,
        200,
        100,
    )
    assert host["Ulimits"] == [
        {"Name": "nofile", "Hard": 2048, "Soft": 1024},
        {"Name": "nproc", "Hard": 512, "Soft": 512},
    ]
    assert host["IpcMode"] == "shareable"
    assert host["RestartPolicy"]["Name"] == "no"  # the agent restarts (ADR 0003)
    db = every["inspect"]["db"]["HostConfig"]
    assert (db["NanoCpus"], db["Memory"]) == (250_000_000, 128 << 20)  # deploy.resources.limits


def test_config_keys(every: dict[str, Any]) -> None:
    """Host name, user, working directory, stop signal, tty, stdin and exposed ports reach Config."""
    config = every["inspect"]["app"]["Config"]
    assert (config["Hostname"], config["Domainname"]) == ("app-host", "example.internal")
    assert (config["User"], config["WorkingDir"], config["StopSignal"]) == ("1000:1000", "/tmp", "SIGINT")
    assert config["Tty"] is True and config["OpenStdin"] is True
    assert set(config["ExposedPorts"]) == {
        "80/tcp",
        "7000/tcp",
        "8000/tcp",
        "8001/udp",
        "9000/udp",
        "9001/udp",
    }


def test_ports_every_binding(every: dict[str, Any]) -> None:
    """Two bindings of one container port both exist, and a range binds each port."""
    bindings = every["inspect"]["app"]["HostConfig"]["PortBindings"]
    assert sorted(b["HostPort"] for b in bindings["80/tcp"]) == ["18080", "18081"]
    assert bindings["9001/udp"] == [{"HostIp": "127.0.0.1", "HostPort": "19001"}]
    assert bindings["7000/tcp"] == [{"HostIp": "", "HostPort": "17000"}]


def test_mounts(every: dict[str, Any]) -> None:
    """One source at two targets, named, anonymous, tmpfs, nocopy, configs and secrets are all mounted."""
    device, tmp = every["device"], every["tmp"]
    mounts = {m["Destination"]: m for m in every["inspect"]["app"]["Mounts"]}
    assert mounts["/a"]["Source"] == mounts["/b"]["Source"] == f"{tmp}/srv/shared"
    assert (mounts["/a"]["RW"], mounts["/b"]["RW"]) == (False, True)
    assert mounts["/data"]["Name"] == mounts["/data-nocopy"]["Name"] == f"tether-{device}-{STACK}-data"
    assert "nocopy" in mounts["/data-nocopy"]["Mode"]
    assert mounts["/cache"]["Type"] == "volume" and mounts["/cache"]["Name"].startswith(
        f"tether-{device}-{STACK}-app-anon-"
    )
    assert mounts["/scratch"]["Type"] == "tmpfs"
    assert mounts["/conf"]["Propagation"] == "rprivate" and mounts["/conf"]["RW"] is False
    assert mounts["/run/secrets/token"]["RW"] is False and mounts["/app.conf"]["RW"] is False
    tmpfs = next(m for m in every["inspect"]["app"]["HostConfig"]["Mounts"] if m["Target"] == "/scratch")
    assert tmpfs["TmpfsOptions"] == {"SizeBytes": 16 << 20, "Mode": 0o1777}
    volume = every["client"].api.inspect_volume(f"tether-{device}-{STACK}-data")
    assert volume["Labels"]["purpose"] == "data"


def test_logging_given_and_default(every: dict[str, Any]) -> None:
    """logging is honoured (options without a driver: the engine's default driver, as docker
    compose passes them); a service without it gets the rotating default."""
    assert every["inspect"]["cache"]["HostConfig"]["LogConfig"] == {
        "Type": every["client"].info()["LoggingDriver"],
        "Config": {"max-size": "2m"},
    }
    assert every["inspect"]["app"]["HostConfig"]["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-size": "1m", "max-file": "2"},
    }
    assert every["inspect"]["db"]["HostConfig"]["LogConfig"] == {
        "Type": DEFAULT_LOG_CONFIG["type"],
        "Config": DEFAULT_LOG_CONFIG["config"],
    }


def test_healthchecks(every: dict[str, Any]) -> None:
    """disable and NONE turn the check off; timings only keep the image's test."""
    inspect = every["inspect"]
    assert inspect["init-job"]["Config"]["Healthcheck"]["Test"] == ["NONE"]
    assert inspect["cache"]["Config"]["Healthcheck"]["Test"] == ["NONE"]
    db = inspect["db"]["Config"]["Healthcheck"]
    assert not db.get("Test") and db["Interval"] == 1_000_000_000
    assert inspect["app"]["Config"]["Healthcheck"]["Test"] == ["CMD", "true"]


def test_networks_aliases_and_namespaces(every: dict[str, Any]) -> None:
    """Custom networks with aliases, container_name and a fixed address; service:X namespaces."""
    device = every["device"]
    nets = every["inspect"]["app"]["NetworkSettings"]["Networks"]
    front, back = f"tether-{device}-{STACK}_front", f"tether-{device}-{STACK}_back"
    assert set(nets) == {front, back}
    assert {"app", "app-alias", "app-main"} <= set(nets[front]["Aliases"])
    assert {"app", "app-main"} <= set(nets[back]["Aliases"])
    assert nets[front]["IPAddress"] == "10.213.5.10"
    assert nets[back]["Links"] == [f"tether-{device}-{STACK}-db:database"]
    assert every["client"].api.inspect_network(back)["Internal"] is True
    db_id = every["inspect"]["db"]["Id"]
    cache = every["inspect"]["cache"]["HostConfig"]
    assert cache["NetworkMode"] == cache["PidMode"] == f"container:{db_id}"
    assert every["inspect"]["init-job"]["HostConfig"]["NetworkMode"] == "none"
    # The container name resolves from another service (db is on `back` only).
    db = every["client"].containers.get(every["names"]["db"])
    out = db.exec_run(["/bin/busybox", "ping", "-c1", "-W2", "app-main"])
    assert f"({nets[back]['IPAddress']})".encode() in out.output, out.output
    assert every["inspect"]["app"]["Name"] == f"/tether-{device}-{STACK}-app"  # the real name stays Tether's


def test_two_devices_with_container_names_do_not_collide(
    docker_engine: Any, busybox_image: str, tmp_path: Path
) -> None:
    """The same stack with container_name and custom networks runs for two devices on one engine."""
    spec = load("two-devices.yml", busybox_image, tmp_path)
    devices = [f"two-{uuid.uuid4().hex[:6]}" for _ in range(2)]
    try:
        for device in devices:
            deploy(device, spec)
        addresses = {}
        for device in devices:
            client = docker_engine.containers.get(f"tether-{device}-{STACK}-client")
            broker = docker_engine.api.inspect_container(f"tether-{device}-{STACK}-broker")
            assert broker["State"]["Running"] and client.status == "running"
            net = broker["NetworkSettings"]["Networks"][f"tether-{device}-{STACK}_iot"]
            addresses[device] = net["IPAddress"]
            for name in ("mqtt", "broker.local", "broker"):  # each resolves to this device's broker
                out = client.exec_run(["/bin/busybox", "ping", "-c1", "-W2", name]).output.decode()
                assert f"({net['IPAddress']})" in out, (name, out)
        assert addresses[devices[0]] != addresses[devices[1]]
    finally:
        for device in devices:
            cleanup(docker_engine, device)


def test_external_network_and_volume_must_exist(
    docker_engine: Any, busybox_image: str, tmp_path: Path
) -> None:
    """An external network or volume that is missing is one clear error; an existing one is used as is."""
    from tether.protocol.errors import DriverError

    tag = uuid.uuid4().hex[:6]
    device = f"ext-{tag}"
    text = f"""
services:
  a:
    image: {busybox_image}
    command: ["sleep", "3600"]
    networks: [shared]
    volumes: ["store:/store"]
networks:
  shared: {{external: true, name: ext-net-{tag}}}
volumes:
  store: {{external: true, name: ext-vol-{tag}}}
"""
    spec = parse_compose(text)
    driver = DockerDriver(device)
    try:
        with pytest.raises(DriverError, match=f"external volume 'ext-vol-{tag}' does not exist"):
            driver.create(STACK, spec, spec.services[0])
        docker_engine.volumes.create(f"ext-vol-{tag}")
        with pytest.raises(DriverError, match=f"external network 'ext-net-{tag}' does not exist"):
            driver.create(STACK, spec, spec.services[0])
        docker_engine.networks.create(f"ext-net-{tag}")
        driver.create(STACK, spec, spec.services[0])
        info = wait_until(
            lambda: docker_engine.api.inspect_container(f"tether-{device}-{STACK}-a"), message="container"
        )
        assert f"ext-net-{tag}" in info["NetworkSettings"]["Networks"]
        assert info["Mounts"][0]["Name"] == f"ext-vol-{tag}"
    finally:
        cleanup(docker_engine, device)
        with contextlib.suppress(Exception):
            docker_engine.networks.get(f"ext-net-{tag}").remove()
        with contextlib.suppress(Exception):
            docker_engine.volumes.get(f"ext-vol-{tag}").remove(force=True)
