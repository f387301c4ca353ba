"""The controller service: MQTT in, state store, desired states out.

Theory of operation
-------------------
One worker thread owns the store and handles, in arrival order, everything the MQTT
thread puts on the inbox: presence, reported state, events and requests.

After every change that can move stacks (a deploy, a removal, a group change, a device
whose labels changed or that appeared) :meth:`~.context.Context.sync` recomputes each device's
stacks with the pure scheduler. A device whose stacks differ from its stored desired
record gets the next generation, written in the same transaction as the change that
caused it. Then everything not yet on the broker is published, each publish awaited
(QoS 1 PUBACK) before it is marked published: stack definitions first, then desired
states, then definitions no longer referenced are cleared. A publish that fails (broker
gone) stays marked unpublished and is retried on reconnect, so nothing is lost and, after
a restart, nothing unchanged is published again.

Scheduling is the :class:`~.scheduling.Scheduler`'s, publishing the
:class:`~.publishing.Publisher`'s, deployment steps the :class:`~.deploying.Deployer`'s and
what devices publish (presence, reports, events, metrics) the :class:`~.ingesting.Ingestor`'s;
the :class:`Controller` composes them and keeps the inbox loop (device messages in batches,
one store transaction each), the tick and requests.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import ValidationError
from tether.protocol import codec, topics
from tether.protocol.acl import LEGACY_USER
from tether.protocol.commands import COMMAND_ADAPTER, NOTIFY_KINDS, CommandModel
from tether.protocol.credentials import CredentialTable
from tether.protocol.errors import CommandError, ErrorCode, ForbiddenError, PayloadError, TetherError
from tether.protocol.heap import FreeMemoryReleaser
from tether.protocol.models import (
    Reply,
    Request,
)
from tether.protocol.mqtt import BrokerAddress, MqttClient
from tether.protocol.principals import INTERNAL, Principal
from tether.protocol.topics import DeviceTopic
from tether.protocol.transport import Transport

from . import (
    deployments,
    devices,
    enrollment,
    groups,
    jobs,
    notify,
    registries,
    security,
    stacks,
    users,
    variables,
)
from .devices import all_devices
from .fleet_events import DeviceChanged, EventBus
from .inbox import Inbox, Message, message, topic_of
from .ingesting import Ingestor
from .lease import Lease
from .observability import REFRESH_SECONDS, DeviceCollector, Metrics
from .parts import build_context
from .publishing import BEHIND_CHECK
from .registry import CommandRegistry
from .rollout import DeploymentState
from .store import Store
from .variables import SecretsKey

log = logging.getLogger(__name__)

T = TypeVar("T")
_CONNECTED = "\x00connected"
_STOP = "\x00stop"
_TICK = "\x00tick"
_CALL = "\x00call"
_NO_REPLY = object()
"""What a request's answer returns when this call does not reply to it (see ``Controller._reply``)."""
_UNPREPARED = object()
"""A request's command whose handler's ``prepare`` has not run yet (see ``Controller._prepared``)."""
TICK_SECONDS = 1.0
INGEST_BATCH = 500
"""Device messages handled in one store transaction, at most (see :meth:`Controller._ingest`)."""
_BATCHED = frozenset(
    {
        DeviceTopic.PRESENCE.value,
        DeviceTopic.REPORTED.value,
        DeviceTopic.EVENTS.value,
        DeviceTopic.METRICS.value,
        "replies",  # devices' answers to the presence reconfirmation's requests (thousands after a restart)
    }
)


def _batched(key: str, kind: DeviceTopic | None) -> bool:
    """Whether a message as the inbox holds it is ingested in batches (:meth:`Controller._ingest`)."""
    return (kind if kind is not None else key.rpartition("/")[2]) in _BATCHED


AUDIT_PRUNE_SECONDS = 3600.0
"""How often audit records older than the retention are forgotten."""


COMMANDS = CommandRegistry.of(
    devices.commands,
    groups.commands,
    jobs.commands,
    stacks.commands,
    deployments.commands,
    security.commands,
    enrollment.commands,
    variables.commands,
    registries.commands,
    notify.commands,
    users.commands,
)
"""Every command the controller answers, with its handler (see :mod:`.registry`)."""


