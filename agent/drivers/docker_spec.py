"""A service spec as Docker Engine API arguments (pure): what :class:`DockerDriver` creates.

Every Compose key a device honours is translated here, and nowhere else, into the arguments
of the engine's "create container" call (``create_container`` and its host config in the
Docker SDK's low-level API), the networks to join and the volumes to make sure of. Names are
Tether's: a container is ``tether-{device}-{stack}-{service}`` whatever its ``container_name``
(which becomes a network alias, so other services resolve it while two devices or two stacks
on one engine never collide); a stack network is ``tether-{device}-{stack}`` (``default``)
or ``tether-{device}-{stack}_{network}``; a named volume ``tether-{device}-{stack}-{volume}``
unless the file names it (``name:``, ``external``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from tether.protocol.errors import DriverError
from tether.protocol.models import (
    NetworkAttachment,
    NetworkSpec,
    ServiceSpec,
    StackSpec,
    VolumeOptions,
    VolumeSpec,
)

from .base import instance_name

_NS = 1_000_000_000
DEFAULT_LOG_CONFIG = {"type": "json-file", "config": {"max-size": "10m", "max-file": "3"}}
"""A service without ``logging`` keeps at most 30 MB of output (three 10 MB files), so a chatty
container cannot fill an SD card; ``tether logs`` reads it as before."""


@dataclass
class NetworkPlan:
    """A network a service joins: the engine's name, the stack's spec of it, how it joins."""

    key: str
    name: str
    spec: NetworkSpec
    attachment: NetworkAttachment
    aliases: list[str]
    links: dict[str, str]


@dataclass
class VolumePlan:
    """A named (or anonymous) volume to make sure of before the container is created."""

    name: str
    options: VolumeOptions
    anonymous: bool = False


@dataclass
class ContainerPlan:
    """Everything :meth:`DockerDriver.create` needs, computed without touching the engine."""

    create: dict[str, Any]
    host: dict[str, Any]
    networks: list[NetworkPlan] = field(default_factory=list)
    volumes: list[VolumePlan] = field(default_factory=list)


def network_name(device_id: str, stack: str, key: str, spec: NetworkSpec | None) -> str:
    """The engine's name of one of a stack's networks."""
    if spec is not None and spec.name:
        return spec.name
    return f"tether-{device_id}-{stack}" if key == "default" else f"tether-{device_id}-{stack}_{key}"


def volume_name(device_id: str, stack: str, key: str, options: VolumeOptions | None) -> str:
    """The engine's name of one of a stack's named volumes."""
    if options is not None and options.name:
        return options.name
    return f"tether-{device_id}-{stack}-{key}"


def anonymous_volume_name(device_id: str, stack: str, service: str, target: str) -> str:
    """An anonymous volume is the service's own, kept across updates as Compose keeps it."""
    digest = hashlib.sha256(target.encode()).hexdigest()[:12]
    return f"tether-{device_id}-{stack}-{service}-anon-{digest}"


def _namespace(device_id: str, stack: str, value: str | None) -> str | None:
    """``service:NAME`` -> ``container:tether-...-NAME``; anything else as it is."""
    if value is not None and value.startswith("service:"):
        return "container:" + instance_name(device_id, stack, value.partition(":")[2])
    return value


def _bind(v: VolumeSpec, source: str) -> str:
    options = ["ro" if v.read_only else "rw"]
    if v.selinux:
        options.append(v.selinux)
    if v.propagation:
        options.append(v.propagation)
    if v.nocopy:
        options.append("nocopy")
    return f"{source}:{v.target}:{','.join(options)}"


