"""Publishing, the controller's side of what devices are told: :class:`Publisher`.

It publishes what the broker does not have yet (stack definitions, then desired states, then
clearing definitions no device references any more), each publish awaited before it is
marked published; publishes again to devices that stay behind a broker that forgot what it
acknowledged (:meth:`Publisher.repair_behind`); acknowledges the events the controller
stored (:meth:`Publisher.publish_acks`); and, while a request is answered, only notes what
to publish, published once the reply is on its way (:attr:`Publisher.deferring`).

The :class:`~.service.Controller` owns one and hands it what it needs of the running
controller (its MQTT session, the fleet view, whether it leads, whether the inbox holds a
burst): the Publisher never reads the inbox or the scheduling itself.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tether.protocol import codec, names, topics
from tether.protocol.models import MAX_COUNTER, DesiredState, EventsAcked, StackDefinition
from tether.protocol.topics import DeviceTopic
from tether.protocol.transport import Transport

from .fleet import Seen
from .models import DesiredRecord, spec_hashes
from .observability import Metrics
from .security import BrokerAccess
from .store import Store

log = logging.getLogger(__name__)

ACK_MAX_DELAY = 10.0
"""Event acknowledgements wait while the inbox holds a burst, at most this long."""
BEHIND_GRACE = 15.0
"""Seconds an online device may report an older generation than the one published to it
before its desired state and definitions are published again (see :meth:`Publisher.repair_behind`)."""
BEHIND_CHECK = 5.0
"""Seconds between two looks for devices that stay behind (see :meth:`Publisher.repair_behind`)."""
BEHIND_BACKOFF_MAX = 300.0
"""Republishing to a device that stays behind backs off (doubling from the grace) up to this."""
PROBE_LOST = 60.0
"""A probe (see :meth:`Publisher.repair_behind`) not back after this many seconds is sent again."""


@dataclass(slots=True)
class _Marks:
    """Which events of a device are stored: every ``seq`` up to ``acked``, and ``above`` it."""

    acked: int
    last: int
    above: set[int] | frozenset[int]
    """:data:`_NO_SEQS` when none (most devices, most of the time: a set each was 216 bytes)."""


_NO_SEQS: frozenset[int] = frozenset()


class Publisher:
    """What the controller publishes to devices (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float],
        metrics: Metrics,
        access: BrokerAccess,
        client: Callable[[], Transport | None],
        leading: threading.Event,
        fleet_view: Callable[[], dict[str, Seen]],
        busy: Callable[[], bool],
        recompute: Callable[[], list[DesiredRecord] | None],
    ) -> None:
        """``client``: the controller's MQTT session now (None before it starts); ``leading``:
        set while it leads; ``fleet_view``: every device as deployment steps see it; ``busy``:
        whether the inbox holds a burst of device messages not stored yet; ``recompute``:
        every desired state recomputed in a transaction of its own, giving every desired
        record as committed (see :meth:`recompute_later`)."""
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.access = access
        self._client = client
        self._leading = leading
        self._fleet_view = fleet_view
        self._busy = busy
        self._publish_after: set[str] = set()  # devices to publish once the worker's transaction is committed
        self._publish_all = (
            False  # everything, once the worker's request is answered (see Controller._answer)
        )
        self.deferring = False
        """Answering a request: publish_pending only notes what to publish (see Controller._answer)."""
        self._recompute = recompute
        self._recompute_all = False  # see recompute_later
        self._recompute_failed = False  # see retry_recompute
        self._published_gen: dict[str, int] | None = (
            None  # per device, the generation the broker acknowledged
        )
        self._behind: dict[str, tuple[float, float, float]] = {}  # see repair_behind
        self._acked_at: dict[str, float] = {}  # device -> when its desired state was acknowledged
        self._connected_at: dict[str, float] = {}  # device -> when it last connected (see repair_behind)
        self._probe: tuple[bytes, float] | None = None  # the probe in flight, and when it was sent
        self.probes_lost = 0
        """Probes not back after :data:`PROBE_LOST` (the broker may have dropped messages for us)."""
        self._caught_up = float("-inf")  # every device message the broker had then is handled
        self._lead_since = 0.0
        self._event_marks: dict[str, _Marks] = {}  # see note_stored
        self._acks_due: set[str] = set()
        self._acks_resend = False
        self._acks_since: float | None = None  # when the acknowledgements due began to wait

    def lead(self) -> None:
        """This controller leads from now: forget what another may have published or stored since."""
        self._published_gen = None  # what was published
        self._acked_at, self._probe, self._caught_up = {}, None, float("-inf")  # and when
        self._connected_at = {}
        self._lead_since = time.monotonic()
        self._event_marks = {}  # and which events are stored

    def reconnected(self, session_present: bool) -> None:
        """The controller (leading) is connected again; ``session_present``: the broker kept its session."""
        if not session_present:
            self._acks_resend = True  # events may have been published with nobody subscribed
        self._probe = None  # one in flight may be lost with the connection: send another

    def probe_back(self, payload: bytes) -> None:
        """A probe came back (see :meth:`repair_behind`)."""
        if self._probe is not None and payload == self._probe[0]:
            self._caught_up, self._probe = self._probe[1], None

    def device_connected(self, device_id: str) -> None:
        """``device_id`` connected anew (a new session, or back online): see :meth:`repair_behind`."""
        self._connected_at[device_id] = time.monotonic()

    def defer(self, device_ids: set[str] | None) -> None:
        """Publish ``device_ids`` (None: everything) at the next :meth:`publish_deferred`."""
        if device_ids is None:
            self._publish_all = True
        else:
            self._publish_after.update(device_ids)

    def publish_retained(self, topic: str, payload: bytes) -> bool:
        """Publish a retained message (QoS 1) and wait for the broker; False if not acknowledged
        or not connected."""
        client = self._client()
        return client is not None and client.publish_confirmed(topic, payload, qos=1, retain=True)

    PUBLISH_BATCH = 10_000
    """Desired states handed to the client at once, then awaited. paho keeps
    :data:`~tether.protocol.mqtt.MAX_INFLIGHT` of them in flight and sends the others as
    PUBACKs come, so the broker's window stays full; each batch ends with a wait for its last
    PUBACKs (about 50 ms a batch, measured with Mosquitto): 10,000 desired states took about
    1.05 s in batches of 500, 0.4 s in one."""
    REPUBLISH_MAX = 500
    """Devices that stay behind published again per look, at most (see :meth:`repair_behind`)."""

    def publish_pending(
        self, device_ids: set[str] | None = None, stored: list[DesiredRecord] | None = None
    ) -> None:
        """Publish what the broker does not have yet, in acknowledged batches.

        Order: stack definitions, then desired states, then (on a full pass) clearing the
        definitions no device references any more. Each message is marked published only
        once the broker acknowledged it; whatever is not stays pending for the next pass.
        ``stored`` (a full pass): every desired record as just committed, by device id (what
        a recompute gave), not read back from the store.
        """
        if self.deferring:  # answering a request: published once the reply is sent
            self.defer(device_ids)
            return
        client = self._client()
        if client is None or not client.connected:
            return
        if device_ids is None:
            records = stored if stored is not None else self.store.list_desired()
        else:
            records = [r for d in sorted(device_ids) if (r := self.store.get_desired(d)) is not None]
        needed = spec_hashes(p for r in records for p in (r.stacks, r.stage))
        definitions = self.store.definitions()
        to_define = sorted(h for h, published in definitions.items() if h in needed and not published)
        if to_define:
            specs = {h: spec for h in to_define if (spec := self.store.get_spec(h)) is not None}
            payloads = {h: codec.encode(StackDefinition(spec_hash=h, spec=specs[h])) for h in specs}
            to_define = [
                h for h in to_define if h in specs and _fits(f"stack definition {h[:12]}", payloads[h])
            ]
            acked = client.publish_many([(topics.stack(h), payloads[h], 1, True) for h in to_define])
            with self.store.transaction():
                for spec_hash, ok in zip(to_define, acked, strict=True):
                    if ok:
                        self.store.set_definition(spec_hash, True)
            if not all(acked):
                return
        unpublished = [r for r in records if not r.published and names.DEVICE_ID.ok(r.device_id)]
        now = self.clock()
        acknowledged: list[DesiredRecord] = []
        try:
            complete = self._publish_desired(client, unpublished, now, acknowledged)
        finally:
            # Marked once the broker has them all (or the rest failed): while the next batch
            # waited on these writes, 10,000 devices waited on them too.
            if acknowledged:
                with self.store.transaction():
                    self.store.mark_published(acknowledged)
                self.metrics.published.inc(len(acknowledged))
                published = self._published_generations()
                acked_at = time.monotonic()
                for record in acknowledged:
                    published[record.device_id] = record.generation
                    self._acked_at[record.device_id] = acked_at
        if not complete:
            return
        if device_ids is None:
            for spec_hash in sorted(set(definitions) - needed):
                # No device references it any more: clear the retained definition.
                if not client.publish_confirmed(topics.stack(spec_hash), b"", retain=True):
                    return
                self.store.delete_definition(spec_hash)

    def _publish_desired(
        self,
        client: Transport,
        unpublished: list[DesiredRecord],
        now: float,
        acknowledged: list[DesiredRecord],
    ) -> bool:
        """Publish desired states in acknowledged batches; collect the acknowledged records.
        False if one was not acknowledged (the rest stays unpublished)."""
        templates: dict[tuple[int, ...], tuple[DesiredRecord, codec.Template]] = {}
        for start in range(0, len(unpublished), self.PUBLISH_BATCH):
            batch = unpublished[start : start + self.PUBLISH_BATCH]
            table = self.access.table
            if table is not None:  # before the device hears of them: it may subscribe to these
                assigned = {r.device_id: r.hashes() for r in batch}
                if any(table.stacks_of(d) != h for d, h in assigned.items()):
                    table.set_stacks(assigned)
                    if self.access.on_credentials_changed is not None:
                        self.access.on_credentials_changed()
            sent: list[DesiredRecord] = []
            messages: list[tuple[str, bytes, int, bool]] = []
            for r in batch:  # one pass per device
                payload = _desired_payload(r, now, templates)
                # One that can never be sent stays unpublished (the device keeps its current
                # state) and does not hold back the others.
                if not _fits(f"desired state of {r.device_id}", payload):
                    continue
                sent.append(r)
                messages.append((topics.device(r.device_id, DeviceTopic.DESIRED), payload, 1, True))
            acked = client.publish_many(messages)
            acknowledged.extend(record for record, ok in zip(sent, acked, strict=True) if ok)
            if not all(acked):
                return False
        return True

    def _published_generations(self) -> dict[str, int]:
        """Per device, the generation of the desired state the broker acknowledged (in memory,
        read from the store once per leadership)."""
        if self._published_gen is None:
            self._published_gen = {
                r.device_id: r.generation for r in self.store.list_desired() if r.published
            }
        return self._published_gen

    def repair_behind(self) -> None:
        """Publish again the desired state (and definitions) of online devices that stay behind.

        A broker can forget what it acknowledged: Mosquitto killed between two autosaves
        restarts from its last snapshot, with our session (so nothing says it lost anything)
        but older retained desired states and definitions. A device that reconnects then gets
        an old generation and would stay on it for good. So an online device, not held and
        not rejecting, that still reports an older generation than the one published to it
        gets its desired state and the definitions it references published again: idempotent
        (same generation; the agent drops what it has), and rate-limited per device (the
        wait doubles from :data:`BEHIND_GRACE` up to :data:`BEHIND_BACKOFF_MAX`).

        Staying behind means: the device connected again after the broker acknowledged its
        desired state (a broker that loses what it acknowledged has restarted, so every device
        reconnects; one that did not reconnect gets what was published on its session), and
        this controller has handled every message the broker held :data:`BEHIND_GRACE`
        seconds after that connection (and after the device was first seen behind), none
        saying the device caught up. Counting the grace from the publish alone republished
        to thousands of devices of a loaded 10,000-device deploy that were merely slow to get
        to it, or whose reports were queued (at the broker or in the inbox) behind everyone
        else's. What has been handled is known from a probe: a message this controller sends
        itself through the broker (:data:`topics.PROBE`), delivered after whatever the broker
        had before it; when it is back, everything the broker held when it was sent has been
        handled. (For a desired state published before this controller led, when it was
        acknowledged is not known: the grace then counts from the start of the leadership.)
        """
        client = self._client()
        if client is None or not client.connected:
            return
        if self._busy():
            return  # a burst of reports not stored yet: devices may look behind that are not
        now = time.monotonic()
        if self._probe is None or now - self._probe[1] > PROBE_LOST:
            if self._probe is not None:
                self.probes_lost += 1
            token = uuid.uuid4().hex.encode()
            if client.publish(topics.PROBE, token, qos=1):
                self._probe = (token, now)
        published = self._published_generations()
        fleet = self._fleet_view()
        due: list[str] = []
        for device_id in list(self._behind):
            seen = fleet.get(device_id)
            if seen is None or seen.generation >= published.get(device_id, -1) or not seen.online:
                del self._behind[device_id]
        acked_at, caught_up = self._acked_at, self._caught_up
        for device_id, generation in published.items():
            seen = fleet.get(device_id)
            if seen is None or not seen.online or seen.held or seen.error:
                continue
            if seen.generation >= generation:
                if device_id in acked_at:
                    del acked_at[device_id]
                continue
            published_at = acked_at.get(device_id)
            if published_at is None:
                start = self._lead_since
            elif (start := self._connected_at.get(device_id, -1.0)) < published_at:
                continue  # connected since before the publish: it gets the desired state on that session
            since, wait, next_at = self._behind.setdefault(device_id, (now, BEHIND_GRACE, now + BEHIND_GRACE))
            if now < next_at or max(since, start) + BEHIND_GRACE > caught_up:
                continue  # not yet, or its report may still be on its way to us
            if len(due) < self.REPUBLISH_MAX:
                due.append(device_id)
                wait = min(2 * wait, BEHIND_BACKOFF_MAX)
                self._behind[device_id] = (since, wait, now + wait)
        if not due:
            return
        records = [r for d in due if (r := self.store.get_desired(d)) is not None and r.published]
        hashes = sorted({h for r in records for h in r.hashes()})
        specs = {h: spec for h in hashes if (spec := self.store.get_spec(h)) is not None}
        example = records[0] if records else None
        if example is not None:
            log.warning(
                "%d device(s) report an older generation than published to them for %.0fs or more "
                "(%s: %d, published %d): publishing their desired state and %d definition(s) again "
                "(did the broker lose them?)",
                len(records),
                BEHIND_GRACE,
                example.device_id,
                fleet[example.device_id].generation,
                example.generation,
                len(specs),
            )
        acked = client.publish_many(
            [
                (topics.stack(h), codec.encode(StackDefinition(spec_hash=h, spec=spec)), 1, True)
                for h, spec in specs.items()
            ]
        )
        if not all(acked):
            return
        again: list[DesiredRecord] = []
        self._publish_desired(client, records, self.clock(), again)
        acked_now = time.monotonic()
        for record in again:
            self._acked_at[record.device_id] = acked_now
        self.metrics.republished.inc(len(records))

    def note_stored(self, device_id: str, seq: int, oldest: int) -> None:
        """Event ``seq`` of ``device_id`` is stored; ``oldest``: the device will send nothing
        below it. Advance the device's acknowledgement: every ``seq`` up to it stored."""
        self.note_stored_many([(device_id, seq, oldest)])

    def note_stored_many(self, stored: Sequence[tuple[str, int, int]]) -> None:
        """:meth:`note_stored` of each (device, seq, oldest) in turn. What is stored of the
        devices first heard of since we started is read together (one query per
        :data:`~.store._IN_CHUNK` devices), not device by device: a freshly started
        controller's first deploy to 10,000 devices made one query each."""
        unknown: dict[str, int] = {}
        for device_id, _, oldest in stored:
            if device_id not in self._event_marks and device_id not in unknown:
                unknown[device_id] = oldest - 1
        if unknown:  # first heard of since we started: what is stored above its oldest
            found = self.store.event_seqs_above_many(unknown)
            for device_id, below in unknown.items():
                above = set(found.get(device_id, ()))
                self._event_marks[device_id] = _Marks(below, max(above, default=0), above or _NO_SEQS)
        marks_of, due = self._event_marks, self._acks_due
        for device_id, seq, oldest in stored:
            marks = marks_of[device_id]
            if oldest > marks.acked:
                marks.acked = oldest - 1
            if seq > marks.last:
                marks.last = seq
            if not marks.above and seq <= marks.acked + 1:  # the next (or a stored one): no set
                if seq > marks.acked:
                    marks.acked = seq
                due.add(device_id)
                continue
            if seq > marks.acked:
                if isinstance(marks.above, set):
                    marks.above.add(seq)
                else:
                    marks.above = {seq}
            while marks.acked + 1 in marks.above:
                marks.acked += 1
            if marks.above:
                marks.above = {s for s in marks.above if s > marks.acked} or _NO_SEQS
            due.add(device_id)  # also when unchanged: a resent event means ours was missed

    def publish_acks(self) -> None:
        """Publish the acknowledgements due (from the tick: at most one per device a second).

        Retained, so an agent that reconnects has the latest at once; QoS 0: a lost one is
        repeated when the device sends again. After a connection on which the broker had no
        session of ours (we start, or it lost its state) every device is told to resend what
        it delivered and we do not acknowledge: it may have reached a broker with nobody
        subscribed.
        """
        client = self._client()
        if client is None or not client.connected or not self._leading.is_set():
            return
        if not self._acks_due and not self._acks_resend:
            self._acks_since = None
            return
        now = time.monotonic()
        if self._acks_since is None:
            self._acks_since = now
        if self._busy() and now - self._acks_since < ACK_MAX_DELAY:
            return  # a burst (a deploy to a big fleet): storing reports comes first
        self._acks_since = None
        resend = self._acks_resend
        if resend:
            self._acks_resend = False
            self._acks_due.update(self._fleet_view())
        due, self._acks_due = sorted(self._acks_due), set()
        template: codec.Template | None = None  # the bytes of codec.encode(EventsAcked(...)), per device
        for device_id in due:
            if not topics.DEVICE_ID_RE.match(device_id):
                continue
            marks = self._event_marks.get(device_id)
            seq, last = (marks.acked, marks.last) if marks else (0, 0)
            if template is not None and seq >= 0 and last >= 0:  # EventsAcked's bounds
                payload = template.encode(device_id, seq, last)
            else:
                ack = EventsAcked(device_id=device_id, seq=seq, last=last, resend=resend)
                payload = codec.encode(ack)
                template = codec.Template(ack, ("device_id", "seq", "last"))
            client.publish(topics.device(device_id, DeviceTopic.ACKED), payload, qos=0, retain=True)

    def recompute_later(self) -> bool:
        """While a request is answered (:attr:`deferring`): every desired state is recomputed
        right after the reply is sent, before anything else is handled, then published; True.
        Otherwise False: the caller recomputes now, in its transaction.

        For a change whose durable part is committed before the reply (a deploy: the stack,
        its version and its deployment), the desired states being only what follows from the
        store: the controller that leads next recomputes them all (``Controller``, at its
        first connection), so a crash between the reply and this loses nothing. At 10,000
        devices recomputing and storing them was two thirds of a deploy's time before the reply."""
        if not self.deferring:
            return False
        self._recompute_all = True
        return True

    def retry_recompute(self) -> None:
        """From the tick (once a second, not after every message: a recompute that keeps failing
        must not starve the worker): a recompute after a reply that failed (a store error) is
        tried again until it succeeds, so an answered deploy still reaches its devices."""
        if self._recompute_failed:
            self._recompute_all = True
            self.publish_deferred()

    def publish_deferred(self) -> None:
        """Publish what a request or a batch of device messages left to publish (committed now)."""
        stored: list[DesiredRecord] | None = None  # every record, as the recompute committed them
        if self._recompute_all:
            self._recompute_all = False
            self._publish_all = True
            try:
                stored = self._recompute()
            except Exception:  # retried by the tick (retry_recompute), or done by the next leader
                self._recompute_failed = True
                log.exception("failed to schedule every device after a request: retrying every second")
            else:
                self._recompute_failed = False
        if self._publish_after or self._publish_all:
            device_ids, self._publish_after = self._publish_after, set()
            publish_all, self._publish_all = self._publish_all, False
            # At 10,000 devices reading every record back after the recompute wrote it was
            # a tenth of publishing them.
            self.publish_pending(None if publish_all else device_ids, stored if publish_all else None)


