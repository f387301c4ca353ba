"""Published host ports that two stacks would both take on one device. Pure.

The controller knows every stack's ports and where each stack runs, so it refuses at deploy
time what Docker would only refuse when it starts the container (issue 18). Two bindings
clash when their protocol and host port are the same and their host addresses overlap (the
same address, or either one every address). A port without a host port (Docker picks one)
never clashes. Only docker-driver devices publish ports (the process driver ignores them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tether.protocol.models import StackSpec

_EVERY_ADDRESS = ("", "0.0.0.0", "::")
SHOWN_DEVICES = 3


def published(spec: StackSpec) -> list[tuple[str, str, int, str]]:
    """(service, host address, host port, protocol) of every port with a host port."""
    return [
        (service.name, port.host_ip or "", port.host, port.protocol)
        for service in spec.services
        for port in service.ports
        if port.host is not None
    ]


def _overlap(a: str, b: str) -> bool:
    return a in _EVERY_ADDRESS or b in _EVERY_ADDRESS or a == b


def port_clashes(
    name: str,
    spec: StackSpec,
    devices: Iterable[str],
    others: Mapping[str, tuple[StackSpec, Iterable[str]]],
) -> list[str]:
    """One line per (other stack, port) that stack ``name`` would take on a device of ``devices``
    where the other stack runs too; ``others`` maps each other stack to (its spec, its devices)."""
    mine = published(spec)
    if not mine:
        return []
    targets = set(devices)
    problems = []
    for other, (other_spec, other_devices) in sorted(others.items()):
        if other == name:
            continue
        shared = sorted(targets.intersection(other_devices))
        if not shared:
            continue
        for service, address, port, protocol in mine:
            for other_service, other_address, other_port, other_protocol in published(other_spec):
                if (port, protocol) != (other_port, other_protocol) or not _overlap(address, other_address):
                    continue
                where = ", ".join(shared[:SHOWN_DEVICES])
                if len(shared) > SHOWN_DEVICES:
                    where += f" and {len(shared) - SHOWN_DEVICES} more"
                problems.append(
                    f"port {port}/{protocol} of service {service!r} is taken by stack {other!r} "
                    f"(service {other_service!r}) on {where}"
                )
    return problems
