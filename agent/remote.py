"""Remote operations: requests to this device over MQTT, answered on the client's reply topic.

Theory of operation
-------------------
The agent subscribes to ``tether/v1/devices/{id}/requests``; :class:`~.core.AgentCore`
hands every message there to :func:`.request_gate.handle_request`, on the agent's thread,
which passes valid ones to :meth:`RemoteOps.execute` (set as ``core.remote``). The wire
format is in :mod:`tether.protocol.device_api` and docs/topics.md ("Remote operations").

* **Validation.** A payload that is not a msgpack map, or whose ``reply_to`` is not a
  ``tether/v1/clients/{client_id}/replies`` topic, is logged and ignored: the agent never
  publishes a reply anywhere else. Anything else that is wrong (no ``id``, an unknown
  ``kind``, a bad field, a stack that is not on the device) gets ``ok: false`` with one
  line saying what.
* **Delivery.** The agent subscribes to its requests at QoS 0 (:func:`.request_gate.subscription_qos`):
  its MQTT session is persistent, and at QoS 1 the broker would queue a request sent while
  the device is away and deliver it on reconnect, long after the client gave up. A request
  is carried out now or never; a client that gets no answer says so and may ask again.
* **Threads.** The agent's thread must stay free for reconciling, so only what is quick
  and must not race the reconciler runs there: finding the instances (``observe``),
  ``restart`` (remove the instances, then reconcile at once, which creates new ones), and
  the bookkeeping of ``stream`` and ``metrics.live``. Reading logs, following them and
  gathering facts run on worker threads (at most :data:`MAX_OPERATIONS` at a time; beyond
  that the reply says the device is busy) and publish through the MQTT client, which is
  thread-safe. Workers only read: :meth:`Driver.log_stream` must not change driver state.
* **Streams** (``logs`` with ``follow``) are bounded: each is a lease of ``duration``
  seconds that its client extends with ``stream``/``extend``, so a client that vanishes
  costs the device at most one lease. Output is batched into chunks of at most
  :data:`~tether.protocol.device_api.CHUNK_BYTES` a few times a second, limited to
  :data:`STREAM_RATE` bytes per second after an initial burst (what is left out is counted
  and marked in the text), with an empty chunk as a heartbeat when there is nothing to say.
  A stream ends when its lease runs out, when cancelled, when every followed instance
  stopped (docker), when the agent stops, or when the link is lost.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.protocol import topics
from tether.protocol.device_api import (
    CHUNK_BYTES,
    HEARTBEAT_S,
    MAX_LOG_BYTES,
    DeviceReply,
    FactsCommand,
    LiveResult,
    LogChunk,
    LogsCommand,
    LogsResult,
    LogText,
    MetricsLiveCommand,
    RestartCommand,
    RestartedService,
    RestartResult,
    StreamCommand,
    StreamEnd,
    StreamEndReason,
)
from tether.protocol.errors import DriverError, TetherError
from tether.protocol.models import DeviceFacts, Request
from tether.protocol.topics import DeviceTopic

from . import metrics
from .drivers.base import Observed
from .host import host_facts
from .request_gate import publish_reply

if TYPE_CHECKING:
    from .config import AgentConfig
    from .core import AgentCore

log = logging.getLogger(__name__)

MAX_OPERATIONS = 8
"""Remote operations running on worker threads at once (log reads, streams, facts)."""
STREAM_RATE = 64 * 1024
"""Bytes per second a stream may send once its initial burst (:data:`MAX_LOG_BYTES`) is spent."""
FLUSH_S = 0.2
"""A stream sends what it has gathered at least this often."""


class RemoteError(TetherError):
    """A remote operation was refused: the message goes back to the client."""


# --- operations -----------------------------------------------------------------------------


@dataclass
class _Stream:
    reply_to: str
    request_id: str
    deadline: float
    stop: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    seq: int = 0


class RemoteOps:
    """Carries out this device's remote operations (see the module docstring)."""

    def __init__(
        self,
        core: AgentCore,
        data_dir: Path,
        *,
        live: metrics.LiveMetrics | None = None,
        max_operations: int = MAX_OPERATIONS,
    ) -> None:
        self.core = core
        self.data_dir = Path(data_dir)
        self.live = live
        self.max_operations = max_operations
        self.closing = threading.Event()
        self._slots = threading.BoundedSemaphore(max_operations)
        self._lock = threading.Lock()
        self._streams: dict[tuple[str, str], _Stream] = {}
        self._threads: set[threading.Thread] = set()

    # --- plumbing ---

    def reply(self, request: Request, reply: DeviceReply) -> bool:
        return publish_reply(self.core.link, request.reply_to, reply)

    def execute(self, request: Request, command: Any) -> None:
        """Carry out a validated command (on the agent's thread); every failure is answered."""
        handlers: dict[type, Callable[[Request, Any], None]] = {
            LogsCommand: self._logs,
            RestartCommand: self._restart,
            FactsCommand: self._facts,
            MetricsLiveCommand: self._live,
            StreamCommand: self._stream,
        }
        try:
            handlers[type(command)](request, command)
        except TetherError as exc:
            log.info("device request %s (%s) refused: %s", request.id, command.kind, exc)
            self.reply(request, DeviceReply(id=request.id, ok=False, error=str(exc)))
        except Exception as exc:
            log.exception("device request %s (%s) failed", request.id, command.kind)
            self.reply(
                request,
                DeviceReply(
                    id=request.id, ok=False, error=f"internal error: {exc.__class__.__name__}: {exc}"
                ),
            )

    def _spawn(self, name: str, work: Callable[[], None]) -> None:
        """Run ``work`` on a worker thread, holding one of the operation slots."""
        if self.closing.is_set():
            raise RemoteError(f"device {self.core.device_id} is shutting down")
        if not self._slots.acquire(blocking=False):
            raise RemoteError(
                f"device {self.core.device_id} is busy: {self.max_operations} remote operations "
                "are running; try again later"
            )

        def run() -> None:
            try:
                work()
            finally:
                self._slots.release()
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=f"remote-{name}", daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _worker(self, request: Request, kind: str, compute: Callable[[], Any]) -> None:
        """Compute a result on a worker thread and reply with it (or with the error)."""

        def work() -> None:
            try:
                result = compute()
                reply = DeviceReply(id=request.id, ok=True, result=result)
            except TetherError as exc:
                reply = DeviceReply(id=request.id, ok=False, error=str(exc))
            except Exception as exc:
                log.exception("device request %s (%s) failed", request.id, kind)
                reply = DeviceReply(
                    id=request.id, ok=False, error=f"internal error: {exc.__class__.__name__}: {exc}"
                )
            self.reply(request, reply)

        self._spawn(kind, work)

    def close(self) -> None:
        """Stop every stream and worker (they say goodbye to their clients first), at most a few seconds."""
        self.closing.set()
        with self._lock:
            for stream in self._streams.values():
                stream.stop.set()
            threads = list(self._threads)
        deadline = time.monotonic() + 5.0
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.live is not None:
            self.live.stop()

    # --- presence facts ---

    def extend_facts(self, facts: DeviceFacts) -> DeviceFacts:
        """``facts`` with the host's static facts, read now (for the ``online`` presence)."""
        try:
            host = host_facts(self.core.driver, self.data_dir, self.core.clock())
        except Exception:  # noqa: BLE001 - presence must go out whatever the host says
            log.exception("could not read host facts")
            return facts
        extra = host.model_dump(
            include={
                "kernel",
                "cpu_count",
                "cpu_model",
                "memory_total",
                "disk_total",
                "docker_version",
                "addresses",
            }
        )
        return DeviceFacts.model_validate({**facts.model_dump(), **extra})

    # --- commands ---

    def _instances(self, stack: str, service: str | None) -> list[Observed]:
        """The instances of ``stack`` (or of one service), in the stack's service order."""
        desired, _hashes = self.core.desired_stacks()
        spec = desired.get(stack)
        try:
            observed = [i for i in self.core.driver.observe() if i.stack == stack]
        except DriverError as exc:
            raise RemoteError(str(exc)) from exc
        device = self.core.device_id
        if spec is None and not observed:
            raise RemoteError(f"stack {stack!r} is not on device {device}")
        order = [s.name for s in spec.services] if spec else []
        if service is not None:
            if service not in order and not any(i.service == service for i in observed):
                raise RemoteError(f"stack {stack!r} has no service {service!r} on device {device}")
            observed = [i for i in observed if i.service == service]
        if not observed:
            what = f"{stack}/{service}" if service else f"stack {stack!r}"
            raise RemoteError(f"{what} has no instance on device {device} yet")
        rank = {name: n for n, name in enumerate(order)}
        return sorted(observed, key=lambda i: (rank.get(i.service, len(rank)), i.service, i.id))

    def _since(self, cmd: LogsCommand) -> float | None:
        return None if cmd.since is None else self.core.clock() - cmd.since

    def _logs(self, request: Request, cmd: LogsCommand) -> None:
        instances = self._instances(cmd.stack, cmd.service)
        if cmd.follow:
            self._follow(request, cmd, instances)
            return
        driver = self.core.driver
        since = self._since(cmd)

        def read() -> Any:
            parts = []
            cut = False
            for inst in instances:
                kept: collections.deque[str] = collections.deque()
                size = 0
                for text in driver.log_stream(inst, cmd.tail, since, False, self.closing):
                    kept.append(text)
                    size += len(text)
                    while size > MAX_LOG_BYTES and len(kept) > 1:  # bounded memory, whatever the log
                        size -= len(kept.popleft())
                        cut = True
                parts.append(LogText(service=inst.service, text="".join(kept)))
            total = sum(len(p.text.encode()) for p in parts)
            truncated = cut or total > MAX_LOG_BYTES
            if truncated:
                share = MAX_LOG_BYTES // len(parts)
                parts = [LogText(service=p.service, text=_last_bytes(p.text, share)) for p in parts]
            return LogsResult(logs=tuple(parts), truncated=truncated).model_dump(mode="json")

        self._worker(request, "logs", read)

    def _follow(self, request: Request, cmd: LogsCommand, instances: list[Observed]) -> None:
        key = (request.reply_to, request.id)
        stream = _Stream(request.reply_to, request.id, time.monotonic() + cmd.duration)
        with self._lock:
            if key in self._streams:
                raise RemoteError(f"request {request.id} is already streaming")
        driver = self.core.driver
        since = self._since(cmd)
        items: queue.Queue[tuple[str, str | None, str | None]] = queue.Queue()

        def reader(inst: Observed) -> None:
            try:
                for text in driver.log_stream(inst, cmd.tail, since, True, stream.stop):
                    items.put((inst.service, text, None))
            except DriverError as exc:
                items.put((inst.service, None, str(exc)))
            except Exception as exc:
                log.exception("following the logs of %s/%s failed", inst.stack, inst.service)
                items.put((inst.service, None, f"internal error: {exc.__class__.__name__}: {exc}"))
            else:
                items.put((inst.service, None, None))

        def run() -> None:
            readers = [
                threading.Thread(target=reader, args=(inst,), name=f"remote-logs-{inst.service}", daemon=True)
                for inst in instances
            ]
            try:
                for thread in readers:
                    thread.start()
                self._pump(request, stream, items, tuple(inst.service for inst in instances))
            finally:
                stream.stop.set()
                with self._lock:
                    self._streams.pop(key, None)
                for thread in readers:
                    thread.join(timeout=2.0)

        with self._lock:
            self._streams[key] = stream
        try:
            self._spawn("follow", run)
        except RemoteError:
            with self._lock:
                self._streams.pop(key, None)
            raise

    def _pump(
        self,
        request: Request,
        stream: _Stream,
        items: queue.Queue[tuple[str, str | None, str | None]],
        services: tuple[str, ...],
    ) -> None:
        """Batch what the readers produce into chunks until the stream ends; then its last message."""
        budget = float(MAX_LOG_BYTES)
        last_refill = time.monotonic()
        dropped = unreported = 0
        pending: dict[str, list[str]] = {}
        pending_bytes = 0
        ended = 0
        error: str | None = None
        last_sent = 0.0

        def send(chunk: LogChunk) -> bool:
            stream.seq += 1
            ok = self.reply(
                request,
                DeviceReply(id=request.id, ok=True, more=True, seq=stream.seq, result=chunk.model_dump()),
            )
            nonlocal last_sent
            last_sent = time.monotonic()
            return ok

        def flush() -> bool:
            nonlocal pending_bytes
            for service, texts in pending.items():
                text = "".join(texts)
                while text:
                    piece, text = _split(text, CHUNK_BYTES)
                    if not send(LogChunk(service=service, text=piece)):
                        return False
            pending.clear()
            pending_bytes = 0
            return True

        reason: StreamEndReason = "duration"
        if not send(LogChunk(services=services)):  # tells the client the stream has started
            return
        first_pending = None
        while True:
            now = time.monotonic()
            if self.closing.is_set():
                reason = "stopped"
                break
            if stream.cancelled:
                reason = "cancelled"
                break
            if error is not None:
                break
            if ended >= len(services):
                reason = "exited"
                break
            if now >= stream.deadline:
                reason = "duration"
                break
            try:
                service, text, failure = items.get(timeout=FLUSH_S / 2)
            except queue.Empty:
                pass  # nothing new: flush what waits, check the deadline
            else:
                if text is None:
                    ended += 1
                    error = failure or error
                else:
                    budget = min(float(MAX_LOG_BYTES), budget + (now - last_refill) * STREAM_RATE)
                    last_refill = now
                    size = len(text.encode())
                    if size > budget:
                        text = _last_bytes(text, int(budget)) if budget >= 1 else ""
                        lost = size - len(text.encode())
                        dropped += lost
                        unreported += lost
                        budget = 0.0
                    else:
                        budget -= size
                    if text:
                        if unreported:  # one notice per gap, where the gap is
                            text = f"[tether: {unreported} bytes of output left out (rate limit)]\n{text}"
                            unreported = 0
                        pending.setdefault(service, []).append(text)
                        pending_bytes += len(text)
                        first_pending = first_pending or now
            now = time.monotonic()
            if pending and (pending_bytes >= CHUNK_BYTES or now - (first_pending or now) >= FLUSH_S):
                if not flush():
                    return  # the link is gone: nobody can be told
                first_pending = None
            elif not pending and now - last_sent >= HEARTBEAT_S and not send(LogChunk()):
                return
        stream.stop.set()
        # What the readers had already produced still goes out.
        with contextlib.suppress(queue.Empty):
            while True:
                service, text, _failure = items.get_nowait()
                if text:
                    pending.setdefault(service, []).append(text)
        if not flush():
            return
        stream.seq += 1
        if error is not None:
            final = DeviceReply(id=request.id, ok=False, more=False, seq=stream.seq, error=error)
        else:
            end = StreamEnd(end=reason, dropped=dropped)
            final = DeviceReply(id=request.id, ok=True, more=False, seq=stream.seq, result=end.model_dump())
        self.reply(request, final)

    def _stream(self, request: Request, cmd: StreamCommand) -> None:
        with self._lock:
            stream = self._streams.get((request.reply_to, cmd.request_id))
            if stream is None:
                raise RemoteError(
                    f"no stream {cmd.request_id} for this client on device {self.core.device_id}"
                )
            if cmd.action == "cancel":
                stream.cancelled = True
                stream.stop.set()
            else:
                stream.deadline = time.monotonic() + cmd.duration
        result = {"request_id": cmd.request_id, "action": cmd.action}
        self.reply(request, DeviceReply(id=request.id, ok=True, result=result))

    def _restart(self, request: Request, cmd: RestartCommand) -> None:
        core = self.core
        desired, _hashes = core.desired_stacks()
        spec = desired.get(cmd.stack)
        if spec is None:
            raise RemoteError(f"stack {cmd.stack!r} is not deployed on device {core.device_id}")
        services = [s for s in spec.services if cmd.service in (None, s.name)]
        if not services:
            raise RemoteError(f"stack {cmd.stack!r} has no service {cmd.service!r}")
        try:
            observed = [i for i in core.driver.observe() if i.stack == cmd.stack]
        except DriverError as exc:
            raise RemoteError(str(exc)) from exc
        before = {s.name: [i for i in observed if i.service == s.name] for s in services}
        errors: dict[str, str] = {}
        for service in reversed(services):  # dependents first, as a removal would
            for inst in before[service.name]:
                log.info("restart %s/%s: removing %s (remote request)", cmd.stack, service.name, inst.id)
                try:
                    core.driver.remove(inst, service.stop_grace_period_s)
                except DriverError as exc:
                    errors[service.name] = str(exc)
        core.reconcile_once()  # creates the new instances now, in the stack's order
        try:
            after = [i for i in core.driver.observe() if i.stack == cmd.stack]
        except DriverError:
            after = []
        results = []
        for service in services:
            new = next((i.id for i in after if i.service == service.name), None)
            old = before[service.name][0].id if before[service.name] else None
            error = errors.get(service.name) or core.errors.get((cmd.stack, service.name))
            results.append(RestartedService(service=service.name, old=old, new=new, error=error))
        result = RestartResult(stack=cmd.stack, services=tuple(results))
        self.reply(request, DeviceReply(id=request.id, ok=True, result=result.model_dump()))

    def _facts(self, request: Request, cmd: FactsCommand) -> None:
        self._worker(
            request,
            "facts",
            lambda: host_facts(self.core.driver, self.data_dir, self.core.clock()).model_dump(mode="json"),
        )

    def _live(self, request: Request, cmd: MetricsLiveCommand) -> None:
        if self.live is None:
            raise RemoteError(f"device {self.core.device_id} cannot send live metrics")
        until = self.live.extend(cmd.duration)
        self.reply(request, DeviceReply(id=request.id, ok=True, result=LiveResult(until=until).model_dump()))