def plan_container(
    device_id: str, stack: str, spec: StackSpec, service: ServiceSpec, labels: dict[str, str]
) -> ContainerPlan:
    """The engine arguments for ``service`` of ``stack`` on ``device_id``. Pure."""
    create: dict[str, Any] = {
        "image": service.image,
        "name": instance_name(device_id, stack, service.name),
        "labels": labels,
        "environment": dict(service.environment),
        "detach": True,
    }
    host: dict[str, Any] = {"restart_policy": {"Name": "no"}}  # the agent restarts (ADR 0003)
    for key in ("command", "entrypoint"):
        value = getattr(service, key)
        if value is not None:
            create[key] = list(value)
    for key in ("hostname", "domainname", "user", "working_dir", "stop_signal", "mac_address", "platform"):
        value = getattr(service, key)
        if value:
            create[key] = value
    if service.tty:
        create["tty"] = True
    if service.stdin_open:
        create["stdin_open"] = True
    # Host config: each key only when set, so the engine's defaults stay the engine's.
    direct = {
        "privileged": service.privileged,
        "read_only": service.read_only,
        "init": service.init or None,
        "cap_add": list(service.cap_add) or None,
        "cap_drop": list(service.cap_drop) or None,
        "security_opt": list(service.security_opt) or None,
        "device_cgroup_rules": list(service.device_cgroup_rules) or None,
        "group_add": list(service.group_add) or None,
        "dns": list(service.dns) or None,
        "dns_search": list(service.dns_search) or None,
        "dns_opt": list(service.dns_opt) or None,
        "extra_hosts": list(service.extra_hosts) or None,
        "sysctls": dict(service.sysctls) or None,
        "tmpfs": dict(service.tmpfs) or None,
        "shm_size": service.shm_size,
        "runtime": service.runtime,
        "userns_mode": service.userns_mode,
        "cgroupns": service.cgroup,
        "mem_limit": service.mem_limit,
        "mem_reservation": service.mem_reservation,
        "memswap_limit": service.memswap_limit,
        "mem_swappiness": service.mem_swappiness,
        "oom_kill_disable": service.oom_kill_disable,
        "oom_score_adj": service.oom_score_adj,
        "nano_cpus": int(service.cpus * _NS) if service.cpus else None,
        "cpu_shares": service.cpu_shares,
        "cpu_period": service.cpu_period,
        "cpu_quota": service.cpu_quota,
        "cpuset_cpus": service.cpuset,
        "pids_limit": service.pids_limit,
        "pid_mode": _namespace(device_id, stack, service.pid),
        "ipc_mode": _namespace(device_id, stack, service.ipc),
    }
    host.update({k: v for k, v in direct.items() if v not in (None, False)})
    if service.devices:
        host["devices"] = [f"{d.source}:{d.target}:{d.permissions}" for d in service.devices]
    if service.ulimits:
        host["ulimits"] = [{"name": u.name, "soft": u.soft, "hard": u.hard} for u in service.ulimits]
    if service.gpus:
        host["device_requests"] = [
            {
                "driver": g.driver or "",
                "count": g.count if g.count is not None else 0,
                "device_ids": list(g.device_ids) or None,
                "capabilities": [list(g.capabilities)],
                "options": dict(g.options),
            }
            for g in service.gpus
        ]
    if service.logging is not None:
        # An empty type is the engine's default driver (docker compose sends the same).
        driver = service.logging.driver or ""
        host["log_config"] = {"type": driver, "config": dict(service.logging.options)}
    else:
        host["log_config"] = DEFAULT_LOG_CONFIG
    plan = ContainerPlan(create, host)
    _networking(device_id, stack, spec, service, plan)
    _storage(device_id, stack, spec, service, plan)
    if service.healthcheck is not None:
        hc = service.healthcheck
        check: dict[str, Any] = {"test": list(hc.test)}  # [] keeps the image's test, ["NONE"] turns it off
        if hc.test != ("NONE",):
            check.update(
                interval=int(hc.interval_s * _NS),
                timeout=int(hc.timeout_s * _NS),
                retries=hc.retries,
                start_period=int(hc.start_period_s * _NS),
            )
            if hc.start_interval_s:
                check["start_interval"] = int(hc.start_interval_s * _NS)
        create["healthcheck"] = check
    return plan


