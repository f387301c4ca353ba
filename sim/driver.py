"""A simulated runtime: instances are records that become ``running`` after a delay.

:class:`SimDriver` implements :class:`tether.agent.drivers.base.Driver` for one simulated
device. ``create`` returns at once with the instance ``starting``; it turns ``running``
``start_delay`` seconds later (each instance draws its delay uniformly from
``start_delay * [1 - jitter, 1 + jitter]``), which stands for the time a real driver spends
pulling and starting a container. A device told to fail (``fail=True``) has every create
raise :class:`~tether.protocol.errors.DriverError`, as a device without the image or with
a broken engine would; a service labelled ``tether.sim/fail`` fails on every device.
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


@dataclasses.dataclass
class _Instance:
    observed: Observed
    ready_at: float


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
        self.instances: dict[str, _Instance] = {}
        self._ids = itertools.count(1)
        self.creates = 0

    def observe(self) -> list[Observed]:
        now = self.clock()
        out = []
        for inst in self.instances.values():
            if inst.observed.state == "starting" and now >= inst.ready_at:
                inst.observed = dataclasses.replace(inst.observed, state="running")
            out.append(inst.observed)
        return out

    def all_up_at(self) -> float | None:
        """When every starting instance will be running (the latest start); None if none is starting.

        A real driver's ``create`` returns once the container runs, so a real agent's
        reconcile creates every service and reports them all running at once: a simulated
        device reconciles again at this moment, not once per instance.
        """
        pending = [i.ready_at for i in self.instances.values() if i.observed.state == "starting"]
        return max(pending) if pending else None

    def create(self, stack: str, stack_spec: StackSpec, service: ServiceSpec) -> None:
        self.creates += 1
        if self.fail:
            raise DriverError(f"{stack}/{service.name}: simulated failure on {self.device_id}")
        if LABEL_FAIL in service.labels:
            raise DriverError(f"{stack}/{service.name}: {service.labels[LABEL_FAIL] or 'simulated failure'}")
        delay = self.start_delay
        if delay > 0 and self.jitter:
            delay *= self.rng.uniform(1 - self.jitter, 1 + self.jitter)
        inst_id = f"sim-{self.device_id}-{next(self._ids)}"
        state = "starting" if delay > 0 else "running"
        observed = Observed(inst_id, stack, service.name, service.spec_hash(), state)  # type: ignore[arg-type]
        self.instances[inst_id] = _Instance(observed, self.clock() + delay)

    def start(self, instance: Observed, service: ServiceSpec) -> None:
        inst = self.instances.get(instance.id)
        if inst is None:
            raise DriverError(f"no instance {instance.id}")
        inst.observed = dataclasses.replace(inst.observed, state="starting", exit_code=None)
        inst.ready_at = self.clock() + self.start_delay

    def signal(self, instance: Observed, signame: str) -> None:
        if instance.id not in self.instances:
            raise DriverError(f"no instance {instance.id}")

    def remove(self, instance: Observed, grace: float) -> None:
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
        for inst in self.instances.values():
            if (inst.observed.stack, inst.observed.service) == (stack, service):
                inst.observed = dataclasses.replace(inst.observed, state="exited", exit_code=exit_code)
