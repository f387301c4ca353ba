"""What a stack may do to the device itself: the device owner's policy (pure).

Some Compose keys give a container power over the host: ``privileged``, ``devices``,
``cap_add``, host namespaces (``network_mode``/``pid``/``ipc``/``userns_mode: host``, ``cgroup:
host``), bind mounts of host paths, another ``runtime``, ``sysctls``, GPUs, security options
that switch confinement off. The agent's configuration says which of these its device allows
(``[host_access]`` in agent.toml, in the spirit of Nomad's ``allow_privileged``/``allow_caps``):

* ``host_access = "default"`` (the default): all of them, as ``docker compose`` would on the
  device. Typical IoT stacks need them (Home Assistant: privileged and the host network;
  Zigbee2MQTT: a serial device; Frigate: privileged, devices, tmpfs).
* ``host_access = "locked"``: none of them; ``cap_add`` only of capabilities Docker grants by
  default anyway. For devices that run third parties' stacks.
* a table: a preset and each setting overridden, e.g.
  ``[host_access]\npreset = "locked"\ndevices = ["/dev/ttyUSB*", "/dev/ttyACM*"]\nbind_mounts = ["/srv/"]``.

A stack that asks for more than the policy allows is refused on that device as a whole, with
one error naming every refused service and key (:func:`refusals`); the device keeps running
what it ran, and no other stack is touched (agent/core.py).
"""

from __future__ import annotations

from fnmatch import fnmatch
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator
from tether.protocol.models import ServiceSpec, StackSpec

DOCKER_DEFAULT_CAPS = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "NET_RAW",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
"""What every container has unless dropped: adding one of these gives nothing."""
UNCONFINED = ("seccomp=unconfined", "seccomp:unconfined", "apparmor=unconfined", "apparmor:unconfined")
UNCONFINED_PREFIXES = ("label=disable", "label:disable", "systempaths=unconfined", "systempaths:unconfined")


class HostAccess(BaseModel):
    """Which host powers a stack may use on this device (``[host_access]`` in agent.toml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    preset: Literal["default", "locked"] = "default"
    privileged: bool | None = None
    """``privileged: true`` and security options that switch confinement off."""
    devices: list[str] | None = None
    """Host device paths a service may map (glob patterns); GPUs and ``device_cgroup_rules``
    need ``["*"]``."""
    capabilities: list[str] | None = None
    """Capabilities ``cap_add`` may name beyond Docker's default set (``"ALL"``: any)."""
    host_network: bool | None = None
    host_namespaces: bool | None = None
    """``pid``, ``ipc``, ``userns_mode: host`` and ``cgroup: host``."""
    bind_mounts: list[str] | None = None
    """Host path prefixes bind mounts may come from (``"/"``: any; configs are always allowed)."""
    runtimes: list[str] | None = None
    sysctls: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset_name(cls, value: Any) -> Any:
        return {"preset": value} if isinstance(value, str) else value

    def setting(self, name: str) -> Any:
        """The effective value of a setting: as configured, else the preset's."""
        value = getattr(self, name)
        if value is not None:
            return value
        if self.preset == "default":
            return {"devices": ["*"], "capabilities": ["ALL"], "bind_mounts": ["/"], "runtimes": ["*"]}.get(
                name, True
            )
        return [] if name in ("devices", "capabilities", "bind_mounts", "runtimes") else False


def _path_allowed(path: str, prefixes: list[str]) -> bool:
    for prefix in prefixes:
        if prefix == "/" or path == prefix.rstrip("/") or path.startswith(prefix.rstrip("/") + "/"):
            return True
    return False


def _service_refusals(service: ServiceSpec, spec: StackSpec, policy: HostAccess) -> list[str]:
    out: list[str] = []

    def refuse(key: str, setting: str, what: str = "") -> None:
        detail = f" {what}" if what else ""
        out.append(f"service {service.name!r}: {key}{detail} (host_access.{setting})")

    if not policy.setting("privileged"):
        if service.privileged:
            refuse("privileged", "privileged")
        for opt in service.security_opt:
            if opt in UNCONFINED or opt.startswith(UNCONFINED_PREFIXES):
                refuse("security_opt", "privileged", repr(opt))
    devices = policy.setting("devices")
    for d in service.devices:
        if not any(fnmatch(d.source, pattern) for pattern in devices):
            refuse("devices", "devices", repr(d.source))
    if "*" not in devices:
        if service.gpus:
            refuse("gpus", "devices")
        if service.device_cgroup_rules:
            refuse("device_cgroup_rules", "devices")
    caps = {c.upper().removeprefix("CAP_") for c in policy.setting("capabilities")}
    if "ALL" not in caps:
        for cap in service.cap_add:
            name = cap.upper().removeprefix("CAP_")
            if name not in caps and name not in DOCKER_DEFAULT_CAPS:
                refuse("cap_add", "capabilities", name)
    if service.network_mode == "host" and not policy.setting("host_network"):
        refuse("network_mode: host", "host_network")
    if not policy.setting("host_namespaces"):
        for key in ("pid", "ipc", "userns_mode", "cgroup"):
            if getattr(service, key) == "host":
                refuse(f"{key}: host", "host_namespaces")
    binds = policy.setting("bind_mounts")
    for v in service.volumes:
        if v.type == "bind" and not _path_allowed(v.source, binds):
            refuse("volumes", "bind_mounts", repr(v.source))
        if v.type == "volume" and v.source:
            opts = spec.volume_options[v.source].driver_opts if v.source in spec.volume_options else {}
            device = opts.get("device")
            # A local volume with `o: bind` is a bind mount of `device` in disguise.
            if device and "bind" in opts.get("o", "").split(",") and not _path_allowed(device, binds):
                refuse("volumes", "bind_mounts", f"{v.source!r} (binds {device!r})")
    runtimes = policy.setting("runtimes")
    if service.runtime and "*" not in runtimes and service.runtime not in runtimes:
        refuse("runtime", "runtimes", repr(service.runtime))
    if service.sysctls and not policy.setting("sysctls"):
        refuse("sysctls", "sysctls")
    return out


def refusals(spec: StackSpec, policy: HostAccess) -> list[str]:
    """Everything in ``spec`` the policy refuses, each naming the service, key and setting."""
    return [r for service in spec.services for r in _service_refusals(service, spec, policy)]