def _desired_payload(
    record: DesiredRecord, now: float, templates: dict[tuple[int, ...], tuple[DesiredRecord, codec.Template]]
) -> bytes:
    """The encoded :class:`DesiredState` of ``record`` issued at ``now``: the bytes of
    ``codec.encode(DesiredState(...))``, made from a :class:`codec.Template` of the first record
    with the same stacks, jobs, variables, registries and stage (the same objects: a deploy's
    records share them), only its id and generation packed per device. ``templates``: those of
    this pass (one ``now``)."""
    key = (id(record.stacks), id(record.jobs), id(record.vars), id(record.registries), id(record.stage))
    hit = templates.get(key)
    if hit is not None and 0 <= record.generation <= MAX_COUNTER:  # DesiredState's bounds
        return hit[1].encode(record.device_id, record.generation)
    state = DesiredState(
        device_id=record.device_id,
        generation=record.generation,
        stacks=record.stacks,
        jobs=record.jobs,
        vars=record.vars,
        registries=record.registries,
        stage=record.stage,
        issued_at=now,
    )
    if hit is None:  # the record is kept with it: the objects whose ids are the key stay alive
        templates[key] = (record, codec.Template(state, ("device_id", "generation")))
    return codec.encode(state)


_TOO_LARGE: set[tuple[str, int]] = set()
"""What :func:`_fits` refused and logged already (every publishing pass tries again)."""


def _fits(what: str, payload: bytes) -> bool:
    """Whether ``payload`` fits in a message (:data:`codec.MAX_PAYLOAD`); logs an error (once) if not."""
    if len(payload) <= codec.MAX_PAYLOAD:
        return True
    if (what, len(payload)) in _TOO_LARGE:
        return False
    if len(_TOO_LARGE) > 10_000:
        _TOO_LARGE.clear()
    _TOO_LARGE.add((what, len(payload)))
    log.error(
        "%s is %d bytes, over the %d-byte message limit: not published", what, len(payload), codec.MAX_PAYLOAD
    )
    return False
