"""The agent's logic without threads or sockets: messages in, reconcile, messages out.

Theory of operation
-------------------
:class:`AgentCore` holds all the agent's state and is driven from one thread: the real
agent (:mod:`.runner`) feeds it MQTT messages and timer ticks; the fleet simulator drives
thousands of them from one event loop. It talks to the broker only through a :class:`Link`
and keeps its files in a :class:`~.store.StateStore`.

* **Desired state** arrives retained on ``.../desired``. A newer generation is held as
  *pending* until every stack definition it references is known (from the store, or the
  retained ``tether/v1/stacks/{hash}`` topics, subscribed to only while needed), then
  saved atomically and made current. Older or equal generations are duplicates and are
  dropped. A payload that does not validate is *rejected*: the current desired state stays
  in force; the error goes out as an event and in the reported state. A forged desired
  state cannot wedge the device: one more than :data:`MAX_GENERATION_STEP` beyond the
  applied generation is rejected; a pending one is replaced by the next desired state that
  arrives (the latest publish wins, even with a lower generation, as long as it is newer
  than the applied one); and one whose definitions have not arrived after
  :data:`DEFINITION_TIMEOUT` seconds connected is rejected.
* **Reconcile** (:meth:`AgentCore.reconcile_once`) runs whether or not the broker is
  reachable: the device enforces its last accepted desired state offline and after a
  restart. Driver failures are recorded in the report, never raised.
* **Reported state** is published retained when it changes (not on a timer) and once after
  every (re)connect, so it converges to the latest truth whatever was missed offline.
* **Events** go through an on-disk outbox (bounded; the oldest are dropped and counted)
  and are delivered oldest first once connected, together: what one message handled or
  one reconcile raised goes out in one message (a batch, at the end of it), a backlog in
  batches of up to :data:`EVENT_BATCH`. Each carries a per-device ``seq`` so
  receivers can drop duplicates. An event leaves the outbox once the controller says it
  stored it (``.../acked``), not merely once the broker has it (:meth:`AgentCore.flush_events`).
* **Stage, then switch**: with an image stager (the docker driver), a stack moves to a
  new version only once every image of that version is on the device; until then the
  version it runs (``applied``, kept on disk) keeps running and restarting, and the report
  carries the download's progress (``downloads``). A stack never run before waits, left
  alone. Stack versions in the desired state's ``stage`` are downloaded and never run.
  After a switch where every stack runs, images no stack (nor the previous version of
  one) uses are pruned, among those the stager loaded itself.
* **Hold**: while the device holds updates (``is_held``; the agent's ``hold`` file, like
  balena's update lock), a new generation stays pending, fetched but not applied, and the
  report says ``held``; it is applied as soon as the hold is released.
* **Presence**: before every CONNECT, :meth:`AgentCore.make_will` takes a new session
  number for the ``offline`` will; after CONNACK, ``online`` with the same number and the
  device's facts is published retained. A retained ``offline`` of an older session (a late
  will) seen on our own presence topic is overwritten at once.
* **Variables** (``${var:PATH/KEY}`` in environment values and config files) are rendered
  by :class:`~.rendering.Renderer`, just before reconciling: the desired state carries a binding per reference, a
  secret sealed to this device's key (opened only here). A rendering that fails (a missing
  value, a tampered secret) leaves the stack as it was rendered last; config files are
  written under the data directory and a changed one restarts, signals or leaves the
  service as its ``change_mode`` says.
* **Remote operations** (``.../requests``) are checked by :mod:`.request_gate` and carried out
  by :attr:`AgentCore.remote` (the runner sets :class:`~.remote.RemoteOps`, which answers on
  the request's reply topic and runs anything slow on worker threads, never on this one).
  The core does not import them: importing it starts no thread and loads no MQTT client.
"""

from __future__ import annotations

import json
import logging
import platform
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

from tether.protocol import codec, topics
from tether.protocol.enrollment import DeviceKey
from tether.protocol.errors import DriverError, PayloadError
from tether.protocol.models import (
    DesiredState,
    DeviceFacts,
    DownloadStatus,
    Event,
    EventsAcked,
    ImageDownload,
    JobResult,
    JobSpec,
    Presence,
    ReportedState,
    Request,
    StackDefinition,
    StackSpec,
    StackStatus,
)
from tether.protocol.topics import DeviceTopic
from tether.protocol.transport import Link, Will

from . import reconcile, request_gate
from .drivers.base import Driver, Observed
from .host import agent_version, os_name
from .jobs import JobScheduler
from .policy import HostAccess
from .reconcile import Create, Remove, Start
from .rendering import Renderer
from .restarts import CRASH_LOOP_RESTARTS, STEADY_RUN_SECONDS, RestartRecord, RestartTracker, ServiceKey
from .store import StateStore

if TYPE_CHECKING:  # the stager brings the registry client (requests): only agents with images load it
    from .staging import ImageStager, ImageStatus

log = logging.getLogger(__name__)

LOG_TAIL_LINES = 20
EVENT_BATCH = 100
"""Events in one message on ``.../events`` (a batch: docs/topics.md, Event), at most..."""
EVENT_BATCH_BYTES = 32 * 1024
"""...and bytes of them (an event larger than this goes alone)."""
BATCHES_IN_FLIGHT = 10
"""Batches of events sent but not yet acknowledged by the broker, at most (a whole outbox
of 1,000 events in 10 messages)."""
RESEND_AFTER = 60.0
"""While the broker has events the controller has not acknowledged, the newest goes again
after this long (its acknowledgement shows which older ones were lost)..."""
RESEND_MAX = 900.0
"""...doubling while nothing is acknowledged (a controller down for hours), up to this."""
MAX_GENERATION_STEP = 2**32
"""How far beyond the applied generation a desired state may be. The controller counts a
device's generations up by one per change (and past a generation the device reports, by
one), so a bigger jump is forged: accepted, it would make every later real one look older."""
DEFINITION_TIMEOUT = 120.0
"""Seconds (while connected) a pending desired state may wait for its stack definitions.
The controller publishes them, retained, before the desired state: one that never arrives
names a definition nobody published, and the pending state is rejected."""
PROGRESS_INTERVAL = 10.0
"""Download progress (bytes, rate, ETA) changes the reported state at most this often;
a change of state (downloading, retrying, staged, failed) is reported at once."""
RECONCILE_INTERVAL = 10.0
"""Seconds between reconciles while nothing changes (the agent's ``reconcile_interval``)."""
FAST_INTERVAL = 1.0
"""Seconds between reconciles while something converges, waits for a backoff or just started."""


_INBOUND = (DeviceTopic.DESIRED, DeviceTopic.PRESENCE, DeviceTopic.REQUESTS, DeviceTopic.ACKED)
"""The device's own topics the agent subscribes to and handles."""


def _replaces(action: reconcile.Action, create: Create) -> bool:
    """Whether ``action`` removes the stale instance that ``create`` replaces (the plan puts
    one right before the other)."""
    return (
        isinstance(action, Remove)
        and action.reason == "spec changed"
        and (action.instance.stack, action.instance.service) == (create.stack, create.service.name)
    )


