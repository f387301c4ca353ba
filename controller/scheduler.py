"""Scheduling, pure: which stacks each device should run, given groups and device attributes.

"Labels" here are a device's :class:`~.selectors.Attributes`: its facts (arch, os,
driver...) and its own labels, overlaid by the labels an operator or its enrollment set (see
:meth:`.models.Device.attributes`). Group selectors match only the latter unless the group
trusts device labels; placement constraints choose among a group's members with all of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tether.protocol.models import JobSpec, StackRef

from .models import Group, Job, Stack
from .selectors import Attributes, matches, parse_selector


def members(group: Group, labels: Mapping[str, Attributes]) -> list[str]:
    """The devices of ``group``: its named devices, or those whose labels match its selector.

    ``labels`` maps every known device to its attributes. Only trusted labels count unless
    the group trusts device labels (``trust_device_labels``): a device never joins a group
    by saying so.
    """
    if group.selector is None:
        return sorted(set(group.devices))
    selector = parse_selector(group.selector)
    trust = group.trust_device_labels
    return sorted(d for d, attrs in labels.items() if matches(selector, attrs.selectable(trust)))


def eligible(stack: Stack, candidates: list[str], attributes: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The candidates that satisfy the stack's placement constraints."""
    if not stack.placement.constraints:
        return candidates
    terms = [t for c in stack.placement.constraints for t in parse_selector(c)]
    return [d for d in candidates if matches(tuple(terms), attributes.get(d, {}))]


def desired_stacks(
    stacks: Iterable[Stack],
    groups: Mapping[str, Group],
    labels: Mapping[str, Attributes],
    pins: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, tuple[StackRef, ...]]:
    """Map every targeted device to the stacks it should run, sorted by name.

    A ``global`` stack targets every member of its group; a ``replicas`` stack only the
    devices of its current assignment (see :mod:`.placement`). ``pins`` maps a stack to
    the devices a running deployment keeps on another version (see :mod:`.rollout`); a pin
    to ``""`` keeps the stack off the device (a first deployment staged, not switched yet).
    """
    pins = pins or {}
    result: dict[str, list[StackRef]] = {}
    refs: dict[tuple[str, str], StackRef] = {}  # one (immutable) ref per version, not one per device
    for stack in stacks:
        group = groups.get(stack.group)
        if group is None:
            continue
        targets = (
            [a.device_id for a in stack.assignment]
            if stack.placement.mode == "replicas"
            else eligible(stack, members(group, labels), labels)
        )
        pinned = pins.get(stack.name, {})
        for device_id in targets:
            spec_hash = pinned.get(device_id, stack.spec_hash)
            if spec_hash:
                ref = refs.get((stack.name, spec_hash))
                if ref is None:
                    ref = refs[(stack.name, spec_hash)] = StackRef(name=stack.name, spec_hash=spec_hash)
                result.setdefault(device_id, []).append(ref)
    ones: dict[int, tuple[StackRef, ...]] = {}  # devices of one stack share its tuple too
    return {
        d: (ones.get(id(found[0])) or ones.setdefault(id(found[0]), (found[0],)))
        if len(found) == 1
        else tuple(sorted(found, key=lambda r: r.name))
        for d, found in result.items()
    }


def desired_jobs(
    jobs: Iterable[Job], groups: Mapping[str, Group], labels: Mapping[str, Attributes]
) -> dict[str, tuple[JobSpec, ...]]:
    """Map every device to the jobs of its groups, sorted by name."""
    result: dict[str, list[JobSpec]] = {}
    for job in jobs:
        group = groups.get(job.group)
        if group is None:
            continue
        for device_id in members(group, labels):
            result.setdefault(device_id, []).append(job.spec)
    return {d: tuple(sorted(specs, key=lambda j: j.name)) for d, specs in result.items()}