class StandbyError(TetherError):
    """A standby controller (``tether up --ha``) was asked for a write through :meth:`Controller.submit`."""


class Controller:
    """Schedules stacks onto devices and answers requests, over one MQTT connection."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        lease: Lease | None = None,
        ha: bool = False,
        table: CredentialTable | None = None,
        credentials: tuple[str, str] | None = None,
        ca_file: Path | None = None,
        secrets: SecretsKey | None = None,
        commands: CommandRegistry | None = None,
    ) -> None:
        """``table``: the embedded broker's credentials (kept in sync); ``credentials``: our own;
        ``ca_file``: the CA that signed an ``mqtts://`` broker's certificate; ``secrets``: the
        key pair secrets are sealed to (without one, secret variables are refused);
        ``commands``: what it answers (:data:`COMMANDS`; a test's registry of its own)."""
        self.commands = COMMANDS if commands is None else commands
        self.ca_file = ca_file
        self.store = store
        self.credentials = credentials
        self.clock = clock
        self.lease = lease
        self.ha = ha
        self.audit_retention: float | None = None
        """Seconds audit records are kept (``tether up --audit-retention``); None: for ever."""
        self._next_audit_prune = 0.0
        self.metrics = Metrics()
        self.inbox = Inbox(on_merged=self._count_merged)
        """What the MQTT thread hands over, one put per message, a device's outdated presence
        and report merged into its newer one while both wait (:mod:`.inbox`): a reconnection
        burst held while the worker is behind is bounded by the devices, not their messages."""
        self._merged_counters: dict[str, Any] = {}
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._preparing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tether-prepare")
        """Where commands' slow preparation runs (:meth:`_prepared`), one at a time."""
        self.client: Transport | None = None
        self.ready = threading.Event()
        self.leading = threading.Event()
        self.lost_leadership = threading.Event()
        self.memory = FreeMemoryReleaser()
        """Gives back what a burst of messages took, once it is over (protocol/heap.py)."""
        self.bus = EventBus(clock)
        """Fleet events (:mod:`.fleet_events`), emitted once the change is committed."""

        def busy() -> bool:  # a burst of device messages waits in the inbox
            return self.inbox.qsize() > INGEST_BATCH

        self.context = build_context(
            store,
            clock=clock,
            client=lambda: self.client,
            leading=self.leading,
            metrics=self.metrics,
            secrets=secrets,
            table=table,
            busy=busy,
        )
        """What command handlers use: these parts (:mod:`.context`, wired in :mod:`.parts`)."""
        context = self.context
        self.ingestor = Ingestor(
            context,
            metrics=self.metrics,
            sync=context.sync,
            online=lambda device_id: enrollment.seen(context, device_id),
            refresh=lambda: setattr(self, "_next_refresh", 0.0),
            client=lambda: self.client,
            busy=busy,
        )
        """What devices publish, stored and turned into fleet events (:mod:`.ingesting`)."""
        self.metrics.registry.register(DeviceCollector(lambda: self.context.device_metrics))
        self._next_refresh = 0.0
        self._next_repair = 0.0  # see tick
        self._message_counters: dict[str, Any] = {}
        self._received: dict[str, int] = {}  # see _count
        self._thread: threading.Thread | None = None
        self._session_id: str | None = None
        self._session_known = False
        self._resync = False  # see _become_leader
        self._request_qos = 1

    def _count(self, kind: str) -> None:
        """A message received on a topic of ``kind`` (a device topic's leaf, or what
        :func:`.topics.parse` calls it): counted here, added to the metric by :meth:`_flush_counts`
        (a prometheus_client increment takes a lock: once per kind and batch, not per message)."""
        self._received[kind] = self._received.get(kind, 0) + 1

    def _flush_counts(self) -> None:
        """Add the messages :meth:`_count` counted to ``tether_messages_received_total``."""
        if self._received:
            received, self._received = self._received, {}
            for kind, n in received.items():
                counter = self._message_counters.get(kind)
                if counter is None:  # a labelled child per kind, looked up once (prometheus_client's is slow)
                    counter = self._message_counters[kind] = self.metrics.messages.labels(kind=kind)
                counter.inc(n)

    def _count_merged(self, kind: str) -> None:
        """A message merged in the inbox (on the MQTT thread): received, and counted as merged."""
        counters = self._merged_counters.get(kind)
        if counters is None:  # labelled children looked up once (prometheus_client's is slow)
            counters = self._merged_counters[kind] = (
                self.metrics.messages.labels(kind=kind),
                self.metrics.merged.labels(kind=kind),
            )
        for counter in counters:
            counter.inc()

    # --- lifecycle ---

    def start(
        self,
        broker: BrokerAddress,
        *,
        fresh_broker: bool,
        connect_timeout: float = 15.0,
        session_id: str | None = None,
        session_known: bool = False,
        transport: Transport | None = None,
    ) -> None:
        """Connect and start the worker. ``fresh_broker``: the broker holds none of our retained state.
        ``transport``: the session to use (tests), instead of a paho client to ``broker``.

        With ``session_id`` the controller keeps a persistent MQTT session under that client
        id: what devices publish while it is away (a restart, a broker restart) is queued by
        the broker and delivered when it returns. Requests are subscribed at QoS 0, so they
        are not queued: a client has given up on its request by then. ``session_known``: this
        id has had a session on this broker before; a CONNACK without it then means the
        broker lost its state (and so our retained messages), and everything is republished.
        """
        if fresh_broker:
            self.store.mark_all_unpublished()
        self._session_id = session_id
        if session_id is not None:  # the same answer topic across restarts: one subscription in the session
            self.ingestor.asked_topic = topics.replies(session_id)
        self._session_known = session_known
        self._request_qos = 0 if session_id else 1
        self.client = transport or MqttClient(
            [broker],
            client_id=session_id or f"tether-controller-{uuid.uuid4().hex[:8]}",
            clean_session=session_id is None,
            keepalive=30,
            username=self.credentials[0] if self.credentials else None,
            password=self.credentials[1] if self.credentials else None,
            ca_file=str(self.ca_file) if self.ca_file else None,
            client_cert=self.context.access.client_cert,  # mTLS
        )
        self.client.on_message = lambda t, p, r: self.inbox.put((t, p))
        self.client.on_connect = lambda: self.inbox.put((_CONNECTED, b""))
        if self.ha:
            self.client.subscribe(topics.SHARED_REQUESTS)
            self.client.subscribe(topics.SHARED_USER_REQUESTS)
        if self.lease is None or self.lease.try_acquire():
            self._become_leader()
        else:
            log.info("standing by: another controller leads")
        self._thread = threading.Thread(target=self._run, name="controller", daemon=True)
        self._thread.start()
        self.context.notifier.start()
        self.client.connect(connect_timeout)

    def _become_leader(self) -> None:
        """Take over scheduling: device topics, write requests, and everything unpublished."""
        assert self.client is not None
        for kind in (DeviceTopic.PRESENCE, DeviceTopic.REPORTED, DeviceTopic.EVENTS, DeviceTopic.METRICS):
            self.client.subscribe(topics.all_devices(kind))
        self.client.subscribe(topics.LEADER_REQUESTS, qos=self._request_qos)
        self.client.subscribe(topics.ALL_LEADER_REQUESTS, qos=self._request_qos)
        self.client.subscribe(topics.ALL_ENROLL_REQUESTS)
        self.client.subscribe(topics.PROBE)
        self.client.subscribe(self.ingestor.asked_topic, qos=0)  # answers to its facts requests
        if not self.ha:
            self.client.subscribe(topics.REQUESTS, qos=self._request_qos)
            self.client.subscribe(topics.USER_REQUESTS, qos=self._request_qos)
        self.context.variables.forget()  # another controller may have changed them while we stood by
        self.context.registries.forget()
        self.context.scheduler.forget()  # and the devices
        self.context.deployer.forget()  # and the deployments' devices
        self.context.publisher.lead()  # and what was published, when, and which events are stored
        self._resync = True  # every desired state recomputed at the first connection (see _dispatch)
        self.leading.set()
        log.info("this controller leads")
        if self.client.connected:
            self.inbox.put((_CONNECTED, b""))

    def stop(self) -> None:
        self.inbox.put((_STOP, b""))
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.context.notifier.stop()
        self._preparing.shutdown(wait=False, cancel_futures=True)
        if self.client is not None:
            self.client.stop()

    def _run(self) -> None:
        next_tick = time.monotonic() + TICK_SECONDS
        held: Message | None = None  # taken off the inbox by a batch it did not belong to
        while True:
            if held is not None:
                (key, kind, payload), held = held, None
            else:
                if self.inbox.empty():  # a burst is over: what it took goes back (protocol/heap.py)
                    self.memory.idle()
                try:
                    key, kind, payload = self.inbox.get(timeout=max(0.0, next_tick - time.monotonic()))
                except queue.Empty:
                    key, kind, payload = _TICK, None, b""
            if key == _STOP and kind is None:
                return
            try:
                if _batched(key, kind):
                    held = self._ingest(key, kind, payload)
                elif key != _TICK or kind is not None:
                    self._handle(key, kind, payload)
                self._publish_deferred()
                if time.monotonic() >= next_tick:  # ticks run on time, however busy the inbox
                    self.tick()
                    # Counted from the end of the tick: a slow tick (a huge fleet) leaves the
                    # inbox a full period to drain instead of starving it.
                    next_tick = time.monotonic() + TICK_SECONDS
            except Exception:
                log.exception("failed to handle a message on %s", topic_of((key, kind, payload)))
            finally:
                self.flush_events()
                self._flush_counts()

    def _ingest(self, key: str, kind: DeviceTopic | None, payload: bytes) -> Message | None:
        """Handle a burst of device reports, events and metrics in one store transaction.

        Takes what is already waiting in the inbox, up to :data:`INGEST_BATCH` messages, and
        commits once: one write transaction per burst instead of one per message (a deploy
        to 10,000 devices brings 20,000 reports and events within seconds). Each message has
        its own unit of the batch's savepoint (:class:`~.store.Batch`), so one that fails
        leaves nothing behind and the others still count; should the batch break (its writes
        could not be restored: the database failing), nothing more is taken off the inbox.
        ``key, kind, payload``: the first message, as the inbox holds it (:data:`.inbox.Message`).
        Returns the first message that is not of the kind (handled next, in order).
        """
        held: Message | None = None
        with self.store.transaction(), self.store.batch() as batch:
            for handled in range(1, INGEST_BATCH + 1):
                mark = len(self.context.events.due)
                try:
                    with batch.unit():
                        if kind is None:
                            self._dispatch(key, payload)
                        else:
                            self._on_device(key, kind, payload)
                except Exception:
                    del self.context.events.due[mark:]  # its writes were undone: so are its events
                    log.exception("failed to handle a message on %s", topic_of((key, kind, payload)))
                if handled == INGEST_BATCH or batch.broken is not None:
                    break  # broken: the batch is rolled back, the rest stay queued
                try:
                    key, kind, payload = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if not _batched(key, kind):
                    held = (key, kind, payload)  # committed on the way out, then handled by the caller
                    break
            self.ingestor.flush_reports()
            self._flush_syncs(publish=False)  # published by the caller, once committed
        self.context.scheduler.keep_up()  # what the batch wrote, into the fleet view: not held
        return held

    def _flush_syncs(self, publish: bool = True) -> None:
        """Recompute the devices whose presence asked for it (all of them for replicas), at
        once: 10,000 devices registering cost one scheduling pass per batch of messages, not
        one per device. Then publish them, or (``publish=False``, inside the batch's
        transaction) leave them to be published once it is committed."""
        every, due = self.ingestor.take_syncs()
        if not every and not due:
            return
        device_ids = None if every else due
        try:
            with self.store.transaction():
                self.recompute(device_ids)
        except Exception:
            log.exception("failed to schedule %s", "every device" if device_ids is None else "new devices")
            return
        if publish:
            self.publish_pending(device_ids)
        else:
            self.context.publisher.defer(device_ids)

    def is_ready(self) -> bool:
        """Connected to the broker and past the first sync (readiness)."""
        return self.ready.is_set() and self.client is not None and self.client.connected

    def refresh_metrics(self) -> None:
        """Recompute the gauges that need the store (on the worker thread)."""
        counts = {"online": 0, "offline": 0, "unknown": 0, "never seen": 0}
        if self.leading.is_set():  # from the devices kept in memory, not every row parsed again
            fleet = self.context.scheduler.fleet_view()
            for seen in fleet.values():
                counts[seen.status] = counts.get(seen.status, 0) + 1
            named = self.store.desired_device_ids()
            named.update(d for g in self.store.list_groups() for d in g.devices)
            counts["never seen"] += len(named.difference(fleet))
        else:
            for device in all_devices(self.store).values():
                counts[device.status] = counts.get(device.status, 0) + 1
        for presence, n in counts.items():
            self.metrics.devices.labels(presence=presence).set(n)
        self.metrics.stacks.set(len(self.store.list_stacks()))
        self.metrics.leader.set(1 if self.leading.is_set() else 0)
        states: dict[str, int] = {}
        stacks = {s.name for s in self.store.list_stacks()}
        for name, deployment in self.store.latest_deployments().items():
            if name in stacks:  # a removed stack's deployments stay in the history, not here
                states[deployment.state] = states.get(deployment.state, 0) + 1
        for state in get_args(DeploymentState):  # every state, staging and staged included
            self.metrics.deployments.labels(state=state).set(states.get(state, 0))

    def tick(self) -> None:
        """Time-driven work: metrics, leadership, and replicas whose devices have just become lost."""
        if time.monotonic() >= self._next_refresh:
            self._next_refresh = time.monotonic() + REFRESH_SECONDS
            self.refresh_metrics()
        if self.lease is not None:
            if self.leading.is_set() and not self.lease.still_held():
                log.critical("lost the leader lease: stepping down")
                self.leading.clear()
                self.lost_leadership.set()
                return
            if not self.leading.is_set():
                if self.lease.try_acquire():
                    self._become_leader()
                return
        stacks = [
            s for s in self.store.list_stacks() if s.placement.mode == "replicas" and s.placement.lost_after_s
        ]
        if stacks and self.context.scheduler.placements_changed(stacks):
            self.context.sync()
        self.ingestor.expire_stale()
        self.ingestor.ask_unconfirmed()
        self.ingestor.expire_unconfirmed()
        self.ingestor.reread_presence()
        self.flush_events()  # what expire_stale found: webhooks count offline time from it
        try:
            self.context.notifier.tick()
        except Exception:
            log.exception("webhooks: failed to send")
        self.publish_acks()
        self.context.publisher.retry_recompute()
        self.advance_deployments(force=False)
        self.context.scheduler.keep_up()
        if time.monotonic() >= self._next_repair:
            # A pass looks at every device: every BEHIND_CHECK seconds, not every tick
            # (the grace is BEHIND_GRACE anyway; 19 ms per tick at 50,000 devices).
            self._next_repair = time.monotonic() + BEHIND_CHECK
            self.repair_behind()
        if self.context.access.table is not None:
            try:
                self.context.access.table.expire(self.clock())
            except TetherError as exc:
                log.error("%s", exc)
        if self.audit_retention is not None and time.monotonic() >= self._next_audit_prune:
            self._next_audit_prune = time.monotonic() + AUDIT_PRUNE_SECONDS
            self.store.prune_audit(self.clock() - self.audit_retention)

    # --- deployments ---

    def advance_deployments(self, force: bool = True) -> None:
        """See :meth:`.deploying.Deployer.advance`."""
        self.context.deployer.advance(force)

    # --- dispatch ---

    def handle(self, topic: str, payload: bytes) -> None:
        """Handle one incoming message (on the worker thread), and schedule what it changed."""
        self._handle(*message(topic, payload))

    def _handle(self, key: str, kind: DeviceTopic | None, payload: bytes) -> None:
        """:meth:`handle` of a message as the inbox holds it (:data:`.inbox.Message`)."""
        if kind is None:
            self._dispatch(key, payload)
        else:
            self._on_device(key, kind, payload)
        self.ingestor.flush_reports()
        self._flush_syncs()
        self._publish_deferred()
        self.flush_events()
        self._flush_counts()

    # --- fleet events (see fleet_events.py) ---

    def flush_events(self) -> None:
        """Emit the events of what is committed now (on the worker thread)."""
        if self.context.events.due:
            for due in self.context.events.take():
                if isinstance(due, DeviceChanged):
                    if due.kind not in NOTIFY_KINDS and not self.bus.wants(due.kind):
                        continue  # nobody would be told of it: not made
                    due = due.made()
                emitted = self.bus.emit(due)
                try:
                    self.context.notifier.on_event(emitted)
                except Exception:
                    log.exception("webhooks: failed to queue %s", emitted.kind)

    def _on_device(self, device_id: str, kind: DeviceTopic, payload: bytes) -> None:
        """A message a device published on its ``kind`` topic (most messages: parsed by the inbox)."""
        self._count(kind)
        if self.leading.is_set() and payload:
            self.ingestor.on_message(kind, device_id, payload)

    def _dispatch(self, topic: str, payload: bytes) -> None:
        """A message not on a device's topic (:meth:`_on_device`), or one of the inbox's own."""
        if topic == _CALL:
            self._run_call()
            return
        if topic == _CONNECTED:
            lost = self._session_known and self.client is not None and not self.client.session_present
            self._session_known = self._session_id is not None
            if self.leading.is_set():
                if lost:
                    log.warning("the broker lost our session (restarted without persistence?): republishing")
                    self.store.mark_all_unpublished()
                if self._resync:
                    # A deploy answered just before the last leader stopped may not have had
                    # its desired states recomputed yet (Publisher.recompute_later): now they are.
                    self._resync = False
                    try:
                        self.context.sync_now()
                    except Exception:
                        log.exception("failed to schedule every device on taking the lead")
                self.ingestor.connected(lost)
                self.context.publisher.reconnected(self.client is None or self.client.session_present)
                self.publish_pending()
                enrollment.publish_answers(self.context)
            self.ready.set()
            return
        parsed = topics.parse(topic)
        if parsed is None:
            return
        self._count(parsed.kind)
        if parsed.kind in ("requests", "leader-requests"):
            self._on_request(payload, parsed.user)
        elif not self.leading.is_set():
            return
        elif parsed.kind == "probe":
            self.context.publisher.probe_back(payload)
        elif topic == self.ingestor.asked_topic:
            self.ingestor.on_answer(payload)
        elif parsed.kind == "enroll-request" and parsed.device_id is not None and payload:
            enrollment.on_request(self.context, parsed.device_id, payload)

    # --- scheduling and publishing ---

    def publish_pending(self, device_ids: set[str] | None = None) -> None:
        """See :meth:`.publishing.Publisher.publish_pending`."""
        self.context.publisher.publish_pending(device_ids)

    def publish_acks(self) -> None:
        """See :meth:`.publishing.Publisher.publish_acks`."""
        self.context.publisher.publish_acks()

    def repair_behind(self) -> None:
        """See :meth:`.publishing.Publisher.repair_behind`."""
        self.context.publisher.repair_behind()

    def _publish_deferred(self) -> None:
        """See :meth:`.publishing.Publisher.publish_deferred`."""
        self.context.publisher.publish_deferred()

    def recompute(self, device_ids: set[str] | None = None) -> None:
        """See :meth:`.scheduling.Scheduler.recompute`."""
        self.context.scheduler.recompute(device_ids)

    # --- requests ---

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn()`` on the controller's worker thread, in turn with everything on its inbox
        (thread-safe); the future holds its result or its exception. What it leaves to
        publish is published right after, as after an MQTT request. A controller whose worker
        never started (a unit test's) runs it at once, on the caller's thread."""
        future: Future[T] = Future()
        self._calls.put((fn, future))
        if self._thread is None:
            self._run_call()
            self._publish_deferred()
        else:
            self.inbox.put((_CALL, b""))
        return future

    def _run_call(self) -> None:
        fn, future = self._calls.get_nowait()  # one per _CALL on the inbox, in the same order
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn()
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)

    def submit(self, command: CommandModel, principal: Principal) -> Future[Any]:
        """Carry out ``command`` on the controller's thread exactly as an MQTT request is (the
        HTTP API's way in; thread-safe, never blocks): the future holds its result model or the
        TetherError that refused it. A standby refuses a write with :class:`StandbyError` (over
        MQTT the leader answers those; over HTTP the client asks the leader). ``principal``:
        who asks (protocol/principals.py)."""

        def run(prepared: Any) -> Any:
            if not self.leading.is_set() and not self.commands.handler(command).read_only:
                raise StandbyError(
                    f"this controller stands by (--ha): {getattr(command, 'kind', '?')} is a write, ask the leader"
                )
            return self._answer(command, principal, prepared)

        answered: Future[Any] = Future()

        def forward(done: Future[Any]) -> None:
            if done.cancelled():
                answered.cancel()
            elif (exc := done.exception()) is not None:
                answered.set_exception(exc)
            else:
                answered.set_result(done.result())

        self._prepared(
            command, principal, lambda prepared: self.call(lambda: run(prepared)).add_done_callback(forward)
        )
        return answered

    def _prepared(self, command: CommandModel, principal: Principal, then: Callable[[Any], None]) -> None:
        """``then(prepared)``: at once (``None``) for most commands; for one whose handler has a
        ``prepare`` (controller/registry.py: hashing a password) that ``principal`` may run,
        once it ran on :attr:`_preparing`, so the controller's thread does not wait for it.
        ``prepared`` is what it returned or the error it raised (the handler raises it)."""
        prepare = self.commands.handler(command).prepare
        if prepare is None or not principal.may(self.commands.handler(command).role):
            then(None)
            return

        def work() -> None:
            try:
                prepared = prepare(self.context, command)
            except Exception as exc:  # raised by the handler, on the controller's thread
                prepared = exc
            then(prepared)

        self._preparing.submit(work)

    def _answer(self, command: CommandModel, principal: Principal, prepared: Any = None) -> Any:
        """A request's command carried out: its result, or the TetherError that refused it.

        What the command changed is stored and committed when it returns; publishing it waits
        until the answer is on its way (the worker publishes right after), so a deploy to
        10,000 devices is answered at once instead of after 10,000 acknowledgements."""
        self.context.publisher.deferring = True
        try:
            result = self.execute(command, principal, prepared)
        except TetherError:
            self.metrics.requests.labels(command=getattr(command, "kind", "?"), outcome="error").inc()
            raise
        finally:
            self.context.publisher.deferring = False
        self.metrics.requests.labels(command=getattr(command, "kind", "?"), outcome="ok").inc()
        return result

    def execute(self, command: CommandModel, principal: Principal = INTERNAL, prepared: Any = None) -> Any:
        """Carry out one command for ``principal``; return its result (a model of
        protocol/results.py) or raise a TetherError. The one place roles are checked and writes
        audited, for MQTT and HTTP alike: a principal whose role is below the command's
        (controller/registry.py) is refused with a :class:`ForbiddenError` before anything
        runs; every command above a viewer's is recorded with its outcome (controller/users.py).
        ``prepared``: what the handler's ``prepare`` made of ``command`` (see :meth:`_prepared`)."""
        handler = self.commands.handler(command)
        outcome = "internal"
        mark = len(self.context.events.due)
        try:
            if not principal.may(handler.role):
                raise ForbiddenError(
                    f"{principal.role} {principal.user!r} may not {getattr(command, 'kind', '?')} "
                    f"(it needs {handler.role})"
                )
            try:
                result = (
                    handler.run(self.context, command)
                    if prepared is None
                    else handler.run(self.context, command, prepared)
                )
            except BaseException:
                del self.context.events.due[mark:]  # nothing it did stays: nor do its events
                raise
            if not isinstance(result, handler.result):
                raise TypeError(
                    f"{'/'.join(command.kinds())} returned {type(result).__name__}, not {handler.result.__name__}"
                )
            outcome = "ok"
            return result
        except CommandError as exc:
            outcome = exc.code.value
            raise
        except TetherError:
            outcome = ErrorCode.INVALID.value
            raise
        finally:
            if handler.writes:
                try:
                    users.audit(self.store, principal, command, outcome, self.clock())
                except Exception:
                    log.exception(
                        "could not write the audit record of %s by %s", command.kinds(), principal.user
                    )

    def _principal(self, user: str | None, reply_to: str) -> Principal | None:
        """Who sent a request: the user of its topic (the broker let only that user publish
        there), or :data:`~tether.protocol.acl.LEGACY_USER` on the shared topic of older CLIs."""
        parsed = topics.parse(reply_to)
        address = (parsed.client_id or "") if parsed is not None else ""
        return users.principal_of(self.store, user or LEGACY_USER, "mqtt", address)

    def _on_request(self, payload: bytes, user: str | None = None) -> None:
        try:
            request = codec.decode(payload, Request)
        except PayloadError as exc:
            log.warning("ignoring malformed request: %s", exc)
            return
        parsed = topics.parse(request.reply_to)
        if parsed is None or parsed.kind != "replies":
            log.warning(
                "ignoring request %s: reply_to %r is not a client reply topic", request.id, request.reply_to
            )
            return

        def answer(prepared: Any = _UNPREPARED) -> Any:
            """The request answered (its checks run again once ``prepared``: leadership or the
            user may have changed meanwhile)."""
            command = COMMAND_ADAPTER.validate_python(request.command)
            if not self.leading.is_set() and not self.commands.handler(command).read_only:
                # A standby answers reads from the shared store; writes go to the leader.
                if self.client is not None:
                    forward = topics.LEADER_REQUESTS if user is None else topics.leader_requests(user)
                    self.client.publish(forward, payload, qos=1)
                return _NO_REPLY
            principal = self._principal(user, request.reply_to)
            if principal is None:
                raise ForbiddenError(
                    f"user {user or LEGACY_USER!r} is not a user of this controller (tether users ls)"
                )
            if prepared is not _UNPREPARED or self.commands.handler(command).prepare is None:
                return self._answer(command, principal, None if prepared is _UNPREPARED else prepared)

            def then(done: Any) -> None:
                self.call(lambda: self._reply(request, lambda: answer(done)))

            self._prepared(command, principal, then)  # answered once prepared, off this thread
            return _NO_REPLY

        self._reply(request, answer)

    def _reply(self, request: Request, answer: Callable[[], Any]) -> None:
        """Publish the reply to ``request``: ``answer()``'s result, or the error it raised
        (nothing if it returns ``_NO_REPLY``: another controller or a later call answers)."""
        try:
            result = answer()
            if result is _NO_REPLY:
                return
            reply = Reply(id=request.id, ok=True, result=result)
        except ValidationError as exc:
            reply = Reply(
                id=request.id,
                ok=False,
                error=f"invalid request: {codec.describe(exc)}",
                code=ErrorCode.INVALID,
            )
        except TetherError as exc:  # a refusal: a CommandError says why; any other is a bad request
            code = exc.code if isinstance(exc, CommandError) else ErrorCode.INVALID
            reply = Reply(id=request.id, ok=False, error=str(exc), code=code)
        except Exception as exc:
            log.exception("request %s failed", request.id)
            error = f"internal error: {exc.__class__.__name__}: {exc}"
            reply = Reply(id=request.id, ok=False, error=error, code=ErrorCode.INTERNAL)
        data = codec.encode(reply)
        if len(data) > codec.MAX_PAYLOAD:  # a broker would close our connection over it
            error = f"the reply ({len(data)} bytes) exceeds the {codec.MAX_PAYLOAD}-byte message limit"
            log.error("request %s: %s", request.id, error)
            data = codec.encode(Reply(id=request.id, ok=False, error=error, code=ErrorCode.TOO_LARGE))
        if self.client is not None:
            self.client.publish(request.reply_to, data, qos=1)
