"""The agent's main loop: MQTT in, reconcile, reported state out.

Theory of operation
-------------------
One thread (the caller of :meth:`Agent.run`) owns all state. The MQTT client thread only
puts incoming messages on :attr:`Agent.inbox`; nothing else crosses threads.

* **Desired state** arrives retained on ``.../desired``. A newer generation is held as
  *pending* until every stack definition it references is known (from the local cache or
  the retained ``tether/v1/stacks/{hash}`` topics, subscribed to only while needed), then
  saved to disk atomically and made current. Older or equal generations are duplicates and
  are dropped. A payload that does not validate is *rejected*: the current desired state
  stays in force, the error is published as an event and in the reported state.
* **Reconcile** runs on every accepted change, and every ``reconcile_interval`` (every
  second while something is converging), whether or not the broker is reachable: the
  device keeps enforcing its last accepted desired state offline, and after a restart.
* **Reported state** is published retained when it changes (not on a timer) and once
  after every (re)connect, so it always converges to the latest truth.
* **Presence**: before every CONNECT a new session number is taken and an ``offline``
  will carrying it is set; after CONNACK ``online`` with the same number and the device's
  facts is published retained. A retained ``offline`` of an older session (a late will)
  seen on our own presence topic is overwritten at once.
"""

from __future__ import annotations

import logging
import platform
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from tether.protocol import codec, topics
from tether.protocol.errors import DriverError, PayloadError
from tether.protocol.models import (
    DesiredState,
    DeviceFacts,
    Event,
    Presence,
    ReportedState,
    StackDefinition,
    StackSpec,
    content_hash,
)
from tether.protocol.mqtt import MqttClient, Will
from tether.protocol.topics import DeviceTopic

from . import reconcile
from .config import AgentConfig
from .drivers.base import Driver
from .reconcile import Create, Remove, RestartRecord, ServiceKey, Start
from .store import LocalStore

log = logging.getLogger(__name__)

_CONNECTED = "\x00connected"
EVENT_BACKLOG = 1000
FAST_INTERVAL = 1.0


def agent_version() -> str:
    from tether.protocol import __version__

    return __version__


def os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return f"{platform.system()} {platform.release()}"


