"""A simulated fleet: N devices, each an :class:`AgentCore` on its own MQTT session.

Theory of operation
-------------------
Everything runs on one asyncio event loop (one thread): the sessions (:mod:`.mqtt`), the
agent cores (synchronous; each call returns quickly because the driver is simulated and
the store is in memory) and the timers. A device does what :class:`tether.agent.runner.Agent`
does, event-driven instead of with a thread of its own:

* before every CONNECT it takes a will from ``core.make_will()``; after CONNACK it calls
  ``core.on_connected()``; every incoming message goes to ``core.handle()``;
* it reconciles at once when the core asks (``core.wake``), then when
  ``core.next_wakeup`` says, as the real runner does (every ``reconcile_interval`` seconds,
  jittered per device, or after at most one second while something is converging or just
  started). A reconcile due while nothing arrived and the simulated runtime did not change
  since one that left nothing to do (:attr:`AgentCore.idle`) is skipped: it would observe
  the same instances and stop there (a real agent must look; the simulator knows). A device
  left so (nothing waiting on the clock) is not put in the fleet's wake-up heap at all: it
  keeps when it would reconcile, and goes into the heap for then only when a message or a
  change of its runtime arrives first (after that time, it schedules from then, as a device
  woken idle and parked did); the same reconciles at the same times, without an entry pushed
  and popped per device after every deploy only to find it idle;
* a reconcile that created or started instances took, on a real device, the time they
  needed to start (a real driver's ``create`` returns once the container runs, see
  :mod:`.driver`): the device is *busy* until then. What its core published in that
  reconcile (the events, the report showing the services running) goes out when the
  reconcile would have returned; messages arriving meanwhile are acknowledged by the
  session at once (as paho's thread does) and handed to the core after, in order;
* a lost connection is retried after the agent's own :class:`~tether.protocol.backoff.Backoff`
  (capped exponential, full jitter): simulated devices storm a restarted broker exactly
  as real ones would.

The first connections are spread over time: at most ``connect_rate`` new devices per
second (each at a jittered instant), and at most ``connect_concurrency`` TCP+CONNECT
handshakes in flight at once (reconnects included), so the simulator neither exhausts
the broker's listen backlog nor its own loop. The fleet stops by itself after
``duration`` seconds (or when :meth:`Fleet.stop` is called): every device publishes its
``offline`` goodbye and disconnects cleanly, like a stopped agent.

Per device the simulator records, for every generation it reported, when it first
published a report naming it and when that report first showed nothing converging
(:attr:`SimDevice.marks`); the benchmarks compute latencies from these.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import itertools
import logging
import platform
import random
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tether.agent.core import AgentCore
from tether.agent.policy import HostAccess
from tether.agent.request_gate import publish_reply
from tether.protocol import __version__
from tether.protocol.backoff import Backoff
from tether.protocol.device_api import DeviceReply, FactsCommand, HostFacts
from tether.protocol.heap import tune_gc
from tether.protocol.models import DeviceFacts, Request
from tether.protocol.mqtt import parse_broker_url
from tether.protocol.topics import DeviceTopic
from tether.protocol.transport import Will

from . import hashcache
from .driver import SimDriver
from .mqtt import Counters, MqttSession, WriteBatch
from .store import SimStore

log = logging.getLogger(__name__)

T = TypeVar("T")

GC_THRESHOLDS = (500_000, 20, 10)
"""The simulator's young collections run every 500,000 allocations (``tune_gc``: 50,000). A
deploy to 10,000 devices allocates tens of millions of short-lived objects, most freed by
reference counting: with young collections ten times rarer the simulator's CPU per deploy
fell by about a tenth (fewer passes over the objects alive at that moment), for a few tens
of MB more at the peak."""

_Held = tuple[str, bytes, int, bool, "list[Callable[[], bool] | None] | None"]
"""A publish held back during a reconcile: topic, payload, QoS, retain, and for a tracked
one the cell that receives the session's delivery check."""


