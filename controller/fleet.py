"""The fleet as the controller's deployment steps see it: one :class:`Seen` per device.

Kept in memory by the controller (:meth:`~.scheduling.Scheduler.fleet_view`) and updated
from what the store says it wrote, so a step over 10,000 devices parses no device row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from tether.protocol.heap import MadeOnce, Shared
from tether.protocol.models import DownloadStatus, ReportedState, StackRef, StackStatus

from .models import DesiredRecord, Device
from .rollout import Observation
from .selectors import Attributes

V = TypeVar("V")


class MadeOf(Generic[V]):
    """What was made of each of the stack statuses seen lately, by stack name and identity.

    Reports of a fleet share their stacks' statuses (codec.FieldMemo validates each distinct
    one once): what is made of one is then made once, not per device. Bounded (forgotten
    when full): it keeps the statuses (a failing one holds log lines), so that an identity is
    not reused meanwhile."""

    def __init__(self, make: Callable[[str, StackStatus], V], size: int = 1024) -> None:
        self.make = make
        self.size = size
        self._made: dict[tuple[str, int], tuple[StackStatus, V]] = {}

    def get(self, name: str, status: StackStatus) -> V:
        """``make(name, status)``, made once for stack ``name``'s ``status``."""
        known = self._made.get((name, id(status)))
        if known is not None and known[0] is status:
            return known[1]
        made = self.make(name, status)
        if len(self._made) >= self.size:
            self._made.clear()
        self._made[(name, id(status))] = (status, made)
        return made


@dataclass(frozen=True, slots=True)
class StackSeen:
    """What a device reports of one stack, as much as a deployment step needs.

    The report itself (``status``) is kept only where a step may have to explain something:
    a stack not running, or one whose services restarted or failed. A healthy stack on
    10,000 devices is then a handful of shared values instead of 10,000 parsed reports
    (issue 21: the controller's memory per device).
    """

    spec_hash: str
    state: str
    restarts: int
    error: str | None
    status: StackStatus | None

    @classmethod
    def of(cls, status: StackStatus) -> StackSeen:
        return _OF_STATUS.get("", status)

    @classmethod
    def _of(cls, status: StackStatus) -> StackSeen:
        restarts = sum(s.restarts for s in status.services.values())
        error = next((s.last_error for s in status.services.values() if s.last_error), None)
        plain = status.state == "running" and not restarts and error is None
        if not plain:
            return cls(status.spec_hash, status.state, restarts, error, status)
        return _PLAIN.get(
            (status.spec_hash, status.state), lambda: cls(status.spec_hash, status.state, 0, None, None)
        )


_OF_STATUS: MadeOf[StackSeen] = MadeOf(lambda _, status: StackSeen._of(status))
""":meth:`StackSeen.of` of each stack status seen lately."""
_PLAIN: Shared[tuple[str, str], StackSeen] = Shared()
"""One shared :class:`StackSeen` per (version, state) of a stack that runs without a blip."""


class Seen(NamedTuple):
    """What a deployment step needs of one device (:meth:`~.scheduling.Scheduler.fleet_view`).

    Immutable, a named tuple rather than a frozen dataclass: one is made per report (two per
    device and deploy), and a frozen dataclass's ``__init__`` sets each of its 11 fields
    through ``object.__setattr__`` (2.3 us against 0.9 us)."""

    attributes: Attributes
    online: bool
    held: bool
    error: str | None
    stacks: dict[str, StackSeen]
    """Per stack, what the device reports (:class:`StackSeen`)."""
    downloads: dict[str, DownloadStatus]
    generation: int = -1
    """The generation the device reports having applied (-1: none reported)."""
    status: str = "never seen"
    revoked: bool = False
    public_key: str | None = None
    """What scheduling needs besides (see :meth:`~.scheduling.Scheduler.recompute`)."""
    storage_error: str | None = None
    """What fleet events need besides (see :meth:`~.fleet_events.ReportSummary.of_seen`)."""

    @classmethod
    def of(cls, device: Device) -> Seen:
        return cls(
            device.attributes(),
            device.status == "online",
            False,
            None,
            _NOTHING,
            _NOTHING,
            status=device.status,
            revoked=device.revoked,
            public_key=device.public_key,
        ).reporting(device.reported)

    def present(self, device: Device) -> Seen:
        """The same device with the presence, attributes and keys of ``device`` (its reported
        state left as seen: a presence does not change it)."""
        return self._replace(
            attributes=device.attributes(),
            online=device.status == "online",
            status=device.status,
            revoked=device.revoked,
            public_key=device.public_key,
        )

    def reporting(self, reported: ReportedState | None) -> Seen:
        """The same device with another reported state (fields given in order, not by name:
        one per report, and a named tuple's keywords cost a third more)."""
        if reported is None:
            return Seen(self.attributes, self.online, False, None, _NOTHING, _NOTHING, -1, *self[7:10], None)
        return Seen(
            self.attributes,
            self.online,
            reported.held,
            reported.error or None,
            _stacks_seen(reported.stacks),
            reported.downloads or _NOTHING,
            reported.generation,
            self.status,
            self.revoked,
            self.public_key,
            reported.storage_error,
        )

    def observe(self, stack: str) -> Observation:
        seen = self.stacks.get(stack)
        download = self.downloads.get(stack)
        if seen is None:
            if download is None and self.error is None:  # the common case, shared (Observation is frozen)
                return _ABSENT[(self.online, self.held)]
            return Observation(online=self.online, held=self.held, error=self.error, download=download)
        if seen.status is None and download is None and self.error is None:
            # A stack running without a blip: one shared Observation per (version, state,
            # presence), not one per device and deployment step (kept while a deployment is).
            return _PLAIN_OBSERVED.get(
                (seen.spec_hash, seen.state, self.online, self.held),
                lambda: Observation(
                    online=self.online, spec_hash=seen.spec_hash, state=seen.state, held=self.held
                ),
            )
        return Observation(
            online=self.online,
            spec_hash=seen.spec_hash,
            state=seen.state,
            held=self.held,
            error=self.error or seen.error,
            restarts=seen.restarts,
            status=seen.status,
            download=download,
        )


