"""A simulated runtime: instances are records that take a while to start.

:class:`SimDriver` implements :class:`tether.agent.drivers.base.Driver` for one simulated
device. A real driver's ``create`` (and ``start``) returns once the container runs (the
docker driver starts it before returning; the agent's event says "created and started"),
so a real agent's reconcile reports the services it created all running, at the end of a
call that took the time they needed to start. The simulator cannot block its one event
loop, so ``create`` returns at once with the instance ``running`` and records when the
call would have returned: :meth:`SimDriver.take_busy` (each instance draws its start time
uniformly from ``start_delay * [1 - jitter, 1 + jitter]``, standing for pulling and
starting a container; instances a reconcile creates start side by side). The simulated
device (:class:`~tether.sim.fleet.SimDevice`) holds back what its agent published in that
reconcile until then, and handles what arrives meanwhile after it, as the real agent's
busy reconcile thread would. A device told to fail (``fail=True``) has every create raise
:class:`~tether.protocol.errors.DriverError`, as a device without the image or with a
broken engine would; a service labelled ``tether.sim/fail`` fails on every device.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator

from tether.agent.drivers.base import Observed
from tether.protocol.errors import DriverError
from tether.protocol.models import JobSpec, ServiceSpec, StackSpec

LABEL_FAIL = "tether.sim/fail"
"""A service with this label fails to start on every simulated device (the value is the message)."""


class SimDriver:
    """One simulated device's runtime."""

    name = "sim"

    def __init__(
        self,
        device_id: str,
        *,
        start_delay: float = 0.2,
        jitter: float = 0.25,
        fail: bool = False,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.device_id = device_id
        self.start_delay = start_delay
        self.jitter = jitter
        self.fail = fail
        self.clock = clock
        self.rng = rng or random.Random()
        self.instances: dict[str, Observed] = {}
        self._ids = itertools.count(1)
        self.creates = 0
        self._busy_until: float | None = None
        self.changes = 0
        """Counts every change to the runtime (create, start, remove, crash)."""
        self.on_change: Callable[[], None] | None = None
        """Called when the runtime changes outside the agent's calls (:meth:`crash`)."""

    def observe(self) -> list[Observed]:
        return list(self.instances.values())

    def take_busy(self) -> float | None:
        """When the creates and starts since the last call would have returned (on :attr:`clock`):
        the latest start among them; None if there was none. Resets."""
        busy, self._busy_until = self._busy_until, None
        return busy

    def _starting(self) -> None:
        """An instance starts: the call returns after its (jittered) start delay."""
        self.changes += 1
        delay = self.start_delay
        if delay > 0 and self.jitter:
            delay *= self.rng.uniform(1 - self.jitter, 1 + self.jitter)
        if delay > 0:
            until = self.clock() + delay
            if self._busy_until is None or until > self._busy_until:
                self._busy_until = until

    def create(self, stack: str, stack_spec: StackSpec, service: ServiceSpec) -> None:
        self.creates += 1
        if self.fail:
            raise DriverError(f"{stack}/{service.name}: simulated failure on {self.device_id}")
        if LABEL_FAIL in service.labels:
            raise DriverError(f"{stack}/{service.name}: {service.labels[LABEL_FAIL] or 'simulated failure'}")
        self._starting()
        inst_id = f"sim-{self.device_id}-{next(self._ids)}"
        self.instances[inst_id] = Observed(inst_id, stack, service.name, service.spec_hash(), "running")

    def start(self, instance: Observed, service: ServiceSpec) -> None:
        inst = self.instances.get(instance.id)
        if inst is None:
            raise DriverError(f"no instance {instance.id}")
        self._starting()
        self.instances[instance.id] = dataclasses.replace(inst, state="running", exit_code=None)

    def signal(self, instance: Observed, signame: str) -> None:
        if instance.id not in self.instances:
            raise DriverError(f"no instance {instance.id}")

    def remove(self, instance: Observed, grace: float) -> None:
        self.changes += 1
        self.instances.pop(instance.id, None)

    def logs(self, instance: Observed, tail: int) -> str:
        return ""

    def log_stream(
        self, instance: Observed, tail: int | None, since: float | None, follow: bool, stop: threading.Event
    ) -> Iterator[str]:
        """Simulated instances write nothing."""
        if instance.id not in self.instances:
            raise DriverError(f"no instance {instance.id}")
        return iter(())

    def usage(self) -> dict[str, tuple[float | None, int | None]]:
        """Nothing measured: a simulated instance uses no CPU or memory of its own."""
        return {}

    def run_job(self, job: JobSpec) -> tuple[int | None, str, bool]:
        raise DriverError("a simulated device runs no jobs")

    def prune(self, stacks: set[str]) -> None:
        return None

    def close(self) -> None:
        return None

    def crash(self, stack: str, service: str, exit_code: int = 1) -> None:
        """Make the instances of ``stack``/``service`` exit (for tests)."""
        self.changes += 1
        if self.on_change is not None:
            self.on_change()
        for inst_id, inst in self.instances.items():
            if (inst.stack, inst.service) == (stack, service):
                self.instances[inst_id] = dataclasses.replace(inst, state="exited", exit_code=exit_code)