class SimRemote:
    """A simulated device's remote operations: ``facts`` answered as a real agent does (read
    only, always on; the simulated host's), every other operation refused (no logs, files or
    workloads to act on). Answered at once, on the fleet's loop."""

    def __init__(self, device: SimDevice) -> None:
        self.device = device

    def execute(self, request: Request, command: Any) -> None:
        device = self.device
        if isinstance(command, FactsCommand):
            facts = HostFacts(
                hostname=device.device_id,
                os="tether-sim",
                kernel=platform.release(),
                arch=platform.machine(),
                agent_version=__version__,
                driver=SimDriver.name,
                at=time.time(),
            )
            reply = DeviceReply(id=request.id, ok=True, result=facts.model_dump(mode="json"))
        else:
            error = f"device {device.device_id} is simulated: only facts are answered, not {command.kind}"
            reply = DeviceReply(id=request.id, ok=False, error=error)
        publish_reply(device, request.reply_to, reply)

    def extend_facts(self, facts: DeviceFacts) -> DeviceFacts:
        return facts


@dataclass
class FleetConfig:
    """What to simulate. Device ``i`` is ``{prefix}-{i:05d}`` (from ``first_index``)."""

    broker: str = "mqtt://127.0.0.1:1883"
    devices: int = 100
    prefix: str = "sim"
    first_index: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    shard_label: tuple[str, int] | None = None
    """``(key, n)``: device ``i`` also gets label ``key=str(i % n)``."""
    start_delay: float = 0.2
    start_jitter: float = 0.25
    fail_fraction: float = 0.0
    fail_labels: dict[str, str] | None = None
    """Devices whose labels include all of these fail every create."""
    keepalive: int = 60
    reconcile_interval: float = 10.0
    connect_rate: float = 1000.0
    connect_concurrency: int = 200
    connect_timeout: float = 15.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    duration: float | None = None
    seed: int = 0
    cache_hashes: bool = True
    """Decode each stack definition once per distinct payload (:mod:`.hashcache`): behaviour-neutral."""
    tune_gc: bool = True
    """Freeze the fleet's objects and collect garbage less often (:meth:`Fleet.run`); saves CPU."""

    def device_id(self, i: int) -> str:
        return f"{self.prefix}-{i + self.first_index:05d}"

    def device_labels(self, i: int) -> dict[str, str]:
        labels = dict(self.labels)
        if self.shard_label is not None:
            key, n = self.shard_label
            labels[key] = str((i + self.first_index) % n)
        return labels


def _session_from_clock(store: SimStore, clock: Callable[[], float]) -> SimStore:
    """Session numbers from the Unix time on, as the agent's FileStore numbers them when its
    data dir is new: a simulator process started again for the same devices (their memory
    gone, like a wiped device) is not taken by the controller for an older session of them."""
    store.session = int(clock())
    return store


