"""Ingestion, the controller's side of what devices say: :class:`Ingestor`.

It takes the messages devices publish (presence, reported states, events with jobs'
results, metrics), validates each against the device whose topic it came on, stores what
changed and emits the fleet events it brings. Presence follows the agent's session
numbers: an ``offline`` (the will) only counts if its session is not older than the last
``online``, so a late will never hides a live device; after a restart every device shown
online is ``unknown`` until heard from again, and ``offline`` once its keepalive allowance
has passed (:meth:`Ingestor.presence_stale`, :meth:`Ingestor.expire_stale`); after a
reconnection, every device shown online must show life again or gets the will the broker
lost (:mod:`.reconfirm`, :meth:`Ingestor.reconfirm_presence`); and the broker's retained
presence is read again, of the devices not shown online every minute, of every device after
a sign that messages were lost (:mod:`.reread`, :meth:`Ingestor.reread_presence`).

What a device can make the controller keep is bounded (see :meth:`Ingestor.on_event`);
what is dropped or trimmed is counted per device and reason.

The :class:`~.service.Controller` owns one, hands it every device message its inbox loop
takes (in batches, inside the batch's transaction), and at the end of a batch stores the
reports due (:meth:`Ingestor.flush_reports`) and schedules the devices whose presence
asked for it (:meth:`Ingestor.take_syncs`). The Ingestor never reads the inbox, schedules
or publishes desired states itself: it is handed the controller's parts (its
:class:`~.context.Context`: the store, the clock, the :class:`~.publishing.Publisher` for
event acknowledgements and new connections, the :class:`~.deploying.Deployer` told that
devices changed, the fleet view, the fleet events), the metrics, and callables for the rest
(the MQTT session among them: it asks devices shown online for their facts after a
reconnection).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from pydantic import BaseModel, ValidationError
from tether.protocol import codec, topics
from tether.protocol.backoff import Backoff
from tether.protocol.device_api import MetricsSample, merge_sample
from tether.protocol.errors import PayloadError
from tether.protocol.models import Event, JobResult, Presence, ReportedState, Request
from tether.protocol.topics import DeviceTopic
from tether.protocol.transport import Transport

from .context import Context
from .fleet_events import FleetEvent, ReportSummary, device_subject, disk_event, report_events
from .models import Device
from .observability import Metrics
from .reconfirm import Reconfirm
from .reread import Reread

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
MAX_METRICS_DEVICES = 100_000
MAX_EVENT_MESSAGE = 2048
"""Characters of an event's message the controller keeps (and logs)."""
MAX_EVENT_BATCH = 1000
"""Events in one message (a batch) at most: a whole outbox (agents send batches of 100)."""
MAX_EVENT_DATA = 16 * 1024
"""Bytes (as JSON) of an event's data kept with it; larger data is left out of the stored event."""
MAX_JOB_OUTPUT = 16 * 1024
"""Characters of a job's output kept (the end; the agent sends at most 4096)."""
MAX_RUN_ID = 128
STALE_DEFAULT_KEEPALIVE = 60
"""The keepalive assumed for a device that does not tell its own (an older agent)."""


def job_outcome(result: JobResult) -> str:
    """A run's outcome, as /metrics counts it."""
    if result.skipped:
        return "skipped"
    if result.timed_out:
        return "timed_out"
    return "succeeded" if result.exit_code == 0 else "failed"


def _event_log_level(level: str) -> int:
    """The level a device's event of ``level`` is logged at: a warning or an error at
    ``warning``, an ``info`` one at ``debug`` (stored, and shown by ``tether devices show`` and
    the web UI: at ``tether up``'s default level a deploy to 10,000 devices would otherwise write
    40,000 lines)."""
    return logging.WARNING if level != "info" else logging.DEBUG


def _log_event(device_id: str, event: Event) -> None:
    """Log an event a device sent, the first time it is stored (at :func:`_event_log_level`)."""
    log.log(_event_log_level(event.level), "device %s: %s: %s", device_id, event.kind, event.message)