_NOTHING: dict = {}  # type: ignore[type-arg]
"""Shared by every device that reports no stack or no download (never written to)."""
_PLAIN_OBSERVED: Shared[tuple[str, str, bool, bool], Observation] = Shared()
"""What :meth:`Seen.observe` makes of a :class:`StackSeen` without a report kept."""
_STACKS_SEEN: Shared[tuple[tuple[str, StackSeen], ...], dict[str, StackSeen]] = Shared()
"""One dict per set of plain :class:`StackSeen` a device reports (:func:`_stacks_seen`)."""


def _stacks_seen(stacks: dict[str, StackStatus]) -> dict[str, StackSeen]:
    """Per stack, :meth:`StackSeen.of` of what a device reports: where every stack runs
    without a blip (shared values), the one dict of those values that devices reporting the
    same share (never written to: 184 bytes per device otherwise). Made once per stacks dict
    (reports decoded alike share theirs: ``codec.FieldMemo``)."""
    return _SEEN_OF_STACKS.get(stacks)


def _make_stacks_seen(stacks: dict[str, StackStatus]) -> dict[str, StackSeen]:
    seen = {n: StackSeen.of(s) for n, s in stacks.items()}
    if not seen or any(s.status is not None for s in seen.values()):
        return seen or _NOTHING
    # plain StackSeen values hash by (version, state): no report in them
    return _STACKS_SEEN.get(tuple(seen.items()), lambda: seen)


_SEEN_OF_STACKS: MadeOnce[dict[str, StackStatus], dict[str, StackSeen]] = MadeOnce(_make_stacks_seen)
""":func:`_stacks_seen` of each stacks dict seen lately."""

_ABSENT = {
    (online, held): Observation(online=online, held=held)
    for online in (False, True)
    for held in (False, True)
}
"""What a device that reports nothing of a stack (no error, no download) is observed as."""


def stack_state(
    ref: StackRef | None,
    desired_generation: int,
    report: tuple[int | None, str | None, str | None, str | None],
) -> str | None:
    """The state of a stack on one device (StackDeviceRow's ``state``), from the reference its
    desired state holds (None: not desired) and what it reports: (generation, error, the
    version and the state it reports of the stack) as :meth:`Store.stack_reports` gives them.
    None if the device neither should run the stack nor reports it."""
    generation, error, spec_hash, state = report
    if ref is None:
        return None if spec_hash is None else "removing"
    if spec_hash != ref.spec_hash:
        rejected = error and generation is not None and generation < desired_generation
        return "rejected" if rejected else "pending"
    return str(state)


NO_REPORT: tuple[int | None, str | None, str | None, str | None] = (None, None, None, None)


Desired = tuple[int, tuple[StackRef, ...]]
"""Of a device's desired record, what :class:`StackCounts` needs: its generation and stacks
(the record's own tuple, not a copy)."""


def desired(record: DesiredRecord) -> Desired:
    return record.generation, record.stacks


def device_stack_states(record: Desired, seen: Seen | None) -> tuple[tuple[str, str], ...]:
    """(stack, :func:`stack_state`) of each stack a device whose desired record says ``record``
    should run or reports (``seen``: the device in the fleet view; None: never seen)."""
    generation, refs = record
    names = {r.name: r for r in refs}
    reported = seen.stacks if seen is not None else _NOTHING
    out = []
    for name in sorted(names.keys() | reported.keys()):
        stack = reported.get(name)
        report = (  # a device without a report: generation -1, no error, no stack (the same states)
            NO_REPORT
            if seen is None
            else (
                seen.generation,
                seen.error,
                stack.spec_hash if stack else None,
                stack.state if stack else None,
            )
        )
        state = stack_state(names.get(name), generation, report)
        if state is not None:
            out.append((name, state))
    return tuple(out)


class StackCounts:
    """Per stack, how many devices with a desired record should run or report it, and how many
    of those run it (``stacks ls``), kept up to date device by device: see
    :meth:`~.scheduling.Scheduler.stack_counts`."""

    def __init__(self, records: dict[str, Desired]) -> None:
        self.records = records
        """Every device's desired record (what counts of it), as stored."""
        self.counts: dict[str, tuple[int, int]] = {}
        self._states: dict[str, tuple[tuple[str, str], ...]] = {}
        self._shared: dict[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]] = {}
        """One tuple per distinct content: 10,000 devices running the same stacks share one."""

    def update(self, fleet: dict[str, Seen], devices: Iterable[str] | None) -> None:
        """Count ``devices`` again (None: every device) as ``fleet`` and :attr:`records` say."""
        if devices is None:
            self.counts, self._states = {}, {}
            devices = list(self.records)
        counts = self.counts
        for device_id in devices:
            for name, state in self._states.pop(device_id, ()):
                n, running = counts[name]
                counts[name] = (n - 1, running - (state == "running"))
            record = self.records.get(device_id)
            if record is None:
                continue
            states = device_stack_states(record, fleet.get(device_id))
            if not states:
                continue
            if len(self._shared) >= 4096:
                self._shared.clear()
            self._states[device_id] = self._shared.setdefault(states, states)
            for name, state in states:
                n, running = counts.get(name, (0, 0))
                counts[name] = (n + 1, running + (state == "running"))
