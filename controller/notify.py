"""Webhooks (``tether notify``): fleet events posted to HTTP endpoints, signed, retried, logged.

Theory of operation
-------------------
The controller hands every fleet event it emits (:mod:`.fleet_events`) to its
:class:`Notifier`, on its worker thread. The notifier decides, in memory, what each
webhook is told and stores each message as a :class:`~.models.Delivery` row (``pending``);
a sender thread of its own posts them, so a slow or dead endpoint never holds the
controller back. Results come back to the worker thread, which records them: ``delivered``
on a 2xx answer; otherwise the next attempt waits a jittered, doubling delay
(:class:`~tether.protocol.backoff.Backoff`, 2 s doubling to 10 min) until
:data:`MAX_ATTEMPTS` attempts have failed (``failed``). Pending rows survive a controller
restart and are sent after it.

* ``device.offline`` fires when a device has been offline for the webhook's
  ``offline_after_s`` (a device that flaps under it fires nothing), once; ``device.online``
  fires when a device the webhook was told is offline comes back.
* At most :data:`BURST` messages of one kind go to a webhook within :data:`WINDOW_S`
  seconds; the rest of the window's are summed up in one ``summary`` message (how many,
  and the first :data:`SUMMARY_SUBJECTS` subjects), and while they keep coming every
  window is one summary. A fleet-wide outage is a few messages, not 10,000 posts.

The body is JSON (docs/notifications.md); with a secret, ``X-Tether-Signature`` is
``sha256=`` + the hex HMAC-SHA256 of ``{X-Tether-Timestamp}.{body}`` under the secret.
The secret is kept sealed to the controller's key, opened only to sign, never shown or
logged.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import logging
import queue
import secrets as pysecrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tether.protocol.backoff import Backoff
from tether.protocol.commands import (
    MAX_WEBHOOKS,
    NOTIFY_KINDS,
    NotifyAdd,
    NotifyList,
    NotifyLog,
    NotifyRemove,
    NotifyTest,
)
from tether.protocol.errors import CommandError, PayloadError
from tether.protocol.results import (
    DeliveryList,
    DeliveryResult,
    DeliveryView,
    WebhookList,
    WebhookRemoved,
    WebhookResult,
    WebhookView,
)

from .context import Context, require
from .fleet_events import FleetEvent, clip, device_subject
from .models import Delivery, Webhook
from .registry import CommandRegistry, Route

if TYPE_CHECKING:
    from .store import Store
    from .variables import SecretsKey

log = logging.getLogger(__name__)

commands = CommandRegistry(tag="webhooks")
"""The commands handled here (see :mod:`.registry`): all admin-only (URLs may carry tokens)."""

SIGNATURE_HEADER = "X-Tether-Signature"
TIMESTAMP_HEADER = "X-Tether-Timestamp"
MAX_ATTEMPTS = 12
"""Attempts before a delivery is given up (about an hour and a half of retries)."""
BACKOFF = Backoff(base=2.0, cap=600.0)
BURST = 3
"""Messages of one kind a webhook gets one by one within a window; the rest are summed up."""
WINDOW_S = 30.0
"""The default window (a webhook's ``window_s``)."""
SUMMARY_SUBJECTS = 50
DELIVERIES_KEPT = 10_000
"""Finished deliveries kept (the newest); pending ones always stay."""
SEND_TIMEOUT_S = 10.0
MAX_SECRET_BYTES = 1024
MAX_IN_FLIGHT = 64


# --- pure parts ---


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The signature header's value: ``sha256=`` + hex HMAC-SHA256 of ``timestamp.body``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver does: recompute and compare in constant time."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def describe(kind: str, subject: str, data: dict[str, Any]) -> str:
    """One line for people (the Slack body's text)."""
    name = subject.partition("/")[2] or subject
    if kind == "device.offline":
        return f"device {name} is offline (for {data.get('offline_for', 0):.0f}s)"
    if kind == "device.online":
        return f"device {name} is back online (was offline {data.get('offline_for', 0):.0f}s)"
    if kind == "device.pending":
        return f"device {name} waits in the waiting room (token {data.get('token')})"
    if kind == "device.disk_low":
        if data.get("storage_error"):
            return f"device {name} cannot write its data directory: {data['storage_error']}"
        return f"device {name}: disk {data.get('percent')}% used"
    if kind == "service.crashloop":
        return (
            f"device {name}: {data.get('stack')}/{data.get('service')} is crash looping: {data.get('reason')}"
        )
    if kind == "download.stuck":
        return f"device {name}: download of {data.get('stack')} is {data.get('state')}: {data.get('reason')}"
    if kind == "job.result":
        return f"device {name}: job {data.get('job')} run {data.get('run')} {data.get('outcome')}"
    if kind.startswith("deployment."):
        text = f"deployment {data.get('id')} of {name}: {kind.partition('.')[2]}"
        return text + (f" ({data['message']})" if data.get("message") else "")
    if kind == "summary":
        return (
            f"{data.get('count')} more {data.get('kind')} within {data.get('window_s'):.0f}s: "
            + ", ".join(s.partition("/")[2] for s in data.get("subjects", []))
        )
    if kind == "test":
        return "a test message from tether notify test"
    return f"{kind} {subject}"


def render(delivery: Delivery, fmt: str) -> bytes:
    """The body posted for ``delivery``: JSON, or Slack's ``{"text": ...}``."""
    if fmt == "slack":
        return json.dumps({"text": delivery.payload.get("text", "")}).encode()
    return json.dumps({"delivery": delivery.id, **delivery.payload}, separators=(",", ":")).encode()


def check_url(url: str) -> str | None:
    """What is wrong with a webhook URL (None: nothing)."""
    if any(c.isspace() or ord(c) < 32 for c in url):
        return "it contains whitespace or control characters"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"its scheme must be http or https, not {parts.scheme or 'none'!r}"
    if not parts.hostname:
        return "it names no host"
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return "its port is not a number from 0 to 65535"
    return None


@dataclass
class _Window:
    start: float
    length: float
    sent: int = 0
    burst: int = BURST
    extra: list[str] = field(default_factory=list)


class Limiter:
    """At most :data:`BURST` messages per (webhook, kind) and window; the rest summed up. Pure."""

    def __init__(self) -> None:
        self.windows: dict[tuple[str, str], _Window] = {}

    def admit(self, webhook: str, kind: str, subject: str, now: float, length: float = WINDOW_S) -> bool:
        window = self.windows.get((webhook, kind))
        if window is None:
            window = self.windows[(webhook, kind)] = _Window(now, length)
        if window.sent < window.burst:
            window.sent += 1
            return True
        window.extra.append(subject)
        return False

    def due(self, now: float) -> list[tuple[str, str, list[str]]]:
        """(webhook, kind, subjects left out) of every window that ended with some left out."""
        out = []
        for key, window in list(self.windows.items()):
            if now - window.start < window.length:
                continue
            if window.extra:
                out.append((key[0], key[1], window.extra))
                # Still coming: the next window is a summary too (burst 0) until one is quiet.
                self.windows[key] = _Window(now, window.length, burst=0)
            else:
                del self.windows[key]
        return out


# --- sending (the sender thread) ---


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect is an answer that is not 2xx: retried, never followed


_OPENER = urllib.request.build_opener(_NoRedirect)


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, str | None]:
    """POST ``body``; (HTTP status, error) where error is None for a 2xx answer."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=SEND_TIMEOUT_S) as response:
            response.read(4096)
            return response.status, None
    except urllib.error.HTTPError as exc:
        return exc.code, f"HTTP {exc.code} {clip(str(exc.reason), 120)}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return None, clip(f"{type(reason).__name__}: {reason}", 200)


Send = Callable[[str, bytes, dict[str, str]], tuple[int | None, str | None]]


class Notifier:
    """Decides what each webhook is told (on the controller's worker thread) and has a sender
    thread post it (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        secrets: SecretsKey | None,
        clock: Callable[[], float] = time.time,
        send: Send = post,
    ) -> None:
        self.store = store
        self.secrets = secrets
        self.clock = clock
        self.send = send
        self.limiter = Limiter()
        self._webhooks: list[Webhook] | None = None
        self._secret_cache: dict[str, str | None] = {}
        self._offline: dict[str, float] = {}  # device -> since (as the event said)
        self._timers: list[tuple[float, str, str, float]] = []  # (due, webhook, device, since)
        self._told: set[tuple[str, str]] = set()  # (webhook, device) told offline
        self._in_flight: set[int] = set()
        self._outbox: queue.Queue[tuple[int, str, bytes, dict[str, str]] | None] = queue.Queue()
        self._results: queue.Queue[tuple[int, int | None, str | None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._next_prune = 0.0
        self._seeded = False

    # lifecycle (the sender thread)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="notify", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._outbox.put(None)
            self._thread.join(timeout=SEND_TIMEOUT_S + 1)
            self._thread = None

    def _run(self) -> None:
        while (item := self._outbox.get()) is not None:
            delivery_id, url, body, headers = item
            try:
                status, error = self.send(url, body, headers)
            except Exception as exc:  # never let the sender die
                status, error = None, clip(f"{type(exc).__name__}: {exc}", 200)
            self._results.put((delivery_id, status, error))

    # on the controller's worker thread

    def forget(self) -> None:
        """Webhooks changed: read them again."""
        self._webhooks = None
        self._secret_cache = {}

    def webhooks(self) -> list[Webhook]:
        if self._webhooks is None:
            self._webhooks = self.store.list_webhooks()
        return self._webhooks

    def _secret(self, webhook: Webhook) -> str | None:
        if webhook.sealed is None or self.secrets is None:
            return None
        if webhook.id not in self._secret_cache:
            try:
                items = self.secrets.open_items(webhook.sealed, f"webhook {webhook.id}'s secret")
                self._secret_cache[webhook.id] = items.get("secret")
            except PayloadError as exc:
                log.error("%s", exc)
                self._secret_cache[webhook.id] = None
        return self._secret_cache[webhook.id]

    def on_event(self, event: FleetEvent) -> None:
        """A fleet event was emitted: queue what webhooks are told of it."""
        if event.kind not in NOTIFY_KINDS:
            return
        if not self._seeded:
            self._seed(self.clock())
        device = event.subject.partition("/")[2]
        if event.kind == "device.offline":
            since = float(event.data.get("since") or event.at)
            self._offline[device] = since
            for webhook in self.webhooks():
                if "device.offline" in webhook.on:
                    heapq.heappush(self._timers, (since + webhook.offline_after_s, webhook.id, device, since))
            return
        if event.kind == "device.online":
            was: float | None = self._offline.pop(device, None)
            for webhook in self.webhooks():
                if (webhook.id, device) in self._told:
                    self._told.discard((webhook.id, device))
                    if "device.online" in webhook.on:
                        data = {"offline_for": round(event.at - was, 1) if was is not None else None}
                        self._queue(webhook, "device.online", event.subject, data, event.at)
            return
        for webhook in self.webhooks():
            if event.kind in webhook.on:
                self._queue(webhook, event.kind, event.subject, event.data, event.at)

    def _queue(self, webhook: Webhook, kind: str, subject: str, data: dict[str, Any], at: float) -> None:
        now = self.clock()
        if kind != "test" and not self.limiter.admit(webhook.id, kind, subject, now, webhook.window_s):
            return
        self._add(webhook, kind, subject, data, at)

    def _add(self, webhook: Webhook, kind: str, subject: str, data: dict[str, Any], at: float) -> Delivery:
        now = self.clock()
        payload = {
            "kind": kind,
            "subject": subject,
            "at": at,
            "data": data,
            "text": describe(kind, subject, data),
        }
        with self.store.transaction():
            return self.store.add_delivery(
                Delivery(
                    webhook=webhook.id,
                    kind=kind,
                    subject=subject,
                    payload=payload,
                    next_at=now,
                    created=now,
                    updated=now,
                )
            )

    def test(self, webhook: Webhook) -> Delivery:
        return self._add(webhook, "test", "", {}, self.clock())

    def _seed(self, now: float) -> None:
        """After a (re)start: devices offline already are timed from when they went offline, and
        those offline past a webhook's threshold count as told (so their return is told)."""
        self._seeded = True
        offline = {d.id: d.since for d in self.store.list_devices(reported=False) if d.status == "offline"}
        for device, since in offline.items():
            if device in self._offline:
                continue  # an event told us already
            since = since if since is not None else now
            self._offline[device] = since
            for webhook in self.webhooks():
                if "device.offline" not in webhook.on:
                    continue
                if since + webhook.offline_after_s <= now:
                    self._told.add((webhook.id, device))
                else:
                    heapq.heappush(self._timers, (since + webhook.offline_after_s, webhook.id, device, since))

    def tick(self) -> None:
        """Record results, fire offline timers and summaries, hand due deliveries to the sender."""
        now = self.clock()
        if not self._seeded:
            self._seed(now)
        self._record_results(now)
        webhooks = {w.id: w for w in self.webhooks()}
        while self._timers and self._timers[0][0] <= now:
            _, webhook_id, device, since = heapq.heappop(self._timers)
            webhook = webhooks.get(webhook_id)
            if webhook is None or self._offline.get(device) != since or (webhook_id, device) in self._told:
                continue  # back online since (a flap under the threshold), or already told
            self._told.add((webhook_id, device))
            told = {"since": since, "offline_for": round(now - since, 1)}
            self._queue(webhook, "device.offline", device_subject(device), told, now)
        for webhook_id, kind, subjects in self.limiter.due(now):
            webhook = webhooks.get(webhook_id)
            if webhook is not None:
                data: dict[str, Any] = {
                    "kind": kind,
                    "count": len(subjects),
                    "subjects": subjects[:SUMMARY_SUBJECTS],
                    "window_s": webhook.window_s,
                }
                self._add(webhook, "summary", "", data, now)
        if len(self._in_flight) < MAX_IN_FLIGHT:
            for delivery in self.store.due_deliveries(now, limit=MAX_IN_FLIGHT):
                if delivery.id in self._in_flight or len(self._in_flight) >= MAX_IN_FLIGHT:
                    continue
                webhook = webhooks.get(delivery.webhook)
                if webhook is None:
                    continue
                body = render(delivery, webhook.format)
                timestamp = str(int(now))
                headers = {
                    "Content-Type": "application/json",
                    "User-Agent": "tether-notify",
                    "X-Tether-Delivery": str(delivery.id),
                    "X-Tether-Event": delivery.kind,
                    TIMESTAMP_HEADER: timestamp,
                }
                secret = self._secret(webhook)
                if secret is not None:
                    headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
                self._in_flight.add(delivery.id)
                self._outbox.put((delivery.id, webhook.url, body, headers))
        if now >= self._next_prune:
            self._next_prune = now + 600
            self.store.prune_deliveries(DELIVERIES_KEPT)

    def _record_results(self, now: float) -> None:
        results = []
        while True:
            try:
                results.append(self._results.get_nowait())
            except queue.Empty:
                break
        if not results:
            return
        with self.store.transaction():
            for delivery_id, status, error in results:
                self._in_flight.discard(delivery_id)
                delivery = self.store.get_delivery(delivery_id)
                if delivery is None or delivery.state != "pending":
                    continue  # its webhook was removed meanwhile
                attempts = delivery.attempts + 1
                update: dict[str, Any] = {"attempts": attempts, "status": status, "updated": now}
                if error is None:
                    update.update(state="delivered", next_at=None, last_error=None)
                elif attempts >= MAX_ATTEMPTS:
                    update.update(state="failed", next_at=None, last_error=error)
                    log.warning("webhook %s: gave up delivery %d: %s", delivery.webhook, delivery_id, error)
                else:
                    update.update(next_at=now + BACKOFF.delay(attempts - 1), last_error=error)
                    log.info(
                        "webhook %s: delivery %d failed (%s): retrying", delivery.webhook, delivery_id, error
                    )
                self.store.put_delivery(delivery.model_copy(update=update))


# --- commands ---


def webhook_view(webhook: Webhook, counts: dict[str, int]) -> WebhookView:
    return WebhookView(
        id=webhook.id,
        url=webhook.url,
        on=list(webhook.on),
        offline_after_s=webhook.offline_after_s,
        format=webhook.format,
        window_s=webhook.window_s,
        signed=webhook.sealed is not None,
        created=webhook.created,
        deliveries={s: counts.get(s, 0) for s in ("pending", "delivered", "failed")},
    )


def delivery_view(d: Delivery) -> DeliveryView:
    return DeliveryView(
        id=d.id,
        webhook=d.webhook,
        kind=d.kind,
        subject=d.subject,
        state=d.state,
        attempts=d.attempts,
        next_at=d.next_at,
        last_error=d.last_error,
        status=d.status,
        created=d.created,
        updated=d.updated,
    )


def _webhook(ctx: Context, webhook_id: str) -> Webhook:
    return require(ctx.store.get_webhook(webhook_id), "webhook", webhook_id)


@commands.command(NotifyAdd, role="admin", http=Route("POST", "/webhooks", "Add a webhook", status=201))
def notify_add(ctx: Context, cmd: NotifyAdd) -> WebhookResult:
    problems = []
    wrong = check_url(cmd.url)
    if wrong:
        problems.append(f"the URL is not usable: {wrong}")
    sealed = None
    if cmd.sealed is not None:
        if ctx.secrets is None:
            raise CommandError("this controller has no secrets key (it is made in tether up's --data-dir)")
        try:
            items = ctx.secrets.open_items(cmd.sealed, "notify add: the sealed secret")
        except PayloadError as exc:
            raise CommandError(str(exc)) from exc
        secret = items.get("secret", "")
        if set(items) != {"secret"}:
            problems.append("the sealed secret must hold exactly a secret")
        elif not secret:
            problems.append("the secret is empty")
        elif len(secret.encode()) > MAX_SECRET_BYTES:
            problems.append(f"the secret is longer than {MAX_SECRET_BYTES} bytes")
        else:
            sealed = ctx.secrets.seal_items({"secret": secret})
    if len(ctx.store.list_webhooks()) >= MAX_WEBHOOKS:
        problems.append(f"there are {MAX_WEBHOOKS} webhooks already (the most a controller keeps)")
    if problems:
        raise CommandError("notify add: " + "; ".join(problems))
    webhook = Webhook(
        id="wh-" + pysecrets.token_hex(4),
        url=cmd.url,
        on=tuple(dict.fromkeys(cmd.on)),
        offline_after_s=cmd.offline_after_s,
        format=cmd.format,
        sealed=sealed,
        window_s=cmd.window_s,
        created=ctx.clock(),
    )
    with ctx.store.transaction():
        ctx.store.put_webhook(webhook)
    ctx.notifier.forget()
    return WebhookResult(webhook=webhook_view(webhook, {}))


@commands.command(NotifyList, role="admin", http=Route("GET", "/webhooks", "Webhooks"))
def notify_ls(ctx: Context, cmd: NotifyList) -> WebhookList:
    counts = ctx.store.delivery_counts()
    return WebhookList(webhooks=[webhook_view(w, counts.get(w.id, {})) for w in ctx.store.list_webhooks()])


@commands.command(NotifyRemove, role="admin", http=Route("DELETE", "/webhooks/{id}", "Remove a webhook"))
def notify_rm(ctx: Context, cmd: NotifyRemove) -> WebhookRemoved:
    _webhook(ctx, cmd.id)
    with ctx.store.transaction():
        ctx.store.delete_webhook(cmd.id)
    ctx.notifier.forget()
    return WebhookRemoved(id=cmd.id)


@commands.command(
    NotifyTest, role="admin", http=Route("POST", "/webhooks/{id}/test", "Send a test event to a webhook")
)
def notify_test(ctx: Context, cmd: NotifyTest) -> DeliveryResult:
    return DeliveryResult(delivery=delivery_view(ctx.notifier.test(_webhook(ctx, cmd.id))))


@commands.command(
    NotifyLog, role="admin", http=Route("GET", "/webhook-deliveries", "The webhooks' delivery log")
)
def notify_log(ctx: Context, cmd: NotifyLog) -> DeliveryList:
    if cmd.id is not None:
        _webhook(ctx, cmd.id)
    return DeliveryList(deliveries=[delivery_view(d) for d in ctx.store.list_deliveries(cmd.id, cmd.limit)])
