"""What the device says about itself: its agent version and OS (in its presence facts) and the
host facts of the ``facts`` remote operation (addresses, CPU, memory, disk, uptime).

Read from /proc, ``os.statvfs``, the network interfaces and the driver; nothing here
keeps state. :class:`~.core.AgentCore` imports the first two (they go into every
``online``); the rest is read on a worker thread of :mod:`.remote`.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import platform
import socket
import struct
from pathlib import Path
from typing import Any

from tether.protocol.device_api import HostFacts

from .drivers.base import Driver


def agent_version() -> str:
    """This agent's version (the installed package's)."""
    from tether.protocol import __version__

    return __version__


def os_name() -> str:
    """The OS's pretty name (/etc/os-release), else the kernel's name and release."""
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}"


_SIOCGIFADDR = 0x8915


def addresses() -> dict[str, tuple[str, ...]]:
    """Interface name to its IPv4 (one per interface) and global/site IPv6 addresses; no loopback."""
    found: dict[str, list[str]] = {}
    try:
        names = [name for _index, name in socket.if_nameindex()]
    except OSError:
        names = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            if name == "lo":
                continue
            try:
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            found.setdefault(name, []).append(socket.inet_ntoa(packed[20:24]))
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 6 or parts[5] == "lo" or int(parts[3], 16) & 0x30:
                    continue  # loopback, link-local (0x20) or host (0x10) scope
                raw = parts[0]
                address = ipaddress.IPv6Address(":".join(raw[i : i + 4] for i in range(0, 32, 4)))
                found.setdefault(parts[5], []).append(address.compressed)
    except (OSError, ValueError):
        pass
    return {name: tuple(addrs) for name, addrs in sorted(found.items())}


def cpu_model() -> str | None:
    keys = ("model name", "Model", "Hardware", "cpu model", "Processor")
    try:
        with open("/proc/cpuinfo") as f:
            info: dict[str, str] = {}
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in keys and value.strip():
                    info.setdefault(key.strip(), value.strip())
    except OSError:
        return None
    return next((info[k] for k in keys if k in info), None) or platform.processor() or None


def uptime() -> float | None:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def docker_version(driver: Any) -> str | None:
    version = getattr(driver, "version", None)
    if driver.name != "docker" or not callable(version):
        return None
    return str(version())


def host_facts(driver: Driver, data_dir: Path, at: float) -> HostFacts:
    """What the ``facts`` remote operation answers, read now (``at``: the agent's clock)."""
    from . import metrics  # sampling helpers; not loaded with the agent core

    mem_total, mem_available = metrics.memory()
    disk_total, _used, disk_free = metrics.disk(data_dir)
    return HostFacts(
        hostname=socket.gethostname(),
        os=os_name(),
        kernel=platform.release(),
        arch=platform.machine(),
        cpu_count=metrics.cpu_count(),
        cpu_model=cpu_model(),
        memory_total=mem_total,
        memory_available=mem_available,
        disk_path=str(data_dir),
        disk_total=disk_total,
        disk_free=disk_free,
        docker_version=docker_version(driver),
        addresses=addresses(),
        uptime_s=uptime(),
        agent_version=agent_version(),
        driver=driver.name,
        at=at,
    )