class RemoteOperations(Protocol):
    """What the core needs of remote operations (:class:`~.remote.RemoteOps`), reached through
    :attr:`AgentCore.remote` so the core imports neither them nor their threads."""

    def execute(self, request: Request, command: Any) -> None:
        """Carry out a validated device command; every outcome is answered on its reply topic."""
        ...

    def extend_facts(self, facts: DeviceFacts) -> DeviceFacts:
        """The device's facts with what the remote operations add."""
        ...


class AgentCore:
    """One device's agent state machine."""

    def __init__(
        self,
        device_id: str,
        labels: dict[str, str],
        driver: Driver,
        store: StateStore,
        link: Link,
        *,
        clock: Callable[[], float] = time.time,
        facts: DeviceFacts | None = None,
        is_held: Callable[[], bool] = lambda: False,
        key: DeviceKey | None = None,
        keepalive: int | None = None,
        images: ImageStager | None = None,
        definition_timeout: float = DEFINITION_TIMEOUT,
        host_access: HostAccess | None = None,
        reconcile_interval: float = RECONCILE_INTERVAL,
    ) -> None:
        """``key``: the device's X25519 key pair (secrets are sealed to it); without one,
        stacks that use secrets cannot be rendered. ``keepalive``: the MQTT keepalive, told
        in the device's facts. ``images``: the image stager (drivers that run images);
        without one, images are the driver's business. ``host_access``: what stacks may do to
        the device (agent/policy.py); a stack asking for more is refused on this device."""
        self.device_id = device_id
        self.reconcile_interval = reconcile_interval
        self.keepalive = keepalive
        self.images = images
        self.key = key
        self.host_access = host_access or HostAccess()
        self.is_held = is_held
        self.held = False
        self._inflight: dict[int, Callable[[], bool]] = {}  # event seq -> has the broker acknowledged it?
        self._delivered: dict[int, float] = {}  # event seq -> when the broker acknowledged it
        self._resend_wait = RESEND_AFTER
        self._probe_at: float | None = None  # when the newest unacknowledged event goes again
        self._events_raised = False  # queued since the last flush_events (see handle, reconcile_once)
        self.jobs = JobScheduler.from_state(store.load_json("jobs"))
        self.launch_job: Callable[[JobSpec, str], None] | None = None
        """Set by the runner: start a job run off this thread; it calls :meth:`job_finished`."""
        self.labels = dict(labels)
        self.driver = driver
        self.store = store
        self.link = link
        self.clock = clock
        self._facts = facts
        self.renderer = Renderer(store, key, self.host_access, driver, self.event)
        self.remote: RemoteOperations | None = None  # remote operations; the runner sets it
        self.desired: DesiredState | None = store.load_desired()
        self.specs: dict[str, StackSpec] = {}
        self.pending: DesiredState | None = None
        self.awaiting: set[str] = set()
        self.definition_timeout = definition_timeout
        self._pending_since = 0.0  # when the pending state (or this connection) began waiting
        self.rejection: str | None = None
        self.errors: dict[ServiceKey, str] = {}
        self.restarts = RestartTracker()
        self.log_tails: dict[ServiceKey, str] = {}
        self.session = 0
        self.wake = True
        self.converging = False
        self.watch_until = 0.0
        self.waiting: frozenset[ServiceKey] = frozenset()
        self._candidate: ReportedState | None = None
        self._last_report: ReportedState | None = None
        self._quiet: tuple[object, ...] | None = None  # see reconcile_once
        self._report_published = False
        self._topics: dict[DeviceTopic, str] = {}  # see topic
        self._inbound: dict[str, DeviceTopic] | None = None  # see handle
        self._online: bytes | None = None  # this session's last ``online`` (see _on_own_presence)
        self._answered: bytes | None = None  # the stale presence last answered in this session (likewise)
        saved = store.load_json("applied") or {}
        self.applied: dict[str, str] = dict(saved.get("applied", {}))
        """Stack name -> the version (hash) the device runs: the desired one once staged."""
        self.previous: dict[str, str] = dict(saved.get("previous", {}))
        """Stack name -> the version it ran before its last switch (its images are kept)."""
        self._downloads: dict[str, DownloadStatus] = {}
        self._downloads_key: object = None
        self._downloads_at = 0.0
        self._pruned_for: object = None
        self._failed_seen: set[tuple[str, str]] = set()
        self._fetching: dict[str, str] = {}  # stack -> version whose images are being downloaded
        self._seen: dict[str, tuple[object, object]] | None = None  # instance id -> (state, health)
        self._versions: dict[str, str] = {}  # stack -> the version it runs (events name it)
        self.storage_error: str | None = None  # what the store could not write (see reconcile_once)
        if self.desired is not None:
            self.jobs.set_jobs(self.desired.jobs, clock())
            wanted = {ref.spec_hash for ref in (*self.desired.stacks, *self.desired.stage)}
            for spec_hash in wanted | set(self.applied.values()) | set(self.previous.values()):
                definition = store.load_definition(spec_hash)
                if definition is not None:
                    self.specs[spec_hash] = definition.spec
            # Definitions of staged versions not fetched yet: subscribed to once connected.
            self.awaiting |= {ref.spec_hash for ref in self.desired.stage} - set(self.specs)

    def topic(self, kind: DeviceTopic) -> str:
        known = self._topics.get(kind)
        if known is None:  # made once: a report and every event are published to one
            known = self._topics[kind] = topics.device(self.device_id, kind)
        return known

    def subscriptions(self) -> list[str]:
        """The filters the agent always holds (stack definitions come and go)."""
        return [self.topic(k) for k in _INBOUND]

    # --- connection ---

    def make_will(self) -> Will:
        """Called before every CONNECT: a new session number and its ``offline`` will."""
        self.session = self.store.next_session()
        self._online = self._answered = None
        presence = Presence(device_id=self.device_id, status="offline", session=self.session, at=self.clock())
        return Will(self.topic(DeviceTopic.PRESENCE), codec.encode(presence), qos=1, retain=True)

    def goodbye(self) -> tuple[str, bytes, int, bool]:
        """The ``offline`` message to publish before a clean disconnect."""
        presence = Presence(device_id=self.device_id, status="offline", session=self.session, at=self.clock())
        return (self.topic(DeviceTopic.PRESENCE), codec.encode(presence), 1, True)

    def facts(self) -> DeviceFacts:
        if self._facts is None:
            self._facts = DeviceFacts(
                agent_version=agent_version(),
                driver=self.driver.name,
                arch=platform.machine(),
                os=os_name(),
                hostname=socket.gethostname(),
                labels=dict(self.labels),
                public_key=self.key.public if self.key is not None else None,
                keepalive=self.keepalive,
            )
        return self.remote.extend_facts(self._facts) if self.remote else self._facts

    def set_labels(self, labels: dict[str, str]) -> None:
        """New labels (e.g. from the labels command): republish presence when they changed."""
        if labels == self.labels:
            return
        self.labels = dict(labels)
        self._facts = None
        if self.link.connected:
            self.publish_online()

    def publish_online(self) -> None:
        presence = Presence(
            device_id=self.device_id,
            status="online",
            session=self.session,
            facts=self.facts(),
            at=self.clock(),
        )
        payload = codec.encode(presence)
        self._online = payload
        self.link.publish(self.topic(DeviceTopic.PRESENCE), payload, qos=1, retain=True)

    def on_connected(self) -> None:
        """After CONNACK: presence, pending subscriptions, queued events, the latest report."""
        self.publish_online()
        for spec_hash in self.awaiting:
            self.link.subscribe(topics.stack(spec_hash))
        self._pending_since = self.clock()  # definitions can arrive again from now on
        self._inflight.clear()  # what the broker did not acknowledge on the last connection goes again
        self.flush_events()
        self._report_published = False
        self.publish_report()

    # --- inbound ---

    def handle(self, topic: str, payload: bytes) -> None:
        """One incoming message. Topics we did not ask for are ignored.

        A topic is told by what it equals (the device's own topics, made once) or by the stack
        definition it names among those awaited (valid hashes): no other topic is acted on, so
        none needs parsing (:func:`topics.parse` says the same of these, at several times the cost)."""
        inbound = self._inbound
        if inbound is None:
            inbound = self._inbound = {self.topic(k): k for k in _INBOUND}
        kind = inbound.get(topic)
        try:
            self._handle(kind, topic, payload)
        finally:
            if self._events_raised and not self.wake:
                self.flush_events()  # else with the reconcile's own, at its end (the caller runs it next)

    def _handle(self, kind: DeviceTopic | None, topic: str, payload: bytes) -> None:
        if kind is DeviceTopic.DESIRED:
            self._on_desired(payload)
        elif kind is DeviceTopic.PRESENCE:
            self._on_own_presence(payload)
        elif kind is DeviceTopic.REQUESTS:
            if payload:
                # Answered on the request's reply_to only; refused when no remote operations are set.
                request_gate.handle_request(
                    payload, self.device_id, self.link, self.remote.execute if self.remote else None
                )
        elif kind is DeviceTopic.ACKED:
            self._on_acked(payload)
        elif topic.startswith(topics.STACKS) and topic[len(topics.STACKS) :] in self.awaiting:
            self._on_definition(topic[len(topics.STACKS) :], payload)

    def _on_own_presence(self, payload: bytes) -> None:
        if not payload or payload == self._online:
            # The agent subscribes to its own presence: every ``online`` it publishes comes
            # back (MQTT 3.1.1 has no "not my own"), once per connection. Ours, of this
            # session, asks for nothing: not decoded.
            return
        try:
            presence = codec.decode(payload, Presence)
        except PayloadError:
            return
        if self.link.connected and (
            presence.session < self.session
            or (presence.session == self.session and presence.status == "offline")
        ):
            # A will from an older connection arrived after our ``online``, or the controller
            # published the will of this one that a restarted broker lost (controller/reconfirm.py)
            # while we are in fact connected: restore it. (Our own goodbye is sent after the
            # last message is handled.)
            if payload == self._answered:
                # The same message again in this session: after a reconnection the will of the
                # last connection comes twice, queued for our session while we were away, then
                # as the retained message our SUBSCRIBE renews. Answered already, and the
                # answer reached the broker after the will it answered, whichever copy came first.
                return
            self._answered = payload
            self.publish_online()

    def _on_desired(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            desired = codec.decode(payload, DesiredState)
        except PayloadError as exc:
            self._reject(f"malformed desired state: {exc}")
            return
        if desired.device_id != self.device_id:
            self._reject(f"desired state names device {desired.device_id!r}, not {self.device_id!r}")
            return
        current = self.desired.generation if self.desired else -1
        if desired.generation < current:
            # The broker holds an older desired state than the one applied (restored from an
            # older snapshot?): ours stays in force, it is newer and on disk.
            log.info("ignoring desired generation %d: generation %d is applied", desired.generation, current)
            return
        if desired.generation == current:
            return
        if desired.generation > max(current, 0) + MAX_GENERATION_STEP:
            self._reject(
                f"desired state generation {desired.generation} is implausibly far beyond the applied "
                f"generation {current} (more than {MAX_GENERATION_STEP} ahead): refused"
            )
            return
        pending = self.pending
        if pending is not None:
            if desired.generation == pending.generation:
                return  # the same one again (QoS 1, or republished)
            if desired.generation < pending.generation:
                # Published after it (one topic, in order): the pending one was not the
                # controller's latest (forged?). Waiting for it would make this one look older.
                log.warning(
                    "desired generation %d replaces pending generation %d",
                    desired.generation,
                    pending.generation,
                )
            self._drop_pending(desired)
        self.pending = desired
        self._pending_since = self.clock()
        self._try_accept()

    def _drop_pending(self, successor: DesiredState | None) -> None:
        """Forget the pending state: stop waiting for the definitions only it needed."""
        self.pending = None
        self.held = False
        keep = self._kept_hashes()
        if successor is not None:
            keep |= {r.spec_hash for r in (*successor.stacks, *successor.stage)}
        for spec_hash in self.awaiting - keep:
            self.link.unsubscribe(topics.stack(spec_hash))
        self.awaiting &= keep

    def _check_pending_timeout(self) -> None:
        """Reject a pending state whose definitions have not come in :attr:`definition_timeout`."""
        pending = self.pending
        if pending is None or not self.link.connected:
            return
        missing = self.awaiting & {r.spec_hash for r in pending.stacks}
        if not missing or self.clock() - self._pending_since < self.definition_timeout:
            return
        names = ", ".join(sorted(h[:12] for h in missing))
        current = self.desired.generation if self.desired else -1
        self._drop_pending(None)
        self._reject(
            f"desired state generation {pending.generation} refused: stack definition(s) {names} did not "
            f"arrive within {self.definition_timeout:g} s; generation {current} stays in force"
        )

    def _try_accept(self) -> None:
        pending = self.pending
        if pending is None:
            return
        missing = set()
        for ref in pending.stacks:
            if ref.spec_hash in self.specs:
                continue
            cached = self.store.load_definition(ref.spec_hash)
            if cached is not None:
                self.specs[ref.spec_hash] = cached.spec
            else:
                missing.add(ref.spec_hash)
        staged = {r.spec_hash for r in pending.stage if r.spec_hash not in self.specs}
        for spec_hash in staged - self.awaiting:
            cached = self.store.load_definition(spec_hash)
            if cached is not None:
                self.specs[spec_hash] = cached.spec
        for spec_hash in (missing | {h for h in staged if h not in self.specs}) - self.awaiting:
            self.awaiting.add(spec_hash)
            self.link.subscribe(topics.stack(spec_hash))
        if missing:
            log.info("generation %d waits for %d stack definition(s)", pending.generation, len(missing))
            return
        if self.is_held():
            if not self.held:
                log.info("generation %d is held: updates wait until the hold is released", pending.generation)
                self.event(
                    "desired.held", f"generation {pending.generation} waits: updates are held on this device"
                )
            self.held = True
            self.wake = True
            return
        self.held = False
        self.store.save_desired(pending)
        self.jobs.set_jobs(pending.jobs, self.clock())
        self.store.save_json("jobs", self.jobs.state())
        self.desired = pending
        self.pending = None
        self.rejection = None
        keep = self._kept_hashes()
        for spec_hash in self.awaiting - keep:
            self.link.unsubscribe(topics.stack(spec_hash))
        self.awaiting &= keep
        self.specs = {h: s for h, s in self.specs.items() if h in keep}
        self.store.prune_definitions(keep)
        self.event(
            "desired.accepted", f"generation {pending.generation} accepted ({len(pending.stacks)} stacks)"
        )
        self.wake = True

    def _on_definition(self, spec_hash: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            definition = codec.decode(payload, StackDefinition)
            if definition.spec_hash != spec_hash or definition.spec.spec_hash() != spec_hash:
                raise PayloadError("StackDefinition: content does not match its hash")
        except PayloadError as exc:
            self.awaiting.discard(spec_hash)
            self.link.unsubscribe(topics.stack(spec_hash))
            self.pending = None
            self._reject(f"stack definition {spec_hash[:12]}: {exc}")
            return
        self.store.save_definition(definition)
        self.specs[spec_hash] = definition.spec
        self.awaiting.discard(spec_hash)
        self.link.unsubscribe(topics.stack(spec_hash))
        self._try_accept()

    def _reject(self, message: str) -> None:
        log.error("rejected: %s", message)
        self.rejection = message
        self.event("desired.rejected", message, level="error")
        self.wake = True

    def _kept_hashes(self) -> set[str]:
        """Stack versions whose definitions stay on disk: desired, pending, staged, running, previous."""
        keep = set(self.applied.values()) | set(self.previous.values())
        for state in (self.desired, self.pending):
            if state is not None:
                keep |= {ref.spec_hash for ref in (*state.stacks, *state.stage)}
        return keep

    # --- reconcile ---

    def desired_stacks(self) -> tuple[dict[str, StackSpec], dict[str, str]]:
        """The stacks to run now and their versions: the desired version once its images
        are on the device, else the version the device runs (see :meth:`choose`)."""
        specs, hashes, _blocked = self.choose()
        return specs, hashes

    def _staged(self, spec: StackSpec) -> bool:
        """Whether every image of ``spec`` is on the device (always, without a stager)."""
        if self.images is None:
            return True
        return all(self.images.present(s.image) for s in spec.services if s.image)

    def choose(self) -> tuple[dict[str, StackSpec], dict[str, str], set[str]]:
        """Per desired stack, the version to run: the desired one if staged, else the applied
        one. ``blocked``: stacks with neither (never run, images not here yet): left alone.
        Reads state only: remote operations call it from worker threads."""
        specs: dict[str, StackSpec] = {}
        hashes: dict[str, str] = {}
        blocked: set[str] = set()
        if self.desired is not None:
            for ref in self.desired.stacks:
                spec = self.specs.get(ref.spec_hash)
                if spec is None:
                    continue
                chosen = ref.spec_hash
                if not self._staged(spec):
                    old = self.applied.get(ref.name)
                    old_spec = self.specs.get(old) if old is not None else None
                    if old is None or old == ref.spec_hash or old_spec is None:
                        blocked.add(ref.name)
                    else:
                        chosen, spec = old, old_spec
                specs[ref.name] = spec
                hashes[ref.name] = chosen
        return specs, hashes, blocked

    def _note_applied(self, hashes: dict[str, str], blocked: set[str]) -> None:
        """Remember which version of each stack now runs (and the one it ran before)."""
        applied = {name: h for name, h in hashes.items() if name not in blocked}
        applied.update({name: h for name, h in self.applied.items() if name in blocked})
        if applied == self.applied:
            return
        for name, spec_hash in applied.items():
            old = self.applied.get(name)
            if old is not None and old != spec_hash:
                self.previous[name] = old
                log.info("stack %s switches to %s (from %s)", name, spec_hash[:12], old[:12])
        self.previous = {n: h for n, h in self.previous.items() if n in applied}
        self.applied = applied
        self.store.save_json("applied", {"applied": self.applied, "previous": self.previous})

    def _images_of(self, spec_hash: str) -> set[str] | None:
        spec = self.specs.get(spec_hash)
        if spec is None:
            return None
        return {s.image for s in spec.services if s.image}

    def _want_images(self) -> None:
        """Tell the stager every image of every version the device runs, will run or stages."""
        if self.images is None:
            return
        hashes = set(self.applied.values())
        credentials: dict[str, tuple[str, str]] = {}
        for state in (self.desired, self.pending):
            if state is None:
                continue
            hashes |= {ref.spec_hash for ref in (*state.stacks, *state.stage)}
            credentials.update(self._registry_credentials(state))
        wanted = self._job_images()
        for spec_hash in hashes:
            wanted |= self._images_of(spec_hash) or set()
        self.images.want(wanted, credentials)

    def _job_images(self) -> set[str]:
        return {job.image for job in self.jobs.jobs.values() if job.image}

    def _job_ready(self, job: JobSpec) -> bool:
        """Whether a job may run: its image is on the device (fetched by the stager, resumably),
        or failed to download (the run then records the engine's reason)."""
        if self.images is None or not job.image:
            return True
        if self.images.present(job.image):
            return True
        status = self.images.status().get(job.image)
        return status is not None and status.state == "failed"

    def _registry_credentials(self, state: DesiredState) -> dict[str, tuple[str, str]]:
        """The registry credentials sealed to this device in ``state`` (those that open)."""
        out: dict[str, tuple[str, str]] = {}
        for auth in state.registries:
            if auth.sealed is None or self.key is None:
                continue
            try:
                data = json.loads(self.key.open_text(auth.sealed, f"registry {auth.host!r} credentials"))
                out[auth.host] = (str(data["username"]), str(data["password"]))
            except (PayloadError, ValueError, KeyError, TypeError) as exc:
                log.error("registry %s: credentials do not open: %s", auth.host, exc)
        return out

    def _download_status(
        self, spec_hash: str, statuses: dict[str, ImageStatus], rate: float, *, switching: bool
    ) -> DownloadStatus | None:
        """Where the images of one stack version stand (None: all there and switching now).
        Without a stager (the process driver) a version has nothing to fetch: staged once its
        definition is here."""
        images = self._images_of(spec_hash)
        if images is not None and self.images is None:
            images = set()
        if images is None:  # definition not here yet: its images are not known
            return DownloadStatus(spec_hash=spec_hash, state="downloading")
        parts = [(ref, statuses[ref]) for ref in sorted(images) if ref in statuses]
        if len(parts) < len(images):  # not told to the stager yet: next round
            return DownloadStatus(spec_hash=spec_hash, state="downloading")
        if all(st.state == "present" for _, st in parts):
            if switching:
                return None
            state = "staged"
        elif failed := [st for _, st in parts if st.state == "failed"]:
            state = "failed"
        elif any(st.state == "retrying" for _, st in parts):
            state = "retrying"
        else:
            state = "downloading"
        reason = None
        if state == "failed":
            reason = failed[0].reason
        elif state == "retrying":
            reason = next(st.reason for _, st in parts if st.state == "retrying")
        done = sum(st.done for _, st in parts)
        totals = [st.total if st.state != "present" else (st.total or st.done) for _, st in parts]
        total = None if any(t is None for t in totals) else sum(t or 0 for t in totals)
        moving = state in ("downloading", "retrying")
        eta = (total - done) / rate if moving and rate > 0 and total is not None and total >= done else None
        return DownloadStatus(
            spec_hash=spec_hash,
            state=state,
            done=done,
            total=total,
            rate=round(rate, 1) if moving else 0.0,
            eta_s=round(eta, 1) if eta is not None else None,
            reason=reason,
            images=tuple(ImageDownload(image=ref, done=st.done, total=st.total) for ref, st in parts),
        )

    def downloads(self, hashes: dict[str, str], blocked: set[str], now: float) -> dict[str, DownloadStatus]:
        """Per stack, the version whose images are fetched or staged, for the report; the
        bytes, rate and ETA move at most every :data:`PROGRESS_INTERVAL` seconds."""
        statuses = self.images.status() if self.images is not None else {}
        rate = self.images.rate() if self.images is not None else 0.0
        result: dict[str, DownloadStatus] = {}
        candidates: list[tuple[str, str, bool]] = []
        if self.desired is not None:
            candidates += [(r.name, r.spec_hash, True) for r in self.desired.stacks]
        if self.pending is not None:  # held: downloaded, not switched
            candidates += [(r.name, r.spec_hash, False) for r in self.pending.stacks]
        for state in (self.desired, self.pending):
            if state is not None:
                candidates += [(r.name, r.spec_hash, False) for r in state.stage]
        for name, spec_hash, switching in candidates:
            if name in result or (hashes.get(name) == spec_hash and name not in blocked):
                continue
            status = self._download_status(spec_hash, statuses, rate, switching=switching)
            if status is not None:
                result[name] = status
        for name, status in result.items():
            if (
                status.state == "failed"
                and status.reason
                and (status.spec_hash, status.reason) not in self._failed_seen
            ):
                self._failed_seen.add((status.spec_hash, status.reason))
                self.event(
                    "download.failed", status.reason, level="error", stack=name, spec_hash=status.spec_hash
                )
        self._download_events(result)
        key = {n: (d.spec_hash, d.state, d.reason) for n, d in result.items()}
        if key == self._downloads_key and now - self._downloads_at < PROGRESS_INTERVAL:
            return self._downloads
        self._downloads, self._downloads_key, self._downloads_at = result, key, now
        return result

    def _download_events(self, result: dict[str, DownloadStatus]) -> None:
        """``stack.downloading`` when a version's images start to come, ``stack.downloaded``
        once they are all on the device (whether it switches now or stays staged)."""
        for name, fetching in result.items():
            if (
                fetching.state in ("downloading", "retrying")
                and self._fetching.get(name) != fetching.spec_hash
            ):
                self._fetching[name] = fetching.spec_hash
                self.event(
                    "stack.downloading",
                    f"downloading the images of version {fetching.spec_hash[:12]}"
                    + (
                        ""
                        if fetching.total is None
                        else f" ({_size(fetching.total - fetching.done)} to fetch)"
                    ),
                    stack=name,
                    spec_hash=fetching.spec_hash,
                )
        for name, spec_hash in list(self._fetching.items()):
            current = result.get(name)
            if current is not None and current.spec_hash == spec_hash and current.state != "staged":
                continue  # still on its way (or failed: download.failed says so)
            del self._fetching[name]
            if current is None or current.state == "staged":
                where = "staged (not switched yet)" if current is not None else "switching to it"
                self.event(
                    "stack.downloaded",
                    f"the images of version {spec_hash[:12]} are on the device: {where}",
                    stack=name,
                    spec_hash=spec_hash,
                )

    @property
    def downloading(self) -> bool:
        """Whether a download is under way (the report's progress moves)."""
        return any(d.state in ("downloading", "retrying") for d in self._downloads.values())

    # --- variables ---

    def render(self, specs: dict[str, StackSpec]) -> tuple[dict[str, StackSpec], dict[str, str]]:
        """The stacks to run, rendered for this device (:meth:`.rendering.Renderer.render`)."""
        return self.renderer.render(
            specs, self.desired.vars if self.desired is not None else (), self._versions
        )

    # --- reconcile ---

    def reconcile_once(self) -> None:
        """Observe, plan, apply, report. Driver failures are recorded, never raised. The
        events it raised (and those of the message that asked for it) go out together at
        its end, in one message (:meth:`flush_events`)."""
        try:
            self._reconcile()
        finally:
            if self._events_raised:
                self.flush_events()

    def _reconcile(self) -> None:
        self.wake = False
        self._check_storage()
        self._check_pending_timeout()
        if self.pending is not None and not self.awaiting & {r.spec_hash for r in self.pending.stacks}:
            self._try_accept()  # a hold may have been released
        now = self.clock()
        self._want_images()
        specs, hashes, blocked = self.choose()
        self._versions = hashes
        self._note_applied(hashes, blocked)
        downloads = self.downloads(hashes, blocked, now)
        desired, render_errors = self.render(specs)
        try:
            observed = self.driver.observe()
        except Exception as exc:  # noqa: BLE001 - recorded and retried next round
            log.error("observe failed: %s", exc)
            self.event("driver.error", str(exc), level="error")
            return
        # What the plan and the report are computed from. After a reconcile that left nothing
        # to do and nothing waiting on the clock (no action, or actions after which planning
        # again found none; no backoff, nothing converging, no restart count to forget after a
        # steady run), the same inputs give the same empty plan and the same report: skip them. The driver is still asked every time, so an
        # instance that crashed, exited or changed health is seen and handled at once. What was
        # rendered is among the inputs: a config file that could not be written is rendered
        # again every time, and once written its stack is planned (else it never started).
        quiet = self._inputs(
            hashes, desired, render_errors, self.store.outbox_dropped(), observed, downloads, blocked
        )
        if quiet == self._quiet and not self.renderer.signals:
            self.converging = False  # (still set by a reconcile whose actions left it quiet)
            if not self._report_published and self._candidate is not None:
                self._candidate = self._candidate.model_copy(update={"at": now})
                self.publish_report()
            return
        self._quiet = None
        # A stack that could never be rendered is left alone: its instances are neither
        # created nor removed until it can be.
        # So is a stack whose images are still on their way and that never ran before.
        unrendered = (set(specs) - set(desired)) | blocked
        before = observed
        runnable = {name: spec for name, spec in desired.items() if name not in blocked}
        plan = reconcile.plan(
            runnable, [i for i in observed if i.stack not in unrendered], now, self.restarts
        )
        actions = plan.actions
        skip: set[int] = set()  # (not set[int](): a generic alias made and called every reconcile)
        for i, action in enumerate(actions):
            successor = actions[i + 1] if i + 1 < len(actions) else None
            if i in skip:
                continue
            if isinstance(successor, Create) and isinstance(action, Remove) and _replaces(action, successor):
                skip.add(i + 1)
                if self._prepare(successor, runnable, now):  # else the old instance keeps running
                    self._replace(action, successor, runnable, now)
                continue
            self._apply(action, runnable, now)
        if self.renderer.signals:
            self.renderer.send_signals(before, desired)
        seen_after = not plan.actions  # ``observed`` shows the runtime after the actions
        if plan.actions:
            try:
                observed = self.driver.observe()
                seen_after = True
                self.driver.prune(set(specs))
            except Exception as exc:  # noqa: BLE001 - recorded and retried next round
                self.event("driver.error", str(exc), level="error")
        keys = {(stack, s.name) for stack, spec in desired.items() for s in spec.services}
        self.errors = {k: v for k, v in self.errors.items() if k in keys}
        self.restarts.keep_only(keys)
        self.log_tails = {k: v for k, v in self.log_tails.items() if k in keys}
        for inst in observed:
            key = (inst.stack, inst.service)
            rec = self.restarts.get(key)
            if self.restarts.observed(key, inst.state == "running", now):
                self.log_tails.pop(key, None)
            self._keep_tail(inst, desired.get(inst.stack), rec)
        self._instance_events(observed, desired)
        self.waiting = plan.waiting
        errors = dict(self.errors)
        for stack, message in render_errors.items():
            errors.update({(stack, s.name): message for s in specs[stack].services})
        stacks = reconcile.status(
            {name: desired.get(name, spec) for name, spec in specs.items()},
            hashes,
            observed,
            errors,
            self.restarts,
            plan.waiting,
            self.log_tails,
        )
        self.converging = any(s.state == "converging" for s in stacks.values()) or bool(plan.actions)
        settled = not (self.converging or plan.waiting or self.restarts.counting())
        if settled:
            self._quiet = quiet
        dropped = self.store.outbox_dropped()
        self._candidate = ReportedState(
            device_id=self.device_id,
            generation=self.desired.generation if self.desired else -1,
            stacks=stacks,
            error=self.rejection,
            held=self.held,
            events_dropped=dropped,
            downloads=downloads,
            storage_error=self.storage_error,
            at=now,
        )
        if (
            plan.actions
            and seen_after
            and not (plan.waiting or self.restarts.counting())
            and not any(s.state == "converging" for s in stacks.values())
            and not self.renderer.signals
        ):
            # What the actions left: if it is settled (planned again on the runtime as it is now,
            # nothing to do and nothing waiting), the next reconcile, on these same inputs, would
            # plan nothing and make this report again: it is quiet (it only observes), as after a
            # reconcile without actions. Planning once here costs less than all that.
            after = reconcile.plan(
                runnable, [i for i in observed if i.stack not in unrendered], now, self.restarts
            )
            if not (after.actions or after.waiting):
                self._quiet = self._inputs(
                    hashes, desired, render_errors, dropped, observed, downloads, blocked
                )
        self.publish_report()
        self._prune_images(stacks, blocked)

    def _inputs(
        self,
        hashes: dict[str, str],
        desired: dict[str, StackSpec],
        render_errors: dict[str, str],
        dropped: int,
        observed: list[Observed],
        downloads: dict[str, DownloadStatus],
        blocked: set[str],
    ) -> tuple[object, ...]:
        """What a reconcile's plan and report are computed from (see :meth:`reconcile_once`)."""
        return (
            self.desired,
            hashes,
            desired,
            render_errors,
            self.rejection,
            self.held,
            dropped,
            self.storage_error,
            observed,
            downloads,
            blocked,
        )

    def _prune_images(self, stacks: dict[str, StackStatus], blocked: set[str]) -> None:
        """After a switch, once every stack runs: remove the images the stager loaded that
        no stack uses, keeping the previous version's (a fast rollback)."""
        if self.images is None or blocked or self.desired is None:
            return
        if any(s.state != "running" for s in stacks.values()):
            return
        key = (tuple(sorted(self.applied.items())), tuple(sorted(self.previous.items())))
        if key == self._pruned_for:
            return
        keep = self._job_images()
        for spec_hash in self._kept_hashes():
            images = self._images_of(spec_hash)
            if images is None:
                return  # a definition is still on its way: its images are not known
            keep |= images
        self._pruned_for = key
        self.images.prune(keep)

    def _check_storage(self) -> None:
        """Write what the store could not, and tell when storage fails or recovers.

        A full disk or a read-only file system never stops the agent: the store keeps what
        it could not write in memory (the device runs from there) and writes it when it
        can. Meanwhile the report carries ``storage_error`` and an event says so.
        """
        self.store.retry()
        problem = self.store.problem()
        message = problem.message() if problem is not None else None
        if message == self.storage_error:
            return
        was, self.storage_error = self.storage_error, message
        if problem is not None and was is None:
            self.event("storage.error", message or "", level="error")
        elif problem is None:
            self.event("storage.recovered", "the data directory is writable again: everything is saved")

    def _prepare(self, create: Create, desired: dict[str, StackSpec], now: float) -> bool:
        """Before a stale instance is removed: what its successor needs, made while it still
        runs (the driver's ``prepare``: the image checked, volumes and networks made). False,
        recorded as a failed create, if that fails: the old instance is then left running."""
        prepare = getattr(self.driver, "prepare", None)
        if prepare is None:
            return True
        key = (create.stack, create.service.name)
        try:
            prepare(create.stack, desired[create.stack], create.service)
        except Exception as exc:  # noqa: BLE001 - recorded like every driver failure
            self._failed(key, exc, now, create=True, suffix=" (the running version is kept)")
            return False
        return True

    def _replace(self, old: Remove, new: Create, desired: dict[str, StackSpec], now: float) -> None:
        """A stale instance and its successor: the driver's ``replace`` where it has one (the
        docker driver starts the successor it made in ``prepare`` as soon as the old one has
        stopped), else remove, then create."""
        replace = getattr(self.driver, "replace", None)
        if replace is None:
            self._apply(old, desired, now)
            self._apply(new, desired, now)
            return
        key = (new.stack, new.service.name)
        self.watch_until = now + STEADY_RUN_SECONDS
        log.info("replace %s/%s (%s)", key[0], key[1], old.reason)
        try:
            replace(old.instance, old.grace, new.stack, desired[new.stack], new.service)
        except Exception as exc:  # noqa: BLE001 - recorded like every driver failure
            self._failed(key, exc, now, create=True)
        else:
            self.errors.pop(key, None)

    def _failed(self, key: ServiceKey, exc: Exception, now: float, create: bool, suffix: str = "") -> None:
        """Record a failed action: the service's error, its backoff (a create), an event."""
        if not isinstance(exc, DriverError):
            log.error("driver failed unexpectedly", exc_info=exc)
            exc = DriverError(f"{key[0]}/{key[1]}: unexpected driver error: {exc.__class__.__name__}: {exc}")
        log.error("%s%s", exc, suffix)
        self.errors[key] = str(exc)
        if create:
            self.restarts.create_failed(key, now)
        self.event(
            "action.failed",
            f"{exc}{suffix}",
            level="error",
            stack=key[0],
            service=key[1],
            spec_hash=self._versions.get(key[0]),
        )

    def _apply(self, action: reconcile.Action, desired: dict[str, StackSpec], now: float) -> None:
        if isinstance(action, Create | Start):
            key = (action.stack, action.service.name)
        else:
            key = (action.instance.stack, action.instance.service)
        try:
            if not isinstance(action, Remove):
                self.watch_until = now + STEADY_RUN_SECONDS
            if isinstance(action, Create):
                log.info("create %s/%s", action.stack, action.service.name)
                self.driver.create(action.stack, desired[action.stack], action.service)
            elif isinstance(action, Start):
                if self.restarts.restarted(key, now):
                    self._crash_loop(action, self.restarts.record(key).count)
                log.info("restart %s/%s", action.stack, action.service.name)
                self.driver.start(action.instance, action.service)
            else:
                log.info("remove %s/%s (%s)", key[0], key[1], action.reason)
                self.driver.remove(action.instance, action.grace)
        except Exception as exc:  # a driver bug must not take the agent (and the device) down
            self._failed(key, exc, now, create=isinstance(action, Create))
        else:
            if not isinstance(action, Remove):
                self.errors.pop(key, None)
            version = self._versions.get(key[0])
            if isinstance(action, Create):
                self.event(
                    "service.created",
                    f"created and started (version {version[:12] if version else '?'})",
                    stack=key[0],
                    service=key[1],
                    spec_hash=version,
                )
            elif isinstance(action, Start) and self.restarts[key].count < CRASH_LOOP_RESTARTS:
                rec = self.restarts[key]  # from then on service.crash_loop has said it all
                self.event(
                    "service.restarted",
                    f"restarted after it exited with code {action.instance.exit_code} (restart {rec.count} in a row)",
                    level="warning",
                    stack=key[0],
                    service=key[1],
                    spec_hash=version,
                )

    def _keep_tail(self, inst: Observed, spec: StackSpec | None, rec: RestartRecord | None) -> None:
        """Read an instance's last log lines once when it fails without a restart (exited non-zero,
        unhealthy): the report says why. Forget them once it runs well again."""
        key = (inst.stack, inst.service)
        service = spec.service(inst.service) if spec is not None else None
        if service is None or inst.spec_hash != service.spec_hash():
            return
        if reconcile.needs_tail(service, inst):
            if key not in self.log_tails:
                try:
                    self.log_tails[key] = self.driver.logs(inst, LOG_TAIL_LINES)[-4000:]
                except Exception:  # noqa: BLE001 - the log tail is a courtesy
                    self.log_tails[key] = ""
        elif inst.state == "running" and inst.health != "unhealthy" and not (rec and rec.count):
            self.log_tails.pop(key, None)

    def _instance_events(self, observed: list[Observed], desired: dict[str, StackSpec]) -> None:
        """``service.healthy``, ``service.unhealthy`` and ``service.exited`` (non-zero, not to be
        restarted) when an instance of a stack's current version changes so. The first
        observation after the agent starts is taken as it is, without events."""
        seen: dict[str, tuple[object, object]] = {inst.id: (inst.state, inst.health) for inst in observed}
        before, self._seen = self._seen, seen
        if before is None:
            return
        for inst in observed:
            spec = desired.get(inst.stack)
            service = spec.service(inst.service) if spec is not None else None
            if (
                service is None
                or inst.spec_hash != service.spec_hash()
                or before.get(inst.id) == seen[inst.id]
            ):
                continue
            was_state, was_health = before.get(inst.id, (None, None))
            about = (inst.stack, inst.service, self._versions.get(inst.stack))
            if inst.health != was_health and inst.health == "healthy":
                self._service_event(about, "service.healthy", "healthy (its healthcheck passes)", "info")
            elif inst.health != was_health and inst.health == "unhealthy":
                output = (inst.health_output or "").strip()
                why = f": {output[-500:]}" if output else " (its healthcheck fails)"
                self._service_event(about, "service.unhealthy", "unhealthy" + why, "warning")
            if inst.state == "exited" != was_state and reconcile.needs_tail(service, inst):
                lines = self.log_tails.get((inst.stack, inst.service), "").strip().splitlines()
                tail = " | ".join(lines[-3:])[-500:]
                message = f"exited with code {inst.exit_code}; not restarted (restart: {service.restart})"
                self._service_event(
                    about, "service.exited", message + (f"; last log lines: {tail}" if tail else ""), "error"
                )

    def _service_event(
        self,
        about: tuple[str, str, str | None],
        kind: str,
        message: str,
        level: Literal["info", "warning", "error"],
    ) -> None:
        stack, service, spec_hash = about
        self.event(kind, message, level=level, stack=stack, service=service, spec_hash=spec_hash)

    def next_wakeup(self, now: float) -> float:
        """When (on :attr:`clock`) to reconcile next, given the last reconcile's outcome. Pure:
        the runner and the simulator both schedule with it.

        Within :data:`FAST_INTERVAL` while something converges, waits for a restart backoff or
        started in the last minute (:attr:`watch_until`: a crash is reported at once, the
        controller's health gate depends on it); while images download, at the next progress
        report (:data:`PROGRESS_INTERVAL`); otherwise after :attr:`reconcile_interval`."""
        if self.wake:
            return now
        if self.converging or self.waiting or now < self.watch_until:
            return now + FAST_INTERVAL
        interval = self.reconcile_interval
        if self.downloading:
            interval = min(interval, PROGRESS_INTERVAL)
        return now + interval

    @property
    def idle(self) -> bool:
        """Whether a reconcile now could only observe the runtime: the last one found nothing to
        do and nothing waiting on the clock (the quiet case of :meth:`reconcile_once`), its report
        went out, and nothing is pending, downloading, asked for or failing to be stored. Until a
        message arrives or the runtime changes, reconciling again changes nothing. The agent
        reconciles anyway (only observing tells it whether the runtime changed); the fleet
        simulator, whose runtime only changes by its own hand, skips such reconciles."""
        return (
            self._quiet is not None
            and self._report_published
            and not self.wake
            and self.pending is None
            and self.images is None
            and self.storage_error is None
            and not self.renderer.signals
        )

    def _crash_loop(self, action: Start, count: int) -> None:
        key = (action.stack, action.service.name)
        try:
            self.log_tails[key] = self.driver.logs(action.instance, LOG_TAIL_LINES)[-4000:]
        except Exception:  # noqa: BLE001 - the log tail is a courtesy
            self.log_tails[key] = ""
        if count == CRASH_LOOP_RESTARTS:
            self.event(
                "service.crash_loop",
                f"exited {count} times (last exit code {action.instance.exit_code}); restarting with backoff",
                level="error",
                stack=action.stack,
                service=action.service.name,
                spec_hash=self._versions.get(action.stack),
            )

    # --- jobs ---

    def tick_jobs(self) -> None:
        """Start the jobs that are due (runs happen off this thread, via ``launch_job``)."""
        if self.launch_job is None or not self.jobs.jobs:
            return
        now = self.clock()
        start, skipped = self.jobs.due(now, self._job_ready)
        if start or skipped:
            self.store.save_json("jobs", self.jobs.state())
        for job, run in skipped:
            result = JobResult(job=job.name, run=run, started=now, duration_s=0.0, skipped=True)
            self.event("job.result", f"job {job.name}: skipped (previous run still running)", data=result)
        for job, run in start:
            self.launch_job(job, run)

    def job_finished(self, result: JobResult) -> None:
        """A run ended: record it, and start a queued run if there is one."""
        again = self.jobs.finished(result.job, result.run)
        self.store.save_json("jobs", self.jobs.state())
        outcome = "timed out" if result.timed_out else f"exit code {result.exit_code}"
        level: Literal["info", "warning", "error"] = "info" if result.exit_code == 0 else "warning"
        self.event(
            "job.result",
            f"job {result.job}: {outcome} after {result.duration_s:g}s",
            level=level,
            data=result,
        )
        if again is not None and self.launch_job is not None:
            self.launch_job(again, f"{again.name}@{int(self.clock())}")

    # --- outbound ---

    def publish_report(self) -> None:
        if self._events_raised:
            self.flush_events()  # the events that lead to a report go before it, as they happened
        candidate = self._candidate
        if candidate is None:
            return
        if self._report_published and _same_report(candidate, self._last_report):
            return
        if self.link.publish(self.topic(DeviceTopic.REPORTED), codec.encode(candidate), qos=1, retain=True):
            self._last_report = candidate
            self._report_published = True

    def event(
        self,
        kind: str,
        message: str,
        level: Literal["info", "warning", "error"] = "info",
        stack: str | None = None,
        service: str | None = None,
        data: JobResult | None = None,
        spec_hash: str | None = None,
    ) -> None:
        """Queue an event (on disk): it goes out with the others raised while handling the
        same message or in the same reconcile, at its end (:meth:`handle`,
        :meth:`reconcile_once`), or at the runner's next :meth:`flush_events`. ``spec_hash``: the stack
        version an event about a stack is about (a deployment's events are told by it)."""
        event = Event(
            device_id=self.device_id,
            seq=self.store.next_event_seq(),
            kind=kind,
            message=message,
            level=level,
            stack=stack,
            service=service,
            data=data.model_dump(mode="json") if data is not None else None,
            at=self.clock(),
            spec_hash=spec_hash,
        )
        self.store.outbox_put(event)
        self._events_raised = True

    def flush_events(self) -> None:
        """Send queued events, oldest first; forget each one only once it is safe.

        Safe means stored by the controller (its acknowledgement on ``.../acked``, see
        :meth:`_on_acked`): the broker's PUBACK alone is not enough, a broker that comes
        back empty or a controller that was not subscribed at that moment loses what it
        acknowledged. On a device upgraded from an agent without acknowledgements the PUBACK
        counts until the first one. An event the broker has (``_delivered``) but the
        controller did not acknowledge is sent again when an acknowledgement shows it lost;
        if none comes for :data:`RESEND_AFTER` (doubling while none does), the newest is sent
        again to ask. One sent into a connection that died, or lost with the device's power,
        goes out again on the next connection. Receivers drop duplicates on ``seq``.
        """
        self._events_raised = False
        now = time.monotonic()
        self._sweep_inflight(now)
        if self._delivered:  # forget what the bounded outbox dropped meanwhile
            head = self.store.outbox_head(1)
            first = head[0].seq if head else None
            if first is None or min(self._delivered) < first:
                self._delivered = {
                    s: t for s, t in self._delivered.items() if first is not None and s >= first
                }
        if not self._delivered:
            self._probe_at = None
        elif self._probe_at is None:
            self._probe_at = now + self._resend_wait
        elif now >= self._probe_at:
            # Only the newest goes again, as a question: a controller that is up stores it (or
            # drops it as a duplicate) and answers with an acknowledgement whose ``last`` shows
            # which of the older ones it lacks; one that is down costs one message per wait.
            newest = max(self._delivered)
            del self._delivered[newest]
            log.info(
                "%d event(s) not acknowledged by the controller after %.0fs: sending event %d again",
                len(self._delivered) + 1,
                self._resend_wait,
                newest,
            )
            self._resend_wait = min(2 * self._resend_wait, RESEND_MAX)
            self._probe_at = now + self._resend_wait
        sent = len(self._inflight) + len(self._delivered)
        if not self.link.connected or self.store.outbox_size() <= sent:
            return
        room = BATCHES_IN_FLIGHT - len(set(self._inflight.values()))  # (a batch's events share one check)
        if room <= 0:
            return
        head = self.store.outbox_head(sent + room * EVENT_BATCH)
        oldest = head[0].seq if head else 0
        batch: list[int] = []
        encoded: list[bytes] = []
        size = 0
        for event in head:
            if event.seq in self._inflight or event.seq in self._delivered:
                continue
            payload = codec.encode_with(event, {"oldest": oldest})  # as a copy with it would be
            if batch and (len(batch) >= EVENT_BATCH or size + len(payload) > EVENT_BATCH_BYTES):
                room -= 1
                if not self._send_batch(batch, encoded) or room <= 0:
                    return
                batch, encoded, size = [], [], 0
            batch.append(event.seq)
            encoded.append(payload)
            size += len(payload)
        if batch:
            self._send_batch(batch, encoded)

    def _sweep_inflight(self, now: float) -> None:
        """What the broker acknowledged (PUBACK) since the last look: delivered (forgotten,
        on a device that has had no controller acknowledgement yet)."""
        for seq, acked in list(self._inflight.items()):
            if acked():
                del self._inflight[seq]
                if self.store.events_acked() is None:
                    self.store.outbox_ack(seq)
                else:
                    self._delivered[seq] = now

    def _send_batch(self, seqs: list[int], encoded: list[bytes]) -> bool:
        """Publish events ``seqs`` (``encoded``) in one message; False if the link refused it."""
        check = self.link.publish_tracked(self.topic(DeviceTopic.EVENTS), codec.array(encoded), 1)
        if check is None:
            return False
        for seq in seqs:
            self._inflight[seq] = check
        return True

    def _on_acked(self, payload: bytes) -> None:
        """The controller's acknowledgement: forget what it stored, resend what it lost."""
        if not payload:
            return
        try:
            ack = codec.decode(payload, EventsAcked)
        except PayloadError as exc:
            log.warning("ignoring an acknowledgement: %s", exc)
            return
        if ack.device_id != self.device_id or ack.seq > self.store.last_event_seq():
            return  # not ours, or about events of a previous installation of this device
        current = self.store.events_acked()
        if current is None or ack.seq > current:
            self.store.set_events_acked(ack.seq)
            self.store.outbox_ack_through(ack.seq)
            self._resend_wait = RESEND_AFTER  # progress
            self._probe_at = None
        # A batch the broker acknowledged since the last flush is delivered: the runner waits
        # on its inbox right after publishing, so this acknowledgement often comes first, and
        # an event of that batch it shows lost must go again now, not at the next probe.
        self._sweep_inflight(time.monotonic())
        covered = max(ack.seq, current or 0)
        self._inflight = {s: a for s, a in self._inflight.items() if s > covered}
        if ack.resend:
            lost = [s for s in self._delivered if s > covered]
        else:
            lost = [s for s in self._delivered if covered < s < ack.last]  # ``last`` itself is stored
        self._delivered = {s: t for s, t in self._delivered.items() if s > covered and s not in lost}
        if lost:
            log.info("%d event(s) lost on the way to the controller: sending them again", len(lost))
        self.flush_events()


def _same_report(report: ReportedState, last: ReportedState | None) -> bool:
    """Whether ``report`` says what ``last`` said: equal but for the time it was made
    (what ``==`` of the two with ``at`` zeroed says, without copying either)."""
    if last is None:
        return False
    mine, theirs = report.__dict__, last.__dict__
    return mine.keys() == theirs.keys() and all(v == theirs[k] for k, v in mine.items() if k != "at")


def _size(n: int) -> str:
    """Bytes as an operator reads them: 512 B, 3.4 MB."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB"):
        value /= 1000
        if value < 1000:
            return f"{value:.1f} {unit}"
    return f"{value / 1000:.1f} GB"