def _last_bytes(text: str, limit: int) -> str:
    """The end of ``text`` within ``limit`` UTF-8 bytes, starting at a line if one starts there."""
    data = text.encode()
    if len(data) <= limit:
        return text
    cut = data[len(data) - limit :]
    newline = cut.find(b"\n")
    if 0 <= newline < len(cut) - 1:
        cut = cut[newline + 1 :]
    return cut.decode(errors="ignore")


def _split(text: str, limit: int) -> tuple[str, str]:
    """A first piece of ``text`` within ``limit`` UTF-8 bytes (at a line end if there is one), and the rest."""
    if len(text.encode()) <= limit:
        return text, ""
    head = text.encode()[:limit].decode(errors="ignore")
    newline = head.rfind("\n")
    if newline > 0:
        head = head[: newline + 1]
    return head, text[len(head) :]


# --- wiring (the real agent, agent/runner.py) -----------------------------------------------


def attach(core: AgentCore, config: AgentConfig) -> metrics.MetricsLoop:
    """Give ``core`` remote operations and return its metrics loop (started by the caller)."""
    topic = topics.device(core.device_id, DeviceTopic.METRICS)
    usage = getattr(core.driver, "usage", None)

    def sampler() -> metrics.Sampler:
        return metrics.Sampler(config.data_dir, usage)

    live = metrics.LiveMetrics(topic, core.link.publish, sampler)
    core.remote = RemoteOps(core, config.data_dir, live=live)
    return metrics.MetricsLoop(
        topic,
        core.link.publish,
        sampler,
        interval=config.metrics_every(),
        full_interval=config.metrics_full_interval,
        threshold=config.metrics_threshold,
    )


def detach(core: AgentCore, loop: metrics.MetricsLoop) -> None:
    """Stop the metrics loop and every remote operation (streams say goodbye first)."""
    loop.stop()
    if isinstance(core.remote, RemoteOps):
        core.remote.close()
