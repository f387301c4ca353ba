"""The fake driver: service instances are records in memory. It exists for fast tests.

Like Nomad's mock driver, it is scripted through service labels:

* ``tether.fake/start_error``: :meth:`FakeDriver.create` raises :class:`DriverError` with
  this message and leaves nothing behind;
* ``tether.fake/exit_code``: the instance is created already exited with this code;
* ``tether.fake/logs``: the instance's output, as :meth:`FakeDriver.logs` returns it.

Tests change the world behind the agent's back with :meth:`FakeDriver.crash`,
:meth:`FakeDriver.remove_by_hand` and :meth:`FakeDriver.add`. Several drivers may share
one ``host`` dict (one machine, several devices); each only sees its own device's instances.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections.abc import Iterator

from tether.protocol.errors import DriverError
from tether.protocol.models import JobSpec, ServiceSpec, StackSpec

from .base import Observed

LABEL_START_ERROR = "tether.fake/start_error"
LABEL_EXIT_CODE = "tether.fake/exit_code"
LABEL_LOGS = "tether.fake/logs"

Host = dict[str, tuple[str, Observed]]
"""Instance id -> (device id, instance)."""


class FakeDriver:
    """Runs nothing: keeps instances in a dict, in the order they were created."""

    name = "fake"

    def __init__(self, device_id: str = "fake", host: Host | None = None) -> None:
        self.device_id = device_id
        self.host: Host = {} if host is None else host
        self._ids = itertools.count(1)
        self._output: dict[str, str] = {}
        self.signals: list[tuple[str, str, str]] = []

    def observe(self) -> list[Observed]:
        return [inst for device, inst in self.host.values() if device == self.device_id]

    def create(self, stack: str, stack_spec: StackSpec, service: ServiceSpec) -> None:
        if LABEL_START_ERROR in service.labels:
            raise DriverError(service.labels[LABEL_START_ERROR])
        code = service.labels.get(LABEL_EXIT_CODE)
        inst = Observed(
            id=f"fake-{self.device_id}-{next(self._ids)}",
            stack=stack,
            service=service.name,
            spec_hash=service.spec_hash(),
            state="running" if code is None else "exited",
            exit_code=None if code is None else int(code),
        )
        self.add(inst)
        self._output[inst.id] = service.labels.get(LABEL_LOGS, "")

    def start(self, instance: Observed, service: ServiceSpec) -> None:
        current = self._get(instance.id)
        self.add(dataclasses.replace(current, state="running", exit_code=None))

    def signal(self, instance: Observed, signame: str) -> None:
        self._get(instance.id)
        self.signals.append((instance.stack, instance.service, signame))

    def remove(self, instance: Observed, grace: float) -> None:
        if self.host.get(instance.id, ("", None))[0] == self.device_id:
            del self.host[instance.id]

    def logs(self, instance: Observed, tail: int) -> str:
        lines = self._output.get(instance.id, "").splitlines()
        return "\n".join(lines[-tail:]) if tail > 0 else ""

    def log_stream(
        self, instance: Observed, tail: int | None, since: float | None, follow: bool, stop: threading.Event
    ) -> Iterator[str]:
        """The output (``since`` is ignored: fake output has no timestamps); following, what :meth:`emit` adds."""
        if instance.id not in self.host:
            raise DriverError(f"{instance.stack}/{instance.service}: the instance is gone")
        text = self._output.get(instance.id, "")
        lines = text.splitlines(keepends=True)
        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []
        if lines:
            yield "".join(lines)
        pos = len(text)
        while follow and not stop.wait(0.05):
            text = self._output.get(instance.id, "")
            if len(text) > pos:
                yield text[pos:]
                pos = len(text)

    def usage(self) -> dict[str, tuple[float | None, int | None]]:
        return {f"{i.stack}/{i.service}": (0.0, 0) for i in self.observe() if i.state == "running"}

    def prune(self, stacks: set[str]) -> None:
        return None

    def close(self) -> None:
        return None

    # --- for tests ---

    def emit(self, instance_id: str, text: str) -> None:
        """Append ``text`` to an instance's output, as if it had written it."""
        self._output[instance_id] = self._output.get(instance_id, "") + text

    def add(self, instance: Observed) -> None:
        """Put ``instance`` on this device as it is (any id, hash or state)."""
        self.host[instance.id] = (self.device_id, instance)

    def crash(self, stack: str, service: str, exit_code: int) -> None:
        """Make the running instance of ``stack``/``service`` exit with ``exit_code``."""
        found = [i for i in self.observe() if (i.stack, i.service, i.state) == (stack, service, "running")]
        if not found:
            raise LookupError(f"no running instance of {stack}/{service}")
        for inst in found:
            self.add(dataclasses.replace(inst, state="exited", exit_code=exit_code))

    def remove_by_hand(self, stack: str, service: str) -> None:
        """Delete every instance of ``stack``/``service``, as an operator's `docker rm -f` would."""
        for inst in self.observe():
            if (inst.stack, inst.service) == (stack, service):
                del self.host[inst.id]

    def _get(self, instance_id: str) -> Observed:
        entry = self.host.get(instance_id)
        if entry is None or entry[0] != self.device_id:
            raise DriverError(f"no instance {instance_id}")
        return entry[1]

    def run_job(self, job: JobSpec) -> tuple[int | None, str, bool]:
        """Jobs "run" instantly: exit code from ``TETHER_FAKE_EXIT`` in the job's environment."""
        return int(job.environment.get("TETHER_FAKE_EXIT", "0")), f"fake run of {job.name}\n", False