class SimDevice:
    """One simulated device: its session, its core and its simulated runtime."""

    def __init__(self, fleet: Fleet, index: int, device_id: str, labels: dict[str, str], fail: bool) -> None:
        self.fleet = fleet
        self.index = index
        self.device_id = device_id
        self.labels = labels
        self.fails = fail
        cfg = fleet.config
        self.driver = SimDriver(
            device_id,
            start_delay=cfg.start_delay,
            jitter=cfg.start_jitter,
            fail=fail,
            clock=fleet.clock,
            rng=fleet.rng,
        )
        self.session = MqttSession(
            f"tether-{device_id}",
            counters=fleet.counters,
            keepalive=cfg.keepalive,
            clean_session=False,
            will=self._make_will,
            on_message=self._on_message,
            on_connect=self._on_connect,
            on_disconnect=self._on_lost,
            batch=fleet.writes,
        )
        # The fleet's facts validated once, this device's name and labels set on a copy.
        facts = fleet.facts.model_copy(update={"hostname": device_id, "labels": labels})
        self.core = AgentCore(
            device_id,
            labels,
            self.driver,
            _session_from_clock(SimStore(), fleet.clock),
            self,
            facts=facts,
            clock=fleet.clock,
            host_access=fleet.host_access,
            # Jittered per device, so a fleet's idle reconciles do not fall into step.
            reconcile_interval=cfg.reconcile_interval * fleet.rng.uniform(0.9, 1.1),
        )
        self.core.remote = SimRemote(self)
        for topic_filter in self.core.subscriptions():
            self.session.subscribe(topic_filter)
        self._reported_topic = self.core.topic(DeviceTopic.REPORTED)
        self.marks: dict[int, list[float | None]] = {}
        """generation -> [first report naming it, first such report with every stack settled]."""
        self.failed = False
        self.connected_at: float | None = None
        self.connects = 0
        self.attempt = 0
        self.max_attempt = 0
        self.lost_at: float | None = None
        self._due: float | None = None
        """When (loop time) this device's next reconcile is due in :attr:`Fleet._wakeups`."""
        self._held: list[_Held] | None = None
        """While the core reconciles: what it publishes (sent when the reconcile returns)."""
        self._busy = False
        """A reconcile is still starting instances: messages wait in :attr:`_inbox`."""
        self._inbox: list[tuple[str, bytes] | None] = []
        """Arrived while busy, in order; None stands for a CONNACK (``core.on_connected``)."""
        self._kick_pending = False
        self._inputs = -1
        """``driver.changes`` when the core last reconciled; -1 after a message or a CONNACK."""
        self._parked = False
        """Idle (see :meth:`reconcile`): no reconcile scheduled until something arrives."""
        self._idle_due: float | None = None
        """Parked by :meth:`_schedule`: when (loop time) it would have reconciled, only to find
        itself idle; in the heap for then if something arrives before (:meth:`_stir`)."""
        self._resume_at: float | None = None
        """Unparked before :attr:`_idle_due`: into the heap for then at the end of the loop's
        round (:meth:`Fleet._resume`), unless it reconciles at once (a kick) meanwhile."""
        self.driver.on_change = self._stir
        self._connecting = False
        self._stopped = False

    # --- Link (what the core sees) ---

    @property
    def connected(self) -> bool:
        return self.session.connected

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        if self._held is not None:  # inside a reconcile: goes out when it returns
            self._held.append((topic, payload, qos, retain, None))
            return self.session.connected
        ok = self.session.publish(topic, payload, qos, retain)
        if ok and topic == self._reported_topic:
            self._note_report()
        return ok

    def publish_tracked(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> Callable[[], bool] | None:
        if self._held is not None:
            if not self.session.connected:
                return None
            cell: list[Callable[[], bool] | None] = [None]
            self._held.append((topic, payload, qos, retain, cell))
            return lambda: (check := cell[0]) is not None and check()
        return self.session.publish_tracked(topic, payload, qos, retain)

    def _send_held(self, held: list[_Held]) -> None:
        """What the core published during a reconcile, in order, now that the reconcile returned.
        Lost with the connection if it dropped meanwhile: the core publishes the report again
        and resends unacknowledged events after the next CONNACK, as with a real link."""
        for topic, payload, qos, retain, cell in held:
            if cell is None:
                self.publish(topic, payload, qos, retain)
            else:
                cell[0] = self.session.publish_tracked(topic, payload, qos, retain)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.session.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        self.session.unsubscribe(topic_filter)

    # --- state for the benchmarks ---

    @property
    def generation(self) -> int:
        desired = self.core.desired
        return desired.generation if desired is not None else -1

    def _note_report(self) -> None:
        now = time.monotonic()
        core = self.core
        gen = self.generation
        mark = self.marks.get(gen)
        if mark is None:
            mark = self.marks[gen] = [now, None]
        self.failed = bool(core.errors)
        # Settled: the report being published (the core's candidate) shows every stack
        # running or failed. Not ``core.converging``: it also counts planned actions, and a
        # report published while one was planned and not followed by another (nothing in it
        # changes) left the device never settled: deploy_latency waited for it for good.
        report = core._candidate
        settled = report is not None and all(s.state != "converging" for s in report.stacks.values())
        if mark[1] is None and settled:
            mark[1] = now
            self.fleet.settled_marks += 1

    def done_at(self, generation: int) -> float | None:
        mark = self.marks.get(generation)
        return None if mark is None else mark[1]

    # --- lifecycle ---

    def _make_will(self) -> Will:
        return self.core.make_will()

    def start(self, delay: float = 0.0) -> None:
        loop = self.fleet.loop
        loop.call_later(delay, self._connect_soon)
        self.kick()

    def _connect_soon(self) -> None:
        if self._stopped or self._connecting or self.session.connected:
            return
        self._connecting = True
        self.fleet.loop.create_task(self._connect())

    async def _connect(self) -> None:
        fleet = self.fleet
        try:
            async with fleet.handshakes:
                if self._stopped:
                    return
                ok = await self.session.open(
                    fleet.address.host, fleet.address.port, fleet.config.connect_timeout
                )
        finally:
            self._connecting = False
        if ok:
            return
        self.attempt += 1
        self.max_attempt = max(self.max_attempt, self.attempt)
        if not self._stopped:
            self.fleet.loop.call_later(fleet.backoff.delay(self.attempt), self._connect_soon)

    def _on_connect(self) -> None:
        self.attempt = 0
        self.connects += 1
        self.connected_at = time.monotonic()
        self.fleet.connack_times.append(self.connected_at)
        if self._busy:
            self._inbox.append(None)
            return
        self._stir()
        self.core.on_connected()
        if self.core.wake:
            self.kick()

    def _on_lost(self) -> None:
        # As MqttClient: after a session that was up, the backoff starts again from attempt 0.
        self.connected_at = None
        self.lost_at = time.monotonic()
        if not self._stopped:
            self.attempt = 0
            self.fleet.loop.call_later(self.fleet.backoff.delay(0), self._connect_soon)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if self._busy:
            self._inbox.append((topic, payload))
            return
        self._handle(topic, payload)
        if self.core.wake:
            self.kick()

    def _stir(self) -> None:
        """Something arrived or the runtime changed: a parked device reconciles again when its
        agent's schedule says (within a second while it watches what it started, else within
        ``reconcile_interval``), as the agent's next reconcile would see it. Parked before the
        reconcile it had due (:meth:`_schedule`), it reconciles then, as it would have from the
        heap: into the heap at the end of the loop's round, unless a kick came meanwhile (the
        message that set the core's ``wake``, or the next in the same read, as a deploy's
        definition after its desired state): that reconcile forgets what was due."""
        self._inputs = -1
        if self._parked and not self._stopped:
            self._parked = False
            due, self._idle_due = self._idle_due, None
            if due is not None and due > self.fleet.loop.time():
                self._resume_at = due
                self.fleet.resume_soon(self)
            else:
                self._schedule()

    def _handle(self, topic: str, payload: bytes) -> None:
        self._stir()
        try:
            self.core.handle(topic, payload)
        except Exception:  # the real runner would log and go on, too
            log.exception("%s: handling %s failed", self.device_id, topic)

    def kick(self) -> None:
        """Reconcile as soon as the loop gets to it."""
        if not self._kick_pending and not self._stopped:
            self._kick_pending = True
            self.fleet.loop.call_soon(self.reconcile)

    def reconcile(self) -> None:
        self._kick_pending = False
        self._due = None
        self._parked = False
        self._idle_due = self._resume_at = None
        if self._stopped or self._busy:
            return  # a busy device reconciles when it is done (_done)
        core = self.core
        if self._inputs == self.driver.changes and core.idle:
            # Nothing arrived and the runtime did not change since a reconcile that left
            # nothing to do: this one would observe the same instances and stop there, and so
            # would every one after it until a message arrives or the runtime changes. The
            # device sleeps until then (_stir), instead of waking every second for nothing.
            self.fleet.idle_reconciles += 1
            self._parked = True
            return
        held: list[_Held] = []
        self._held = held
        try:
            core.reconcile_once()
        except Exception:
            log.exception("%s: reconcile failed", self.device_id)
        finally:
            self._held = None
        self.fleet.reconciles += 1
        self._inputs = self.driver.changes
        busy_until = self.driver.take_busy()
        if busy_until is not None:
            wait = busy_until - self.driver.clock()
            if wait > 0:  # the instances it started take that long: so does the reconcile
                self._busy = True
                self.fleet.loop.call_later(wait, self._done, held)
                return
        self._send_held(held)
        self._schedule()

    def _done(self, held: list[_Held]) -> None:
        """The busy reconcile returns: what it published goes out, then what arrived meanwhile
        is handled in order, and the device schedules its next reconcile."""
        self._busy = False
        if self._stopped:
            return
        self._send_held(held)
        inbox, self._inbox = self._inbox, []
        for item in inbox:
            if item is None:
                if self.session.connected:
                    self._stir()
                    self.core.on_connected()
            else:
                self._handle(*item)
        self._resume_at = None  # (not parked while busy: nothing to resume)
        self._schedule()

    def _schedule(self) -> None:
        core = self.core
        now = core.clock()
        delay = core.next_wakeup(now) - now  # as the real runner schedules
        when = self.fleet.loop.time() + delay
        if self._inputs == self.driver.changes and core.idle:
            # That reconcile would find the device idle and park it (see reconcile): nothing
            # waits on the clock (no backoff, nothing converging, no restart count; the
            # session's keepalive has its own timer). Parked now; when it was due is kept in
            # case something arrives before (_stir).
            self._parked = True
            self._idle_due = when
            return
        self.fleet.wake_at(self, when)

    def stop(self) -> None:
        """Say goodbye (``offline``) and disconnect; stop reconciling."""
        self._stopped = True
        self._due = self._idle_due = self._resume_at = None
        self.session.close(self.core.goodbye())

    def crash(self) -> None:
        """Drop the connection without a goodbye (the broker publishes the will); no reconnect."""
        self._stopped = True
        self._due = self._idle_due = self._resume_at = None
        self.session.abort()


class Fleet:
    """N simulated devices on the running event loop. Use :meth:`run`, or :class:`FleetThread`."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.address = parse_broker_url(config.broker)
        if self.address.tls:
            raise ValueError("the simulator speaks plain MQTT only (mqtt://)")
        self.rng = random.Random(config.seed)
        self.clock: Callable[[], float] = time.time
        """The devices' wall clock (their cores' and simulated runtimes'); set before :meth:`prepare`."""
        if config.cache_hashes:
            hashcache.install()
        self.counters = Counters()
        self.writes = WriteBatch()
        """The sessions' writes, made together once per loop iteration."""
        self.facts = DeviceFacts(
            agent_version=__version__,
            driver=SimDriver.name,
            arch=platform.machine(),
            os="tether-sim",
            keepalive=config.keepalive,
        )
        """What every device tells of itself but its name and labels (set per device)."""
        self.host_access = HostAccess()
        """The agent's default host access policy, one (frozen) object for every device."""
        self.backoff = Backoff(config.backoff_base, config.backoff_cap, self.rng)
        self.devices: list[SimDevice] = []
        self.connack_times: list[float] = []
        self.reconciles = 0
        self.idle_reconciles = 0
        """Reconciles skipped: nothing could have changed (:attr:`AgentCore.idle`)."""
        self.settled_marks = 0
        """How many (device, generation) marks got their settled time: a cheap thing to poll
        before walking every device's marks."""
        self.started_at = 0.0
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.handshakes: asyncio.Semaphore = None  # type: ignore[assignment]
        self._stop: asyncio.Event | None = None
        self.ramp_done = False
        self._wakeups: list[tuple[float, int, SimDevice]] = []
        """Every device's next reconcile, (loop time, tie-breaker, device): one heap and one
        loop timer for the fleet instead of a timer per device (made and cancelled at every
        reconcile). An entry whose time is no longer the device's ``_due`` is stale."""
        self._wake_seq = itertools.count()
        self._wake_handle: asyncio.TimerHandle | None = None
        self._wake_when = float("inf")
        self._resumes: list[SimDevice] = []
        """Devices unparked this round before their reconcile was due (:meth:`resume_soon`)."""

    def _build(self) -> None:
        cfg = self.config
        fail_rng = random.Random(cfg.seed + 1)
        for _ in range(cfg.first_index):  # device n draws the n-th number, however the fleet is split
            fail_rng.random()
        for i in range(cfg.devices):
            labels = cfg.device_labels(i)
            fail = fail_rng.random() < cfg.fail_fraction
            if cfg.fail_labels and all(labels.get(k) == v for k, v in cfg.fail_labels.items()):
                fail = True
            self.devices.append(SimDevice(self, i, cfg.device_id(i), labels, fail))

    async def run(self, on_tick: Callable[[Fleet], None] | None = None, tick: float = 5.0) -> dict[str, Any]:
        """Build and connect the fleet, run until ``duration`` or :meth:`stop`; return :meth:`summary`."""
        raise_fd_limit(self.config.devices)
        self._stop = asyncio.Event()
        self.started_at = time.monotonic()
        gc_before = gc.get_threshold()
        self.prepare()
        ramp = self.loop.create_task(self._ramp())
        deadline = None if self.config.duration is None else self.started_at + self.config.duration
        try:
            while not self._stop.is_set():
                timeout = tick if deadline is None else min(tick, deadline - time.monotonic())
                if timeout <= 0:
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout)
                if self.config.tune_gc:
                    # What the devices took on since (a deploy's specs, renderings, reports)
                    # is long-lived too: a full collection walked it all again (0.55 s for
                    # 720,000 objects after a deploy to 10,000 devices). Cyclic garbage that
                    # already reached the oldest generation is kept: small next to the fleet.
                    gc.freeze()
                if on_tick is not None and not self._stop.is_set():
                    on_tick(self)
            summary = self.summary()
        finally:
            ramp.cancel()
            await self._shutdown()
            if self.config.tune_gc:
                gc.unfreeze()
                gc.set_threshold(*gc_before)
        return summary

    def prepare(self) -> None:
        """Build the devices on the running loop, not connected yet (:meth:`run` connects them;
        ``bench/sim_cpu.py`` hands them transports of its own)."""
        self.loop = asyncio.get_running_loop()
        self.handshakes = asyncio.Semaphore(self.config.connect_concurrency)
        if self.config.tune_gc:
            # Built under the default thresholds, the collector walked the growing fleet again
            # and again: 0.45 s of the 0.75 s building 10,000 devices took.
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
        self._build()
        if self.config.tune_gc:
            # 10,000 devices are millions of long-lived objects (cores, sessions, models):
            # out of the collector's sight once built, and again once connected (protocol/heap.py).
            tune_gc()
            gc.set_threshold(*GC_THRESHOLDS)

    def wake_at(self, device: SimDevice, when: float) -> None:
        """Reconcile ``device`` at ``when`` (loop time), unless it reconciles before."""
        device._due = when
        heapq.heappush(self._wakeups, (when, next(self._wake_seq), device))
        if when < self._wake_when:
            self._arm(when)

    def resume_soon(self, device: SimDevice) -> None:
        """Put ``device`` in the heap for its :attr:`SimDevice._resume_at` once this round of
        the loop is over (:meth:`_resume`)."""
        if not self._resumes:
            self.loop.call_soon(self._resume)
        self._resumes.append(device)

    def _resume(self) -> None:
        devices, self._resumes = self._resumes, []
        for device in devices:
            due, device._resume_at = device._resume_at, None
            # Not if a reconcile forgot it, or one is about to (kicked; call_soon order).
            if due is not None and not device._kick_pending and not device._stopped:
                self.wake_at(device, due)

    def _arm(self, when: float) -> None:
        if self._wake_handle is not None:
            self._wake_handle.cancel()
        self._wake_when = when
        self._wake_handle = self.loop.call_at(when, self._wake)

    def _wake(self) -> None:
        """Reconcile every device that is due (within a millisecond), then sleep until the next."""
        self._wake_handle = None
        self._wake_when = float("inf")
        heap = self._wakeups
        limit = self.loop.time() + 0.001
        due = []
        while heap and heap[0][0] <= limit:
            when, _, device = heapq.heappop(heap)
            if device._due == when:
                device._due = None
                due.append(device)
        for device in due:  # a device due again at once waits for the next round, as from a timer
            device.reconcile()
        while heap and heap[0][2]._due != heap[0][0]:
            heapq.heappop(heap)  # stale
        if heap and heap[0][0] < self._wake_when:
            self._arm(heap[0][0])

    async def _ramp(self) -> None:
        rate = max(self.config.connect_rate, 0.001)
        t0 = time.monotonic()
        for i, device in enumerate(self.devices):
            at = t0 + (i + self.rng.random()) / rate
            wait = at - time.monotonic()
            if wait > 0.005:
                await asyncio.sleep(wait)
            device.start()
        self.ramp_done = True
        if self.config.tune_gc:
            gc.freeze()  # what the connections added

    async def _shutdown(self) -> None:
        for device in self.devices:
            device.stop()
        await asyncio.sleep(0.2)  # let the transports flush and close

    def stop(self) -> None:
        """Ask :meth:`run` to finish (from the loop thread)."""
        if self._stop is not None:
            self._stop.set()

    # --- views ---

    def connected(self) -> int:
        """Devices connected now (a counter: the benchmarks poll it while 10,000 connect)."""
        return self.counters.up

    def generation_counts(self) -> dict[int, dict[str, int]]:
        """Per desired generation: devices holding it, and of those converged and failed."""
        out: dict[int, dict[str, int]] = {}
        for d in self.devices:
            row = out.setdefault(d.generation, {"devices": 0, "converged": 0, "failed": 0})
            row["devices"] += 1
            if d.done_at(d.generation) is not None:
                row["converged"] += 1
            if d.failed:
                row["failed"] += 1
        return dict(sorted(out.items()))

    def peak_connect_rate(self, since: float = 0.0) -> int:
        """The most CONNACKs received within one second (a sliding window)."""
        times = sorted(t for t in self.connack_times if t >= since)
        best = 0
        j = 0
        for i, t in enumerate(times):
            while times[j] < t - 1.0:
                j += 1
            best = max(best, i - j + 1)
        return best

    def summary(self) -> dict[str, Any]:
        c = self.counters
        return {
            "devices": len(self.devices),
            "connected": self.connected(),
            "connects": sum(d.connects for d in self.devices),
            "failing_devices": sum(1 for d in self.devices if d.fails),
            "generations": {str(g): row for g, row in self.generation_counts().items()},
            "reconciles": self.reconciles,
            "idle_reconciles_skipped": self.idle_reconciles,
            "messages_in": c.messages_in,
            "messages_out": c.messages_out,
            "bytes_in": c.bytes_in,
            "bytes_out": c.bytes_out,
            "refused_or_failed_connects": c.refused,
            "connections_lost": c.lost,
            "elapsed_s": round(time.monotonic() - self.started_at, 3),
            "hash_cache": hashcache.installed(),
        }