def _networking(
    device_id: str, stack: str, spec: StackSpec, service: ServiceSpec, plan: ContainerPlan
) -> None:
    exposed: list[tuple[int, str]] = []
    if service.network_mode != "bridge":
        plan.host["network_mode"] = _namespace(device_id, stack, service.network_mode)
    else:
        bindings: dict[str, list[Any]] = {}
        for p in service.ports:  # every binding of a container port (a list per port)
            host: Any = p.host
            if p.host_ip:
                host = (p.host_ip, p.host) if p.host else (p.host_ip,)
            bindings.setdefault(f"{p.container}/{p.protocol}", []).append(host)
            exposed.append((p.container, p.protocol))
        if bindings:
            plan.host["port_bindings"] = bindings
        joins = service.networks or {"default": NetworkAttachment()}
        ordered = sorted(joins.items(), key=lambda item: -item[1].priority)  # the first is joined at create
        links = {instance_name(device_id, stack, other): alias for other, alias in service.links.items()}
        for key, attachment in ordered:
            net_spec = spec.networks.get(key, NetworkSpec())
            aliases = [service.name, *attachment.aliases]
            if service.container_name and service.container_name not in aliases:
                aliases.append(service.container_name)
            plan.networks.append(
                NetworkPlan(
                    key=key,
                    name=network_name(device_id, stack, key, net_spec),
                    spec=net_spec,
                    attachment=attachment,
                    aliases=aliases,
                    links=links,
                )
            )
    for e in service.expose:
        port, _, protocol = e.partition("/")
        exposed.append((int(port), protocol or "tcp"))
    if exposed:
        plan.create["ports"] = sorted(set(exposed))


def _storage(device_id: str, stack: str, spec: StackSpec, service: ServiceSpec, plan: ContainerPlan) -> None:
    binds: list[str] = []
    mounts: list[dict[str, Any]] = []
    for v in service.volumes:
        if v.type == "tmpfs":
            tmpfs: dict[str, Any] = {}
            if v.tmpfs_size:
                tmpfs["SizeBytes"] = v.tmpfs_size
            if v.tmpfs_mode:
                tmpfs["Mode"] = v.tmpfs_mode
            mount: dict[str, Any] = {"Type": "tmpfs", "Target": v.target, "ReadOnly": v.read_only}
            if tmpfs:
                mount["TmpfsOptions"] = tmpfs
            mounts.append(mount)
            continue
        if v.type == "stack" and not v.source.startswith("/"):
            raise DriverError(
                f"service {service.name}: volume {v.source} was not placed in the stack's directory"
            )
        if v.type in ("bind", "stack"):  # stack: a relative bind mount, rendered to the stack's directory
            if v.strict:  # create_host_path: false: the engine refuses a missing source
                mount = {"Type": "bind", "Source": v.source, "Target": v.target, "ReadOnly": v.read_only}
                if v.propagation:
                    mount["BindOptions"] = {"Propagation": v.propagation}
                mounts.append(mount)
            else:
                binds.append(_bind(v, v.source))
            continue
        if v.source:
            options = spec.volume_options.get(v.source, VolumeOptions())
            name = volume_name(device_id, stack, v.source, options)
            plan.volumes.append(VolumePlan(name, options))
        else:
            name = anonymous_volume_name(device_id, stack, service.name, v.target)
            plan.volumes.append(VolumePlan(name, VolumeOptions(), anonymous=True))
        if v.subpath:
            mount = {
                "Type": "volume",
                "Source": name,
                "Target": v.target,
                "ReadOnly": v.read_only,
                "VolumeOptions": {"NoCopy": v.nocopy, "Subpath": v.subpath},
            }
            mounts.append(mount)
        else:
            binds.append(_bind(v, name))
    for config in service.configs:  # rendered on the device (protocol/variables.py)
        mounts.append({"Type": "bind", "Source": config.host_path, "Target": config.target, "ReadOnly": True})
    if binds:
        plan.host["binds"] = binds
    if mounts:
        plan.host["mounts"] = mounts