class Agent:
    """A device agent: one MQTT session, one driver, one local store."""

    def __init__(
        self,
        config: AgentConfig,
        driver: Driver,
        *,
        clock: Callable[[], float] = time.time,
        client: MqttClient | None = None,
    ) -> None:
        self.config = config
        self.device_id = config.device_id
        self.driver = driver
        self.clock = clock
        self.store = LocalStore(config.data_dir)
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.desired: DesiredState | None = self.store.load_desired()
        self.specs: dict[str, StackSpec] = {}
        self.pending: DesiredState | None = None
        self.awaiting: set[str] = set()
        self.rejection: str | None = None
        self.errors: dict[ServiceKey, str] = {}
        self.restarts: dict[ServiceKey, RestartRecord] = {}
        self.session = 0
        self.events: deque[Event] = deque(maxlen=EVENT_BACKLOG)
        self.events_dropped = 0
        self._last_report: ReportedState | None = None
        self._report_published = False
        self._wake = True
        self._converging = False
        self._waiting: frozenset[ServiceKey] = frozenset()
        self._last_candidate: ReportedState | None = None
        self.stopped = threading.Event()
        if self.desired is not None:
            for ref in self.desired.stacks:
                definition = self.store.load_definition(ref.spec_hash)
                if definition is not None:
                    self.specs[ref.spec_hash] = definition.spec
        self.client = client or MqttClient(
            config.broker_addresses(),
            client_id=f"tether-{self.device_id}",
            clean_session=False,
            keepalive=config.keepalive,
            will=self._will,
            on_message=self._enqueue,
            on_connect=lambda: self.inbox.put((_CONNECTED, b"")),
        )
        self.client.subscribe(topics.device(self.device_id, DeviceTopic.DESIRED))
        self.client.subscribe(topics.device(self.device_id, DeviceTopic.PRESENCE))

    # --- MQTT thread side ---

    def _enqueue(self, topic: str, payload: bytes, retained: bool) -> None:
        self.inbox.put((topic, payload))

    def _will(self) -> Will:
        self.session = self.store.next_session()
        presence = Presence(device_id=self.device_id, status="offline", session=self.session, at=self.clock())
        return Will(
            topics.device(self.device_id, DeviceTopic.PRESENCE), codec.encode(presence), qos=1, retain=True
        )

    # --- main loop ---

    def run(self, stop: threading.Event) -> None:
        """Run until ``stop`` is set; then say goodbye (``offline``) and disconnect."""
        self.client.start()
        next_reconcile = 0.0
        try:
            while not stop.is_set():
                timeout = max(0.0, min(next_reconcile - time.monotonic(), 0.5))
                try:
                    item = self.inbox.get(timeout=timeout)
                except queue.Empty:
                    item = None
                while item is not None:
                    self._handle(*item)
                    try:
                        item = self.inbox.get_nowait()
                    except queue.Empty:
                        item = None
                if self._wake or time.monotonic() >= next_reconcile:
                    self._wake = False
                    self.reconcile_once()
                    interval = (
                        FAST_INTERVAL
                        if (self._converging or self._waiting)
                        else self.config.reconcile_interval
                    )
                    next_reconcile = time.monotonic() + interval
        finally:
            goodbye = Presence(
                device_id=self.device_id, status="offline", session=self.session, at=self.clock()
            )
            self.client.stop(
                publish_first=(
                    topics.device(self.device_id, DeviceTopic.PRESENCE),
                    codec.encode(goodbye),
                    1,
                    True,
                )
            )
            self.driver.close()
            self.stopped.set()

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == _CONNECTED:
            self._on_connected()
            return
        parsed = topics.parse(topic)
        if parsed is None:
            return
        if parsed.kind == "device" and parsed.device_id == self.device_id:
            if parsed.device_topic == DeviceTopic.DESIRED:
                self._on_desired(payload)
            elif parsed.device_topic == DeviceTopic.PRESENCE:
                self._on_own_presence(payload)
        elif parsed.kind == "stack" and parsed.spec_hash in self.awaiting:
            self._on_definition(parsed.spec_hash, payload)
        # Anything else was not asked for (some brokers over-deliver): ignored.

    # --- connection ---

    def facts(self) -> DeviceFacts:
        return DeviceFacts(
            agent_version=agent_version(),
            driver=self.driver.name,
            arch=platform.machine(),
            os=os_name(),
            hostname=socket.gethostname(),
            labels=dict(self.config.labels),
        )

    def _publish_online(self) -> None:
        presence = Presence(
            device_id=self.device_id,
            status="online",
            session=self.session,
            facts=self.facts(),
            at=self.clock(),
        )
        self.client.publish(
            topics.device(self.device_id, DeviceTopic.PRESENCE), codec.encode(presence), qos=1, retain=True
        )

    def _on_connected(self) -> None:
        log.info(
            "connected to %s (session %d)",
            self.client.current_broker.url() if self.client.current_broker else "?",
            self.session,
        )
        self._publish_online()
        for spec_hash in self.awaiting:
            self.client.subscribe(topics.stack(spec_hash))
        while self.events:
            if not self._send_event(self.events[0]):
                break
            self.events.popleft()
        self._report_published = False
        self._publish_report()

    def _on_own_presence(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            presence = codec.decode(payload, Presence)
        except PayloadError:
            return
        if presence.session < self.session and self.client.connected:
            # A will from an older connection arrived after our ``online``: restore it.
            self._publish_online()

    # --- desired state ---

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
        if desired.generation <= current:
            return
        if self.pending is not None and desired.generation <= self.pending.generation:
            return
        self.pending = desired
        self._try_accept()

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
        for spec_hash in missing - self.awaiting:
            self.awaiting.add(spec_hash)
            self.client.subscribe(topics.stack(spec_hash))
        if missing:
            log.info("generation %d waits for %d stack definition(s)", pending.generation, len(missing))
            return
        self.store.save_desired(pending)
        self.desired = pending
        self.pending = None
        self.rejection = None
        keep = {ref.spec_hash for ref in pending.stacks}
        for spec_hash in self.awaiting - keep:
            self.client.unsubscribe(topics.stack(spec_hash))
        self.awaiting &= keep
        self.specs = {h: s for h, s in self.specs.items() if h in keep}
        self.store.prune_definitions(keep)
        self._event(
            "desired.accepted", f"generation {pending.generation} accepted ({len(pending.stacks)} stacks)"
        )
        self._wake = True

    def _on_definition(self, spec_hash: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            definition = codec.decode(payload, StackDefinition)
            if definition.spec_hash != spec_hash or content_hash(definition.spec) != spec_hash:
                raise PayloadError("StackDefinition: content does not match its hash")
        except PayloadError as exc:
            self.awaiting.discard(spec_hash)
            self.client.unsubscribe(topics.stack(spec_hash))
            self.pending = None
            self._reject(f"stack definition {spec_hash[:12]}: {exc}")
            return
        self.store.save_definition(definition)
        self.specs[spec_hash] = definition.spec
        self.awaiting.discard(spec_hash)
        self.client.unsubscribe(topics.stack(spec_hash))
        self._try_accept()

    def _reject(self, message: str) -> None:
        log.error("rejected: %s", message)
        self.rejection = message
        self._event("desired.rejected", message, level="error")
        self._wake = True

    # --- reconcile ---

    def desired_stacks(self) -> tuple[dict[str, StackSpec], dict[str, str]]:
        specs: dict[str, StackSpec] = {}
        hashes: dict[str, str] = {}
        if self.desired is not None:
            for ref in self.desired.stacks:
                spec = self.specs.get(ref.spec_hash)
                if spec is not None:
                    specs[ref.name] = spec
                    hashes[ref.name] = ref.spec_hash
        return specs, hashes

    def reconcile_once(self) -> None:
        """Observe, plan, apply, report. Driver failures are recorded, never raised."""
        now = self.clock()
        desired, hashes = self.desired_stacks()
        try:
            observed = self.driver.observe()
        except Exception as exc:  # noqa: BLE001 - recorded and retried next round
            log.error("observe failed: %s", exc)
            self._event("driver.error", str(exc), level="error")
            return
        plan = reconcile.plan(desired, observed, now, self.restarts)
        for action in plan.actions:
            self._apply(action, desired, now)
        if plan.actions:
            try:
                observed = self.driver.observe()
                self.driver.prune(set(desired))
            except Exception as exc:  # noqa: BLE001 - recorded and retried next round
                self._event("driver.error", str(exc), level="error")
        keys = {(stack, s.name) for stack, spec in desired.items() for s in spec.services}
        self.errors = {k: v for k, v in self.errors.items() if k in keys}
        self.restarts = {k: v for k, v in self.restarts.items() if k in keys}
        for inst in observed:
            key = (inst.stack, inst.service)
            rec = self.restarts.get(key)
            if rec and rec.count and inst.state == "running" and now - rec.last_at > 60:
                self.restarts[key] = RestartRecord(0, rec.last_at, rec.total)
        self._waiting = plan.waiting
        stacks = reconcile.status(desired, hashes, observed, self.errors, self.restarts, plan.waiting)
        self._converging = any(s.state == "converging" for s in stacks.values()) or bool(plan.actions)
        self._last_candidate = ReportedState(
            device_id=self.device_id,
            generation=self.desired.generation if self.desired else -1,
            stacks=stacks,
            error=self.rejection,
            at=now,
        )
        self._publish_report()

    def _apply(self, action: reconcile.Action, desired: dict[str, StackSpec], now: float) -> None:
        if isinstance(action, Create | Start):
            key = (action.stack, action.service.name)
        else:
            key = (action.instance.stack, action.instance.service)
        try:
            if isinstance(action, Create):
                log.info("create %s/%s", action.stack, action.service.name)
                self.driver.create(action.stack, desired[action.stack], action.service)
            elif isinstance(action, Start):
                rec = self.restarts.get(key, RestartRecord())
                self.restarts[key] = RestartRecord(rec.count + 1, now, rec.total + 1)
                log.info("restart %s/%s", action.stack, action.service.name)
                self.driver.start(action.instance, action.service)
            else:
                log.info("remove %s/%s (%s)", key[0], key[1], action.reason)
                self.driver.remove(action.instance, action.grace)
        except Exception as exc:  # a driver bug must not take the agent (and the device) down
            if not isinstance(exc, DriverError):
                log.exception("driver failed unexpectedly")
                exc = DriverError(
                    f"{key[0]}/{key[1]}: unexpected driver error: {exc.__class__.__name__}: {exc}"
                )
            log.error("%s", exc)
            self.errors[key] = str(exc)
            if isinstance(action, Create):
                rec = self.restarts.get(key, RestartRecord())
                self.restarts[key] = RestartRecord(rec.count + 1, now, rec.total)
            self._event("action.failed", str(exc), level="error", stack=key[0], service=key[1])
        else:
            if not isinstance(action, Remove):
                self.errors.pop(key, None)

    # --- outbound ---

    def _publish_report(self) -> None:
        candidate = self._last_candidate
        if candidate is None:
            return
        comparable = candidate.model_copy(update={"at": 0.0})
        if self._report_published and comparable == self._last_report:
            return
        ok = self.client.publish(
            topics.device(self.device_id, DeviceTopic.REPORTED), codec.encode(candidate), qos=1, retain=True
        )
        if ok:
            self._last_report = comparable
            self._report_published = True

    def _event(
        self,
        kind: str,
        message: str,
        level: Literal["info", "warning", "error"] = "info",
        stack: str | None = None,
        service: str | None = None,
    ) -> None:
        event = Event(
            device_id=self.device_id,
            kind=kind,
            message=message,
            level=level,
            stack=stack,
            service=service,
            at=self.clock(),
        )
        if self.events or not self._send_event(event):
            if len(self.events) == self.events.maxlen:
                self.events_dropped += 1
            self.events.append(event)

    def _send_event(self, event: Event) -> bool:
        return self.client.publish(
            topics.device(self.device_id, DeviceTopic.EVENTS), codec.encode(event), qos=1
        )
