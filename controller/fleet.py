"""The fleet as the controller's deployment steps see it: one :class:`Seen` per device.

Kept in memory by the controller (:meth:`~.service.Controller.fleet_view`) and updated
from what the store says it wrote, so a step over 10,000 devices parses no device row.
"""

from __future__ import annotations

from dataclasses import dataclass

from tether.protocol.models import DownloadStatus, ReportedState, StackStatus

from .models import Device
from .rollout import Observation
from .selectors import Attributes


@dataclass(frozen=True, slots=True)
class Seen:
    """What a deployment step needs of one device (:meth:`~.service.Controller.fleet_view`)."""

    attributes: Attributes
    online: bool
    held: bool
    error: str | None
    stacks: dict[str, StackStatus]
    """Per stack, what the device reports (the parsed models, shared with the report)."""
    downloads: dict[str, DownloadStatus]
    generation: int = -1
    """The generation the device reports having applied (-1: none reported)."""
    status: str = "never seen"
    revoked: bool = False
    public_key: str | None = None
    """What scheduling needs besides (see :meth:`~.service.Controller.recompute`)."""

    @classmethod
    def of(cls, device: Device) -> Seen:
        return cls(
            device.attributes(),
            device.status == "online",
            False,
            None,
            {},
            {},
            status=device.status,
            revoked=device.revoked,
            public_key=device.public_key,
        ).reporting(device.reported)

    def reporting(self, reported: ReportedState | None) -> Seen:
        """The same device with another reported state."""
        return Seen(
            attributes=self.attributes,
            online=self.online,
            status=self.status,
            revoked=self.revoked,
            public_key=self.public_key,
            held=bool(reported and reported.held),
            error=reported.error if reported and reported.error else None,
            stacks=reported.stacks if reported else {},
            downloads=reported.downloads if reported else {},
            generation=reported.generation if reported else -1,
        )

    def observe(self, stack: str) -> Observation:
        status = self.stacks.get(stack)
        download = self.downloads.get(stack)
        if status is None:
            if download is None and self.error is None:  # the common case, shared (Observation is frozen)
                return _ABSENT[(self.online, self.held)]
            return Observation(online=self.online, held=self.held, error=self.error, download=download)
        error = self.error or next((s.last_error for s in status.services.values() if s.last_error), None)
        return Observation(
            online=self.online,
            spec_hash=status.spec_hash,
            state=status.state,
            held=self.held,
            error=error,
            restarts=sum(s.restarts for s in status.services.values()),
            status=status,
            download=download,
        )


_ABSENT = {
    (online, held): Observation(online=online, held=held)
    for online in (False, True)
    for held in (False, True)
}
"""What a device that reports nothing of a stack (no error, no download) is observed as."""