def _bounded_event(event: Event) -> tuple[Event, bool]:
    """The event as stored: message and data within bounds; and whether anything was cut."""
    update: dict[str, Any] = {}
    if len(event.message) > MAX_EVENT_MESSAGE:
        update["message"] = event.message[:MAX_EVENT_MESSAGE] + "..."
    for name in ("kind", "stack", "service"):
        value = getattr(event, name)
        if value is not None and len(value) > MAX_RUN_ID:
            update[name] = value[:MAX_RUN_ID]
    if event.data is not None and len(json.dumps(event.data, default=str)) > MAX_EVENT_DATA:
        update["data"] = {"dropped": f"more than {MAX_EVENT_DATA} bytes"}
    return (event.model_copy(update=update), True) if update else (event, False)


class _Kept(NamedTuple):
    """What is stored of an event, made once per distinct content of a deploy's events (see
    :class:`~tether.protocol.codec.BatchMemo`): alike on every device but for its id, seq and time."""

    stored: Event
    """The event as stored (:func:`_bounded_event`; its device, seq and time those of the first seen)."""
    body: codec.Template | None
    """Its stored JSON, but for the device, seq and time; None when it is stored otherwise
    (trimmed, a job's result: :meth:`Ingestor._store_event`)."""


_EVENT_VARY = ("device_id", "seq", "at", "oldest")
"""An event's fields that differ between the devices of a deploy (checked per event)."""


def _kept_event(event: Event) -> _Kept:
    stored, trimmed = _bounded_event(event)
    body = None
    if not trimmed and event.kind != "job.result":
        with contextlib.suppress(ValueError):  # a body pydantic writes otherwise: dumped whole
            plain = stored.model_copy(update={"device_id": "d", "seq": 0, "at": 0.0})  # not the first's own
            body = codec.Template(plain, ("device_id", "seq", "at"), json_exclude={"oldest"})
    return _Kept(stored, body)


def allowance(device: Device) -> float:
    """How long a device may stay silent after a restart before it counts as offline: the
    broker's 1.5 x keepalive for a dead link, plus the agent's longest reconnect backoff."""
    keepalive = device.facts.keepalive if device.facts and device.facts.keepalive else None
    return 1.5 * (keepalive or STALE_DEFAULT_KEEPALIVE) + Backoff().cap


