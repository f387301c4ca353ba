"""The driver interface and what a driver observes.

A driver runs service instances (containers or host processes) and reports what exists.
It must only ever see and touch instances it created for *this* device: everything it
creates carries :data:`LABEL_MANAGED` and :data:`LABEL_DEVICE` (or the equivalent record).
Drivers are synchronous (docker-py blocks); the agent calls them from its own thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

from tether.protocol.models import HealthState, JobSpec, ServiceSpec, StackSpec

LABEL_MANAGED = "io.tether.managed"
LABEL_DEVICE = "io.tether.device"
LABEL_STACK = "io.tether.stack"
LABEL_SERVICE = "io.tether.service"
LABEL_SPEC_HASH = "io.tether.spec-hash"
LABEL_STOP_GRACE = "io.tether.stop-grace"
HEALTH_OUTPUT_CHARS = 500
"""The most of a failing health check's output an instance reports (its end)."""

InstanceState = Literal["running", "starting", "restarting", "exited"]


@dataclass(frozen=True, init=False)
class Observed:
    """One instance of a service as the driver sees it now."""

    id: str
    stack: str
    service: str
    spec_hash: str
    state: InstanceState
    exit_code: int | None = None
    health: HealthState | None = None
    error: str | None = None
    stop_grace: float | None = None
    """The service's stop grace period, recorded at creation: used once the spec is gone."""
    health_output: str | None = None
    """The output of the last failing health check, while ``health`` is ``unhealthy``."""

    def __init__(
        self,
        id: str,  # noqa: A002 (the field's name)
        stack: str,
        service: str,
        spec_hash: str,
        state: InstanceState,
        exit_code: int | None = None,
        health: HealthState | None = None,
        error: str | None = None,
        stop_grace: float | None = None,
        health_output: str | None = None,
    ) -> None:
        # The generated __init__ of a frozen dataclass sets each field through
        # object.__setattr__: 2.9 us for these ten, against 1.2 us for one update of the
        # instance's dict. Drivers make one per instance at every observe (the simulator, one
        # per create). Same fields, order and defaults (tests/unit/test_drivers_base.py).
        self.__dict__.update(
            id=id,
            stack=stack,
            service=service,
            spec_hash=spec_hash,
            state=state,
            exit_code=exit_code,
            health=health,
            error=error,
            stop_grace=stop_grace,
            health_output=health_output,
        )


class Driver(Protocol):
    """What the agent needs from a runtime."""

    name: str

    def observe(self) -> list[Observed]:
        """Every instance this driver created for this device, whatever its state."""
        ...

    def create(self, stack: str, stack_spec: StackSpec, service: ServiceSpec) -> None:
        """Create and start an instance of ``service`` (pull its image first if needed)."""
        ...

    def start(self, instance: Observed, service: ServiceSpec) -> None:
        """Start an existing instance that has exited."""
        ...

    def remove(self, instance: Observed, grace: float) -> None:
        """Stop (SIGTERM, then SIGKILL after ``grace`` seconds) and delete an instance."""
        ...

    def signal(self, instance: Observed, signame: str) -> None:
        """Send ``signame`` (a signal name such as ``SIGHUP``) to a running instance's main process
        (a config file it reads changed: ``change_mode: signal``)."""
        ...

    def logs(self, instance: Observed, tail: int) -> str:
        """The last ``tail`` lines of an instance's output ("" if none)."""
        ...

    def log_stream(
        self, instance: Observed, tail: int | None, since: float | None, follow: bool, stop: threading.Event
    ) -> Iterator[str]:
        """An instance's output as text chunks, for remote ``logs``: the last ``tail`` lines
        (all if None) of what it wrote at or after ``since`` (epoch seconds; None: any time);
        with ``follow``, then what it writes, until ``stop`` is set (the iterator then ends
        within a second) or, where the runtime says so, the instance stops.

        Called on a worker thread, not the agent's: it must not change the driver's state.
        Raises :class:`DriverError` if the instance is gone or ``since`` is not supported.
        """
        ...

    def usage(self) -> dict[str, tuple[float | None, int | None]]:
        """Per running instance, ``"stack/service"`` to (CPU seconds used since it started,
        memory in use in bytes), for metrics. Read-only: called on the metrics thread."""
        ...

    def run_job(self, job: JobSpec) -> tuple[int | None, str, bool]:
        """Run an edge job to completion: (exit code or None, output, timed out)."""
        ...

    def prune(self, stacks: set[str]) -> None:
        """Delete stack-level resources (networks...) of stacks not in ``stacks``."""
        ...

    def close(self) -> None:
        """Release the driver's resources; running instances keep running."""
        ...


def instance_name(device_id: str, stack: str, service: str) -> str:
    """The name of a service instance: unique per device, readable in `docker ps`."""
    return f"tether-{device_id}-{stack}-{service}"
