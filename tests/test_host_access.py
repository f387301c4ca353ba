"""The device's host access policy (agent/policy.py) and the process driver's limits: a stack
that asks for more than the device allows is refused on that device as a whole, one error
naming every refused key, and nothing else on the device is disturbed."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.links import RecordingLink
from tether.agent.config import load_config
from tether.agent.core import AgentCore
from tether.agent.drivers.fake import FakeDriver
from tether.agent.drivers.process import ProcessDriver
from tether.agent.policy import HostAccess, refusals
from tether.agent.store import MemoryStore
from tether.controller.compose import parse_compose
from tether.protocol import codec, topics
from tether.protocol.models import DesiredState, StackDefinition, StackRef, StackSpec
from tether.protocol.topics import DeviceTopic

POWERFUL = """
services:
  ha:
    image: ha:1
    privileged: true
    network_mode: host
    volumes: ["/etc/localtime:/etc/localtime:ro", "/run/dbus:/run/dbus"]
  z2m:
    image: z2m:1
    devices: ["/dev/ttyUSB0:/dev/ttyACM0"]
    cap_add: [NET_ADMIN, CHOWN]
    sysctls: {net.core.somaxconn: 1024}
    pid: host
    runtime: nvidia
    security_opt: ["seccomp=unconfined"]
    volumes: ["nfs:/data"]
volumes:
  nfs: {driver_opts: {type: none, o: bind, device: /mnt/usb}}
"""


def test_the_default_lets_typical_iot_stacks_run() -> None:
    """The default policy allows what Home Assistant, Zigbee2MQTT or Frigate need."""
    assert refusals(parse_compose(POWERFUL), HostAccess()) == []


def test_locked_refuses_every_host_power_at_once() -> None:
    """host_access = locked names each refused service and key with the setting to change."""
    found = refusals(parse_compose(POWERFUL), HostAccess(preset="locked"))
    assert found == [
        "service 'ha': privileged (host_access.privileged)",
        "service 'ha': network_mode: host (host_access.host_network)",
        "service 'ha': volumes '/etc/localtime' (host_access.bind_mounts)",
        "service 'ha': volumes '/run/dbus' (host_access.bind_mounts)",
        "service 'z2m': security_opt 'seccomp=unconfined' (host_access.privileged)",
        "service 'z2m': devices '/dev/ttyUSB0' (host_access.devices)",
        "service 'z2m': cap_add NET_ADMIN (host_access.capabilities)",
        "service 'z2m': pid: host (host_access.host_namespaces)",
        "service 'z2m': volumes 'nfs' (binds '/mnt/usb') (host_access.bind_mounts)",
        "service 'z2m': runtime 'nvidia' (host_access.runtimes)",
        "service 'z2m': sysctls (host_access.sysctls)",
    ]


def test_locked_with_exceptions(tmp_path: Path) -> None:
    """A [host_access] table overrides single settings of a preset (globs for devices, path prefixes)."""
    config = tmp_path / "agent.toml"
    config.write_text(
        '[host_access]\npreset = "locked"\ndevices = ["/dev/ttyUSB*"]\nbind_mounts = ["/etc/localtime", "/run/"]\n'
        'capabilities = ["NET_ADMIN"]\n'
    )
    policy = load_config(config, {}, {}).host_access
    found = refusals(parse_compose(POWERFUL), policy)
    assert not any(
        "devices" in r or "cap_add" in r or "'/run/dbus'" in r or "localtime" in r for r in found
    ), found
    assert "service 'ha': privileged (host_access.privileged)" in found
    assert load_config(None, {"TETHER_HOST_ACCESS": "locked"}, {}).host_access.preset == "locked"


def test_unknown_setting_is_a_config_error(tmp_path: Path) -> None:
    """A typo in [host_access] is refused at start, like every agent setting."""
    from tether.protocol.errors import ConfigError

    config = tmp_path / "agent.toml"
    config.write_text("[host_access]\nprivilegd = false\n")
    with pytest.raises(ConfigError, match="privilegd"):
        load_config(config, {}, {})


def _deliver(core: AgentCore, generation: int, stacks: dict[str, StackSpec]) -> None:
    desired = DesiredState(
        device_id="d1",
        generation=generation,
        stacks=tuple(StackRef(name=n, spec_hash=s.spec_hash()) for n, s in stacks.items()),
    )
    core.handle(topics.device("d1", DeviceTopic.DESIRED), codec.encode(desired))
    for spec in stacks.values():
        definition = StackDefinition(spec_hash=spec.spec_hash(), spec=spec)
        core.handle(topics.stack(spec.spec_hash()), codec.encode(definition))
    assert core.desired is not None and core.desired.generation == generation


def test_a_refused_stack_disturbs_nothing_else() -> None:
    """On a locked device a privileged stack is not started, reports one error, and the other
    stack runs; a refused update keeps the previous version running."""
    driver = FakeDriver("d1")
    link = RecordingLink()
    core = AgentCore("d1", {}, driver, MemoryStore(), link, host_access=HostAccess(preset="locked"))
    good = parse_compose("services: {web: {image: web:1}}")
    bad = parse_compose("services: {ha: {image: ha:1, privileged: true, devices: [/dev/ttyUSB0]}}")
    _deliver(core, 1, {"good": good, "bad": bad})
    core.reconcile_once()
    running = {(i.stack, i.service) for i in driver.observe()}
    assert running == {("good", "web")}
    report = link.reports()[-1]
    assert report.stacks["good"].state == "running"
    error = report.stacks["bad"].services["ha"].last_error
    assert error is not None and "refused on this device" in error
    assert "privileged (host_access.privileged)" in error and "devices '/dev/ttyUSB0'" in error
    assert any(e.kind == "stack.refused" for e in link.events())

    # An update of the good stack that asks for too much: version 1 keeps running.
    worse = parse_compose("services: {web: {image: web:2, network_mode: host}}")
    _deliver(core, 2, {"good": worse, "bad": bad})
    core.reconcile_once()
    web = next(i for i in driver.observe() if i.service == "web")
    assert web.spec_hash == good.services[0].spec_hash() and web.state == "running"


def test_process_driver_names_what_it_cannot_apply(tmp_path: Path) -> None:
    """Container-only keys on a process device are refused, every one named, in one error."""
    driver = ProcessDriver("d1", tmp_path)
    spec = parse_compose(
        "services: {a: {command: [sleep, '1'], user: nobody, working_dir: /tmp, stop_signal: INT, "
        "privileged: true, cpus: 0.5, tmpfs: [/run]}, b: {command: [sleep, '1'], ulimits: {nofile: 64}}}"
    )
    assert driver.unsupported(spec) == [
        "service 'a': privileged, tmpfs, cpus: not for a host process (process driver); run the stack on a docker device"
    ]