FD_HEADROOM = 64
"""Open files a simulator process needs besides its devices' sockets (its event loop, logs,
the benchmarks' pipes)."""


def raise_fd_limit(devices: int) -> None:
    """One socket per device: lift the soft limit on open files to the hard one. A fleet
    that needs more than that is refused at once: its devices past the limit would wait
    for connections that never open, and the caller for a fleet that never connects."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and devices + FD_HEADROOM > soft:
        raise ValueError(
            f"{devices} devices need {devices + FD_HEADROOM} open files in one simulator process; "
            f"this process may open {soft} (raise the hard limit, or split the fleet across "
            "processes: tether-sim --processes, bench/fleet_scale.py --processes)"
        )


class FleetThread:
    """A :class:`Fleet` on its own event loop in a background thread, for the benchmarks.

    The loop thread owns the fleet; read it through :meth:`call`, which runs a function
    on the loop and returns its result.
    """

    def __init__(self, config: FleetConfig) -> None:
        self.fleet = Fleet(config)
        self.loop = asyncio.new_event_loop()
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="tether-sim", daemon=True)
        self._built = threading.Event()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def go() -> dict[str, Any]:
            self.loop.call_soon(self._built.set)
            return await self.fleet.run()

        try:
            self.result = self.loop.run_until_complete(go())
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            self.error = exc
            self._built.set()
        finally:
            self.loop.close()

    def start(self) -> FleetThread:
        raise_fd_limit(self.fleet.config.devices)  # refused here, not after the thread started
        self._thread.start()
        self._built.wait(60)
        if self.error is not None:
            raise self.error
        return self

    def call(self, fn: Callable[[Fleet], T], timeout: float = 60.0) -> T:
        """Run ``fn(fleet)`` on the loop thread and return its result."""

        async def run() -> T:
            return fn(self.fleet)

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def wait(
        self, predicate: Callable[[Fleet], Any], timeout: float, interval: float = 0.1, message: str = ""
    ) -> Any:
        """Poll ``predicate(fleet)`` on the loop until it is truthy; TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            # A loop behind on a loaded machine answers late: the call may take the whole time
            # left (with call's own 60 s, a deploy_latency run reported "not every device
            # applied within 600 s" after 70 s).
            value = self.call(predicate, timeout=max(60.0, deadline - time.monotonic()))
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {message or predicate!r}")
            time.sleep(interval)

    def stop(self, timeout: float = 60.0) -> dict[str, Any] | None:
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.fleet.stop)
            self._thread.join(timeout)
        return self.result

    def __enter__(self) -> FleetThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