class Ingestor:
    """What devices publish, stored and turned into fleet events (see the module docstring)."""

    def __init__(
        self,
        context: Context,
        *,
        metrics: Metrics,
        sync: Callable[[], None],
        online: Callable[[str], None],
        refresh: Callable[[], None],
        client: Callable[[], Transport | None],
        busy: Callable[[], bool] = lambda: False,
    ) -> None:
        """``context``: the controller's parts (its store, clock, publisher, deployer, fleet
        view, fleet events, and where each device's latest metrics sample and recent usage are
        kept); ``sync``: recompute every desired state and publish; ``online``: a device came
        online (its enrollment's answer is cleared); ``refresh``: recompute the gauges at the
        next tick; ``client``: the controller's MQTT session now (None before it starts);
        ``busy``: whether the inbox holds a burst of device messages."""
        self.store = context.store
        self.clock = context.clock
        self.metrics = metrics
        self.publisher = context.publisher
        self.deployer = context.deployer
        self._fleet_view = context.scheduler.fleet_view
        self._emitted = context.events.due  # the fleet events due (see on_event)
        self._emit = self._emitted.append
        self._sync = sync
        self._online = online
        self._refresh = refresh
        self._client = client
        self._busy = busy
        self.device_metrics = context.device_metrics
        self.device_history = context.device_history
        self._summaries: dict[str, ReportSummary] = {}  # each device's last report, as events see it
        self._disk_low: set[str] = set()  # devices whose disk is low (see disk_event)
        self._sync_devices: set[str] = set()  # devices to schedule at the end of a batch (see take_syncs)
        self._sync_all = False
        self._reports_due: dict[str, ReportedState] = {}  # written at the end of a batch (see flush_reports)
        self._events_due: list[
            tuple[str, int, str, int, Event]
        ] = []  # likewise (device, seq, JSON, oldest, event)
        self._event_memo = codec.BatchMemo(Event, _EVENT_VARY, _kept_event)  # a deploy's events are alike
        self._report_memo = codec.FieldMemo(ReportedState, "stacks")  # a fleet reports the same stacks
        self._stale: dict[str, float] = {}  # device -> when its ``unknown`` presence turns offline
        self._presence_trusted = False  # see connected
        self.reconfirm = Reconfirm()  # see reconfirm_presence
        self.reread = Reread()  # see reread_presence
        self._connections = 0  # see connected
        self._probes_lost = 0  # the publisher's count, when last looked at (see reread_presence)
        self.asked_topic = topics.replies(f"tether-controller-{uuid.uuid4().hex[:12]}")
        """Where devices answer :meth:`reconfirm_presence`'s requests (the controller subscribes)."""

    def on_message(self, kind: DeviceTopic, device_id: str, payload: bytes) -> None:
        """Handle one message a device published on its ``kind`` topic (in the caller's transaction)."""
        if kind == DeviceTopic.PRESENCE:
            self.on_presence(device_id, payload)
        elif kind == DeviceTopic.REPORTED:
            self.on_reported(device_id, payload)
        elif kind == DeviceTopic.EVENTS:
            self.on_event(device_id, payload)
        elif kind == DeviceTopic.METRICS:
            self.on_metrics(device_id, payload)

    def _event(self, kind: str, device_id: str, data: dict[str, Any]) -> None:
        self._emit(FleetEvent(kind, device_subject(device_id), self.clock(), data))

    def _decode_from(
        self, device_id: str, payload: bytes, model: type[M], memo: codec.FieldMemo[M] | None = None
    ) -> M | None:
        """A device's message, validated (by ``memo`` when given) and really about that device;
        None (logged) otherwise."""
        try:
            message = memo.decode(payload) if memo is not None else codec.decode(payload, model)
        except PayloadError as exc:
            log.warning("device %s: ignoring %s", device_id, exc)
            return None
        if message.device_id != device_id:  # type: ignore[attr-defined]
            log.warning("device %s: %s names another device; ignored", device_id, model.__name__)
            return None
        return message

    # --- presence ---

    def connected(self, lost: bool) -> None:
        """The leading controller is connected (again); ``lost``: the broker lost our session.
        Presence in the store is then not to be trusted (:meth:`presence_stale`), and the
        broker's retained presence never is (:meth:`reconfirm_presence`): a broker that
        restarted, alone or with the controller (a reboot), restores it with no will behind it.
        Connected again, it has every device's retained presence again at once (its
        subscriptions renewed): what of it the broker drops is read again (:meth:`reread_presence`)."""
        if lost or not self._presence_trusted:
            self.presence_stale()
        self.reconfirm_presence()
        self._connections += 1
        if self._connections > 1:
            self.reread.suspect()

    def presence_stale(self) -> None:
        """Every device shown online becomes ``unknown`` until it is heard from again.

        Called when the controller starts and when the broker lost our session: presence in
        the store may be stale (the embedded broker died with ``tether up``, and no will was
        ever published for the devices that were connected to it). A presence message turns
        a device back online (a reconnecting agent sends one; a broker that kept running
        sends the retained one, which its wills keep true); one not heard from within its
        keepalive allowance (:func:`allowance`) becomes ``offline``.
        """
        self._presence_trusted = True
        now = self.clock()
        stale = 0
        with self.store.transaction():
            for device in self.store.list_devices():
                if device.status not in ("online", "unknown"):
                    continue
                if device.status == "online":
                    self.store.put_device(device.model_copy(update={"status": "unknown", "since": now}))
                    stale += 1
                self._stale[device.id] = now + allowance(device)
        if stale:
            log.info("%d device(s) shown online before: unknown until heard from again", stale)
            self.deployer.dirty = True
            self._refresh()  # the gauges too, at the next tick

    def reconfirm_presence(self) -> None:
        """The controller (re)connected: the broker may have restarted and restored retained
        ``online`` presences no will is left to correct (:mod:`.reconfirm`). Every device shown
        online (or ``unknown``: the retained word would turn it online) must show life again
        within its allowance; those still silent after a while (:mod:`.reconfirm`) are asked
        for their facts, their turns spread out (:meth:`ask_unconfirmed`)."""
        now = self.clock()
        # Presence, facts and session only: not every device's reported state parsed again.
        shown = [d for d in self.store.list_devices(reported=False) if d.status in ("online", "unknown")]
        if self.reconfirm.start(((d.id, d.session, now + allowance(d)) for d in shown), now):
            log.info(
                "connected to the broker: %d device(s) shown online must show life again "
                "(those still silent are asked, %d a second)",
                len(shown),
                self.reconfirm.rate,
            )

    def ask_unconfirmed(self) -> None:
        """Ask the devices still silent since the reconnection whose turn has come (from the tick).
        None while the inbox holds a burst: the presences that show life may be waiting in it
        (a broker restart's storm: at 19,000 devices every device was asked, and its answer
        queued behind its presence, a third of the storm's backlog)."""
        client = self._client()
        if not len(self.reconfirm) or client is None or not client.connected or self._busy():
            return
        for request_id, device_id in self.reconfirm.asks(self.clock()):
            request = Request(id=request_id, reply_to=self.asked_topic, command={"kind": "facts"})
            client.publish(topics.device(device_id, DeviceTopic.REQUESTS), codec.encode(request), qos=0)

    def on_answer(self, payload: bytes) -> None:
        """A device's answer to :meth:`ask_unconfirmed`'s request: it is connected. Only its
        id matters: the facts it may carry are not decoded."""
        with contextlib.suppress(PayloadError):
            if self.reconfirm.answered(codec.peek_str(payload, "id")):
                log.info("every device shown online has shown life since the reconnection")

    def expire_unconfirmed(self) -> None:
        """Devices that showed no life since the reconnection within their allowance get the
        will the broker lost (from the tick): their retained ``offline`` presence, handled
        like any will when it comes back. None while the inbox holds a burst (as for asking)."""
        client = self._client()
        if not len(self.reconfirm) or client is None or not client.connected or self._busy():
            return
        for device_id, session in self.reconfirm.due(self.clock()):
            device = self.store.get_device(device_id)
            if device is None or device.status != "online" or device.session != session:
                continue
            log.warning(
                "device %s: shown online (session %d) but silent since the broker connection broke: "
                "publishing the offline presence the broker would have (did it restart?)",
                device_id,
                session,
            )
            will = Presence(device_id=device_id, status="offline", session=session, at=self.clock())
            client.publish(topics.device(device_id, DeviceTopic.PRESENCE), codec.encode(will), retain=True)

    def reread_presence(self) -> None:
        """Subscribe to the presence topics of the devices whose retained presence is to be
        read again now, and unsubscribe those of the last step (from the tick; :mod:`.reread`).
        A probe the controller sent itself through the broker that never came back is a sign
        that messages were lost: every device is read again."""
        client = self._client()
        if client is None or not client.connected:
            return
        if self.publisher.probes_lost != self._probes_lost:
            self._probes_lost = self.publisher.probes_lost
            log.warning(
                "a probe sent through the broker never came back: every device's presence is read again"
            )
            self.reread.suspect()
        was = self.reread.sweeping
        # Its own pace: monotonic, not the controller's clock (which tests and benchmarks move).
        read, done = self.reread.step(time.monotonic(), self._presence_status, self._busy())
        for device_id in done:
            client.unsubscribe(topics.device(device_id, DeviceTopic.PRESENCE))
        for device_id in read:
            client.subscribe(topics.device(device_id, DeviceTopic.PRESENCE))
        if read and not was:
            log.debug("reading the retained presence of devices again (%d a second)", self.reread.rate)

    def _presence_status(self) -> dict[str, str]:
        """Every device's presence status, and devices with credentials but no row as never
        seen: a device whose first presence was dropped is known only by its credential."""
        shown = {device_id: seen.status for device_id, seen in self._fleet_view().items()}
        for device_id in self.store.credentialed_devices():
            shown.setdefault(device_id, "never seen")
        return shown

    def expire_stale(self) -> None:
        """Devices still ``unknown`` past their allowance become ``offline`` (from the tick)."""
        if not self._stale:
            return
        now = self.clock()
        expired = [d for d, deadline in self._stale.items() if now >= deadline]
        changed = False
        for device_id in expired:
            del self._stale[device_id]
            device = self.store.get_device(device_id)
            if device is None or device.status != "unknown":
                continue
            self.store.put_device(device.model_copy(update={"status": "offline", "since": now}))
            log.info("device %s is offline (not heard from since the restart)", device_id)
            self._event("device.offline", device_id, {"session": device.session, "since": now})
            changed = True
        if changed:
            self.deployer.dirty = True
            self._refresh()
            if any(s.placement.mode == "replicas" for s in self.store.list_stacks()):
                self._sync()

    def on_presence(self, device_id: str, payload: bytes) -> None:
        """A device's presence: stored (with its facts); the device scheduled at the end of the
        batch when it is new or its labels changed (every device when ``replicas`` may move)."""
        presence = self._decode_from(device_id, payload, Presence)
        if presence is None:
            return
        stored = self.store.get_device(device_id, reported=False)  # a presence leaves it as it is
        device = stored or Device(id=device_id)
        if presence.session < device.session:
            return  # from an older connection: a late will or a stale retained message
        if (
            presence.session == device.session
            and presence.status == device.status
            and stored is not None
            and (presence.facts is None or presence.facts == device.facts)
        ):
            return  # what is shown already (a presence read again: see reread_presence)
        self._stale.pop(device_id, None)
        if self.reconfirm.heard(device_id, presence.session):
            log.info("every device shown online has shown life since the reconnection")
        now = self.clock()
        update: dict[str, Any] = {"session": presence.session, "status": presence.status}
        if presence.status != device.status:
            update["since"] = now
        if presence.facts is not None:
            update["facts"] = presence.facts
        new_device = stored is None
        updated = device.model_copy(update=update)
        # A new device is scheduled whatever it says (below): its attributes are not compared.
        labels_changed = not new_device and (
            updated.attributes() != device.attributes() or updated.public_key != device.public_key
        )
        self.store.put_device(updated, keep_reported=True)
        self.deployer.dirty = True
        if presence.status != device.status:
            # Back from ``unknown`` in the same session (the broker's retained word after our
            # restart): not news, and a whole fleet of it at once.
            same = device.status == "unknown" and presence.session == device.session
            log.log(
                logging.DEBUG if same else logging.INFO,
                "device %s is %s (session %d)",
                device_id,
                presence.status,
                presence.session,
            )
            if not same:
                self._event(
                    f"device.{presence.status}", device_id, {"session": presence.session, "since": now}
                )
        if presence.status == "online":
            self._online(device_id)
            if presence.session != device.session or device.status != "online":
                self.publisher.device_connected(device_id)  # a new connection: see repair_behind
            if stored is not None and presence.session == device.session and device.status != "online":
                # The ``online`` of a connection shown ended (or unconfirmed): a retained word
                # (read again: see reread_presence) the broker may have restored with no will
                # behind it. It must show life, or gets its will (see reconfirm_presence).
                self.reconfirm.wait(device_id, presence.session, now + allowance(updated))
        # Scheduled at the end of the batch of messages this one came in (take_syncs).
        if presence.status != device.status and any(
            s.placement.mode == "replicas" for s in self.store.list_stacks()
        ):
            self._sync_all = True  # replicas may move: a full pass restores the exact count
        elif labels_changed or new_device:
            self._sync_devices.add(device_id)

    def take_syncs(self) -> tuple[bool, set[str]]:
        """What presence asked to schedule since the last call: (every device, these devices)."""
        due = self._sync_all, self._sync_devices
        self._sync_all, self._sync_devices = False, set()
        return due

    # --- reported states ---

    def on_reported(self, device_id: str, payload: bytes) -> None:
        """A device's reported state: stored (the newest of each device at the end of the
        batch: :meth:`flush_reports`) unless older than the one stored, with its events."""
        reported = self._decode_from(device_id, payload, ReportedState, self._report_memo)
        if reported is None:
            return
        due = self._reports_due.get(device_id)
        # Not the whole device: reports are many.
        known = due.generation if due is not None else self.store.reported_generation(device_id)
        if known is not None and reported.generation < known:
            return  # older than what we have (QoS 1 may deliver twice, or late)
        # Checked when a generation is first reported (later reports of it change nothing),
        # from the generation's column: the record itself only when it has to be rewritten.
        issued = self.store.desired_generation(device_id) if reported.generation != known else None
        record = (
            self.store.get_desired(device_id) if issued is not None and reported.generation > issued else None
        )
        if record is not None and reported.generation > record.generation:
            # The device applied a generation we never issued: our state is older than the
            # device's (a restored backup). Jump past it, or the device would ignore us forever.
            log.warning(
                "device %s applied generation %d, newer than our %d: republishing as %d",
                device_id,
                reported.generation,
                record.generation,
                reported.generation + 1,
            )
            with self.store.transaction():
                self.store.put_desired(
                    record.model_copy(update={"generation": reported.generation + 1, "published": False})
                )
            self.publisher.defer({device_id})  # once committed (reports are handled in batches)
        self._report_events(device_id, reported, stored=known is not None)
        if known is None:  # its first report: the device row may not exist yet, or holds an old one
            # (in its body: there is no reported row, known would say so; none to join)
            device = self.store.get_device(device_id, reported=False)
            if device is None or device.reported is not None:
                device = device or Device(id=device_id)
                self.store.put_device(device.model_copy(update={"reported": reported}))
            else:
                self.store.put_reported(device_id, reported)
        else:
            # Written with the others of its batch (the newest per device), in one statement.
            self._reports_due[device_id] = reported
        self.deployer.dirty = True

    def _report_events(self, device_id: str, reported: ReportedState, stored: bool) -> None:
        """Emit what a report changed (what the device runs, a crash loop, a stuck download, a
        full disk); ``stored``: the device has a reported state stored (or due)."""
        before = self._summaries.get(device_id)
        if before is None and stored:
            # First heard of since we started: compare with the report we stored, as the
            # fleet view has it (not parsed again: 10,000 parses after every restart).
            seen = self._fleet_view().get(device_id)
            before = ReportSummary.of_seen(seen) if seen is not None else None
        after = ReportSummary.of(reported)
        self._summaries[device_id] = after
        for event in report_events(device_id, before, after, self.clock()):
            self._emit(event)

    def flush_reports(self) -> None:
        """Store the reported states of the batch: the newest of each device, in one statement
        (in the batch's transaction; a device that reports converging, then running, within
        one batch is written once); and its events (:meth:`_flush_events`)."""
        if self._reports_due:
            due, self._reports_due = self._reports_due, {}
            self.store.put_reported_many(due.items())
        self._flush_events()

    # --- events and jobs' results ---

    def on_event(self, device_id: str, payload: bytes) -> None:
        """Store an event (bounded: see :data:`MAX_EVENT_MESSAGE`) and a job's result.

        What one device can make the controller keep is bounded: the newest EVENTS_KEPT
        events, each trimmed to MAX_EVENT_MESSAGE characters and MAX_EVENT_DATA bytes of
        data; results only of jobs the controller has, JOB_RESULTS_KEPT per job, each output
        trimmed to MAX_JOB_OUTPUT. What is dropped or trimmed is counted per device and
        reason (``devices show``, ``/metrics``).

        ``payload`` is one event or a batch of them (a msgpack array, oldest first, agents
        since issue 21): a batch is validated whole, then each of its events is handled as
        one sent alone (one whose handling fails is undone alone, not acknowledged, and the
        events after it still count); a batch with one bad event (or naming another device) is refused
        whole, logged naming that event and what is wrong, and nothing of it is stored or
        acknowledged."""
        try:
            events = self._event_memo.decode_many(payload, MAX_EVENT_BATCH, "seq")
        except PayloadError as exc:
            log.warning("device %s: ignoring %s", device_id, exc)
            return
        for i, (_, _, (named, seq, _, _)) in enumerate(events):
            if named != device_id:
                where = f"Event batch: item {i + 1} of {len(events)} (seq {seq})"
                log.warning("device %s: %s names another device; ignored", device_id, where)
                return
        due = self._events_due
        for event, kept, values in events:  # each as if it came alone: one that fails undoes only itself
            if kept is not None and kept.body is not None:  # a deploy's: made once, the rest filled in
                try:
                    body = kept.body.dump_json(device_id, values[1], values[2])
                except ValueError:  # a device id or time written otherwise: by _store_event
                    pass
                else:  # only to store and log: with the batch's others, in one statement
                    due.append((device_id, values[1], body, values[3], kept.stored))
                    continue
            if len(events) == 1:
                self._store_event(device_id, event, kept, values)  # the caller's unit undoes it if it fails
                return
            mark = len(self._emitted)
            try:
                self._store_event(device_id, event, kept, values, alone=True)
            except Exception:
                del self._emitted[mark:]  # its writes and acknowledgement were undone: so are its events
                log.exception("device %s: event %d could not be handled", device_id, values[1])

    def _store_event(
        self,
        device_id: str,
        event: Event,
        kept: _Kept | None,
        values: tuple[str, int, float, int],
        alone: bool = False,
    ) -> None:
        """One event of ``device_id``, validated (see :meth:`on_event`): ``event`` with the
        ``values`` of its fields that vary (:data:`_EVENT_VARY`); ``kept``: None if ``event``
        is the event itself (validated alone), else it has the content of the first alike.
        ``alone``: in a savepoint of its own (one of a batch: if it fails, only its own writes
        are undone)."""
        _, seq, _, oldest = values
        if kept is not None:
            event = event.model_copy(update=dict(zip(_EVENT_VARY, values, strict=True)))
        stored, trimmed = _bounded_event(event)
        # Stored without ``oldest`` (what the device still queued then): no copy made for it.
        body = stored.model_dump_json(exclude={"oldest"})
        if not trimmed and event.kind != "job.result":  # only to store and log: with the batch's
            self._events_due.append((device_id, seq, body, oldest, stored))  # others, in one statement
            return
        # One of a batch: in a savepoint of its own, so that if it fails only its own writes
        # (and acknowledgement) are undone (not for those above: they write nothing here).
        with self.store.transaction() if alone else contextlib.nullcontext():
            added = self.store.add_event(device_id, seq, body)
            self._acknowledge(device_id, seq, oldest)
            if not added:
                return  # delivered twice (at least once on the wire): already stored
            if trimmed:
                self._dropped(device_id, "event_trimmed")
            if event.kind == "job.result" and event.data is not None:
                self._on_job_result(device_id, event.data)
        _log_event(device_id, stored)

    def _flush_events(self) -> None:
        """Store the events :meth:`on_event` left due (a batch's: one statement per few
        hundred), and log those not stored before (a device sends again what it has no
        acknowledgement for)."""
        if self._events_due:
            due, self._events_due = self._events_due, []
            try:
                with self.store.transaction():  # a savepoint: an event refused undoes only itself
                    added = self.store.add_events([(d, seq, body) for d, seq, body, _, _ in due])
            except Exception:
                due, added = self._add_each(due)
            # Acknowledged together once committed (what is stored of devices not heard of
            # since the controller started is then read in one query: Publisher.note_stored_many).
            stored = [(device_id, seq, oldest) for device_id, seq, _, oldest, _ in due if oldest]
            if stored:
                self.store.after_commit(lambda: self.publisher.note_stored_many(stored))
            if len(added) == len(due):  # each stored now (none twice): each logged
                info = log.isEnabledFor(_event_log_level("info"))  # else an info event is not logged
                for device_id, _, _, _, event in due:
                    if info or event.level != "info":
                        _log_event(device_id, event)
            elif added:
                for device_id, seq, _, _, event in due:
                    if (device_id, seq) in added:
                        added.discard((device_id, seq))  # sent twice in the batch: logged once
                        _log_event(device_id, event)

    def _add_each(
        self, due: list[tuple[str, int, str, int, Event]]
    ) -> tuple[list[tuple[str, int, str, int, Event]], set[tuple[str, int]]]:
        """The events of ``due`` stored one by one, each in its own savepoint, once storing
        them together failed: those the database refuses are left out, not acknowledged (the
        device sends them again), as when each was stored with its message. The events
        stored (now or before), and the (device, seq) of those stored now."""
        kept: list[tuple[str, int, str, int, Event]] = []
        added: set[tuple[str, int]] = set()
        for item in due:
            device_id, seq, body, _, _ = item
            try:
                with self.store.transaction():
                    if self.store.add_event(device_id, seq, body):
                        added.add((device_id, seq))
            except Exception:
                log.exception("device %s: event %d could not be stored", device_id, seq)
                continue
            kept.append(item)
        return kept, added

    def _acknowledge(self, device_id: str, seq: int, oldest: int) -> None:
        """Event ``seq`` is stored (or was before): acknowledged once committed (the device
        drops what is acknowledged); not if the device did not say its ``oldest``."""
        if oldest:
            self.store.after_commit(lambda: self.publisher.note_stored(device_id, seq, oldest))

    def _on_job_result(self, device_id: str, data: dict[str, Any]) -> None:
        try:
            result = JobResult.model_validate(data)
        except ValidationError as exc:
            log.warning("device %s: ignoring malformed job result: %s", device_id, codec.describe(exc))
            self._dropped(device_id, "job_result_malformed")
            return
        if len(result.run) > MAX_RUN_ID or self.store.get_job(result.job) is None:
            self._dropped(device_id, "job_result_unknown_job")
            return
        if len(result.output) > MAX_JOB_OUTPUT:
            result = result.model_copy(update={"output": result.output[-MAX_JOB_OUTPUT:]})
            self._dropped(device_id, "job_output_trimmed")
        known = self.store.has_job_result(result.job, device_id, result.run)  # a redelivery counts once
        self.store.add_job_result(result.job, device_id, result.run, result.started, result.model_dump_json())
        if not known:
            self.metrics.job_runs.labels(outcome=job_outcome(result)).inc()
            self._event(
                "job.result",
                device_id,
                {
                    "job": result.job,
                    "run": result.run,
                    "outcome": job_outcome(result),
                    "exit_code": result.exit_code,
                },
            )

    def _dropped(self, device_id: str, reason: str) -> None:
        """Count a message of ``device_id`` not stored as sent; log at the 1st, 10th, 100th..."""
        count = self.store.count_dropped(device_id, reason)
        self.metrics.dropped.labels(reason=reason).inc()
        if str(count).rstrip("0") == "1":
            log.warning("device %s: %d message(s) not stored as sent: %s", device_id, count, reason)

    # --- metrics (latest sample per device, in memory; see protocol/device_api.py) ---

    def on_metrics(self, device_id: str, payload: bytes) -> None:
        """A device's metrics sample: kept in memory (the latest, and a downsampled history)."""
        try:
            sample = codec.decode(payload, MetricsSample)
        except PayloadError as exc:
            log.debug("device %s: ignoring metrics: %s", device_id, exc)
            return
        previous = self.device_metrics.get(device_id)
        if previous is None and len(self.device_metrics) >= MAX_METRICS_DEVICES:
            return  # bounded memory, whoever publishes on metrics topics
        if previous is not None and sample.at < previous["at"]:
            return  # older than what we have (QoS 0 may reorder across reconnects)
        merged = self.device_metrics[device_id] = merge_sample(previous, sample, self.clock())
        self.device_history.add(device_id, merged["received"], merged)
        low = device_id in self._disk_low
        now_low, event = disk_event(
            device_id, low, merged.get("disk"), merged.get("disk_total"), self.clock()
        )
        if now_low != low:
            (self._disk_low.add if now_low else self._disk_low.discard)(device_id)
        if event is not None:
            self._emit(event)
