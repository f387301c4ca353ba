"""Enrollment: fleet tokens, the waiting room, approval (docs/onboarding.md).

A device with a fleet token connects as ``enroll:{device_id}`` (the broker checks the token
against :meth:`CredentialTable.set_tokens`, the snapshot kept by
:meth:`~.security.BrokerAccess.sync_tokens`; the broker thread never reads the database) and
publishes an :class:`EnrollmentRequest`. The controller checks it (token valid, unexpired, a
use left; device id as in the topic; a 32-byte X25519 key) and puts the device in the
waiting room (``pending``), or approves it at once for an ``--auto-approve`` token. On
approval the device gets its own credentials, sealed to its public key and published
retained on ``enroll/{id}/response``; the retained answer is cleared once the device comes
online with them. Anything wrong is logged once (and kept as the waiting room entry's
``last_error``) and changes nothing.

The token and waiting-room commands are functions over the :class:`~.context.Context`,
registered in :data:`commands`; :func:`on_request`, :func:`seen` and
:func:`publish_answers` are what the controller's inbox loop calls.
"""

from __future__ import annotations

import logging
import secrets

from tether.protocol import codec, names, topics
from tether.protocol.commands import (
    DevicesApprove,
    DevicesPending,
    DevicesReject,
    TokensCreate,
    TokensList,
    TokensRemove,
)
from tether.protocol.credentials import TOKEN_PREFIX, TOKEN_USER_PREFIX, hash_token
from tether.protocol.enrollment import decode_public_key, seal_grant
from tether.protocol.errors import CommandError, ConflictError, NotFoundError, PayloadError, TopicError
from tether.protocol.models import EnrollmentGrant, EnrollmentRequest, EnrollmentResponse
from tether.protocol.results import (
    DevicesApproved,
    DevicesRejected,
    PendingList,
    PendingView,
    TokenCreated,
    TokenList,
    TokensRemoved,
    TokenView,
)

from .context import Context, require
from .fleet_events import device_subject
from .models import Device, Enrollment, EnrollmentToken
from .registry import CommandRegistry, Route
from .security import issue_device_credentials
from .selectors import Attributes, check_labels, matches, parse_selector

log = logging.getLogger(__name__)
commands = CommandRegistry(tag="tokens")
"""The commands handled here (see :mod:`.registry`)."""

# --- tokens ---


@commands.command(
    TokensCreate,
    role="admin",
    http=Route("POST", "/tokens", "Create an enrollment token (shown once)", status=201),
)
def tokens_create(ctx: Context, cmd: TokensCreate) -> TokenCreated:
    if cmd.group is not None:
        require(
            ctx.store.get_group(cmd.group), "group", cmd.group, " (create it first: tether groups create)"
        )
    check_labels(cmd.labels)
    token_id = secrets.token_hex(4)
    token = f"{TOKEN_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
    now = ctx.clock()
    record = EnrollmentToken(
        id=token_id,
        token_hash=hash_token(token),
        group=cmd.group,
        labels=dict(cmd.labels),
        auto_approve=cmd.auto_approve,
        expires=now + cmd.expires_s if cmd.expires_s else None,
        uses=cmd.uses,
        created=now,
    )
    with ctx.store.transaction():
        ctx.store.put_token(record)
    ctx.access.new_secret(f"{TOKEN_USER_PREFIX}{token_id}", token)
    ctx.access.sync_tokens(ctx.store)
    log.info("enrollment token %s created", token_id)
    return TokenCreated(token=token, **_token_view(ctx, record).model_dump())


def _token_view(ctx: Context, t: EnrollmentToken) -> TokenView:
    return TokenView(
        id=t.id,
        group=t.group,
        labels=t.labels,
        auto_approve=t.auto_approve,
        expires=t.expires,
        expired=t.expires is not None and ctx.clock() >= t.expires,
        uses=t.uses,
        used=len(t.devices),
        devices=list(t.devices),
        created=t.created,
    )


@commands.command(TokensList, read_only=True, http=Route("GET", "/tokens", "Enrollment tokens"))
def tokens_ls(ctx: Context, cmd: TokensList) -> TokenList:
    return TokenList(tokens=[_token_view(ctx, t) for t in ctx.store.list_tokens()])


@commands.command(
    TokensRemove,
    role="admin",
    http=Route("DELETE", "/tokens/{id}", "Remove an enrollment token", lists={"id": "ids"}),
)
def tokens_rm(ctx: Context, cmd: TokensRemove) -> TokensRemoved:
    problems = []
    for token_id in cmd.ids:
        problem = names.TOKEN_ID.problem(token_id)
        if problem is not None:
            raise CommandError(problem)
        if ctx.store.get_token(token_id) is None:
            problems.append(f"unknown token {token_id!r}")
    if problems:
        raise NotFoundError("; ".join(problems))
    with ctx.store.transaction():
        for token_id in cmd.ids:
            ctx.store.delete_token(token_id)
    ctx.access.sync_tokens(ctx.store)
    log.info("enrollment token(s) %s removed", ", ".join(cmd.ids))
    return TokensRemoved(removed=list(cmd.ids))


# --- requests from enrolling devices ---


def _enroll_error(ctx: Context, device_id: str, message: str) -> None:
    """One clear log line; kept on the waiting-room entry when there is one. Nothing else changes."""
    log.warning("enrollment of %s refused: %s", device_id, message)
    entry = ctx.store.get_enrollment(device_id)
    if entry is not None and entry.last_error != message:
        with ctx.store.transaction():
            ctx.store.put_enrollment(entry.model_copy(update={"last_error": message}))


def on_request(ctx: Context, device_id: str, payload: bytes) -> None:
    """An enrolling device's request (``enroll/{device_id}/request``)."""
    try:
        request = codec.decode(payload, EnrollmentRequest)
        decode_public_key(request.public_key)
    except PayloadError as exc:
        _enroll_error(ctx, device_id, f"malformed request: {exc}")
        return
    if request.device_id != device_id:
        _enroll_error(ctx, device_id, f"request names device {request.device_id!r}, topic {device_id!r}")
        return
    token = next((t for t in ctx.store.list_tokens() if t.token_hash == hash_token(request.token)), None)
    now = ctx.clock()
    if token is None:
        _enroll_error(ctx, device_id, "unknown or removed enrollment token")
        return
    if token.expires is not None and now >= token.expires:
        _enroll_error(ctx, device_id, f"enrollment token {token.id} has expired")
        return
    if device_id not in token.devices and token.uses is not None and len(token.devices) >= token.uses:
        _enroll_error(ctx, device_id, f"enrollment token {token.id} is used up ({token.uses} uses)")
        return
    entry = ctx.store.get_enrollment(device_id)
    if entry is not None:
        _known_request(ctx, entry, request)
        return
    if ctx.store.get_credential(device_id) is not None:
        _enroll_error(ctx, device_id, "a device with this id already has credentials")
        return
    try:
        topics.check_device_id(device_id)
    except TopicError as exc:
        _enroll_error(ctx, device_id, str(exc))
        return
    if device_id.startswith(("cli-", "controller-", "enroll-")):
        _enroll_error(ctx, device_id, f"device id {device_id!r} is reserved")
        return
    entry = Enrollment(
        device_id=device_id,
        token_id=token.id,
        public_key=request.public_key,
        facts=request.facts,
        requested=now,
    )
    with ctx.store.transaction():
        ctx.store.put_enrollment(entry)
        ctx.store.put_token(token.model_copy(update={"devices": (*token.devices, device_id)}))
    ctx.access.sync_tokens(ctx.store)
    log.info("device %s is waiting for approval (token %s)", device_id, token.id)
    ctx.events.emit("device.pending", device_subject(device_id), {"token": token.id})
    if token.auto_approve:
        _approve(ctx, [entry])


def _known_request(ctx: Context, entry: Enrollment, request: EnrollmentRequest) -> None:
    """A device already in (or through) the waiting room asked again."""
    if request.public_key != entry.public_key:
        _enroll_error(ctx, entry.device_id, "asked again with another public key (ignored)")
        return
    if entry.state == "rejected":
        log.info("rejected device %s asked again; ignored", entry.device_id)
        return
    if entry.state == "approved":
        if entry.cleared:
            _enroll_error(ctx, entry.device_id, "already enrolled (tether devices rm it to enroll again)")
        else:
            _publish_answer(ctx, entry)  # it may have missed it
        return
    log.debug("device %s still pending", entry.device_id)


# --- the waiting room ---


def _entry_view(ctx: Context, e: Enrollment) -> PendingView:
    token = ctx.store.get_token(e.token_id)
    return PendingView(
        id=e.device_id,
        state=e.state,
        token=e.token_id,
        group=token.group if token else None,
        labels=dict(_entry_attributes(e, token)),
        hostname=e.facts.hostname,
        arch=e.facts.arch,
        requested=e.requested,
        decided=e.decided,
        error=e.last_error,
    )


def _entry_attributes(e: Enrollment, token: EnrollmentToken | None) -> Attributes:
    """What ``approve --all --select`` matches: what the device reports, under its token's labels."""
    device = Device(id=e.device_id, facts=e.facts, pinned_labels=token.labels if token else {})
    return device.attributes()


@commands.command(
    DevicesPending,
    read_only=True,
    http=Route("GET", "/waiting-room", "Devices that asked to join", tag="devices"),
)
def devices_pending(ctx: Context, cmd: DevicesPending) -> PendingList:
    rows = [_entry_view(ctx, e) for e in ctx.store.list_enrollments() if e.state != "approved"]
    return PendingList(devices=rows)


@commands.command(
    DevicesApprove, http=Route("POST", "/waiting-room/approve", "Approve waiting devices", tag="devices")
)
def devices_approve(ctx: Context, cmd: DevicesApprove) -> DevicesApproved:
    check_labels(cmd.labels)
    if bool(cmd.device_ids) == cmd.all:
        raise CommandError("name devices to approve, or --all (not both)")
    if cmd.selector and not cmd.all:
        raise CommandError("--select goes with --all")
    entries: list[Enrollment] = []
    if cmd.all:
        selector = parse_selector(cmd.selector) if cmd.selector else ()
        entries = [
            e
            for e in ctx.store.list_enrollments()
            if e.state == "pending"
            and matches(selector, _entry_attributes(e, ctx.store.get_token(e.token_id)))
        ]
    else:
        missing, approved = [], []
        for device_id in cmd.device_ids:
            entry = ctx.store.get_enrollment(device_id)
            if entry is None:
                missing.append(f"{device_id!r} is not in the waiting room")
            elif entry.state == "approved":
                approved.append(f"{device_id!r} is already approved")
            else:
                entries.append(entry)
        if missing:
            raise NotFoundError("; ".join(missing + approved))
        if approved:
            raise ConflictError("; ".join(approved))
    _approve(ctx, entries, cmd.labels)
    return DevicesApproved(approved=[e.device_id for e in entries])


@commands.command(
    DevicesReject, http=Route("POST", "/waiting-room/reject", "Reject waiting devices", tag="devices")
)
def devices_reject(ctx: Context, cmd: DevicesReject) -> DevicesRejected:
    entries = []
    problems = []
    for device_id in cmd.device_ids:
        entry = ctx.store.get_enrollment(device_id)
        if entry is None:
            problems.append(f"{device_id!r} is not pending")
        elif entry.state != "pending":
            problems.append(f"{device_id!r} is not pending (it is {entry.state})")
        else:
            entries.append(entry)
    if problems:
        raise ConflictError("; ".join(problems))
    now = ctx.clock()
    rejected = []
    with ctx.store.transaction():
        for entry in entries:
            grant = EnrollmentGrant(
                device_id=entry.device_id, status="rejected", message="rejected by an operator"
            )
            updated = entry.model_copy(
                update={"state": "rejected", "decided": now, "sealed": seal_grant(entry.public_key, grant)}
            )
            ctx.store.put_enrollment(updated)
            rejected.append(updated)
    for entry in rejected:
        log.warning("device %s rejected", entry.device_id)
        _publish_answer(ctx, entry)
    return DevicesRejected(rejected=[e.device_id for e in rejected])


def _approve(ctx: Context, entries: list[Enrollment], labels: dict[str, str] | None = None) -> None:
    """Give each device its credentials, labels and group; publish them sealed.

    The token's labels and ``labels`` (given at approval, winning) are pinned: trusted,
    so selector groups match them (docs/security.md, "Labels and groups")."""
    now = ctx.clock()
    approved = []
    with ctx.store.transaction():
        for entry in entries:
            token = ctx.store.get_token(entry.token_id)
            password = issue_device_credentials(ctx.store, entry.device_id, now)
            ctx.access.new_secret(entry.device_id, password)
            device = ctx.store.get_device(entry.device_id) or Device(id=entry.device_id)
            pinned = {**(token.labels if token else {}), **(labels or {})}
            ctx.store.put_device(
                device.model_copy(update={"pinned_labels": pinned, "facts": device.facts or entry.facts})
            )
            if token is not None and token.group:
                _join_group(ctx, entry.device_id, token.group)
            grant = EnrollmentGrant(
                device_id=entry.device_id, status="approved", username=entry.device_id, password=password
            )
            updated = entry.model_copy(
                update={
                    "state": "approved",
                    "decided": now,
                    "sealed": seal_grant(entry.public_key, grant),
                    "last_error": None,
                }
            )
            ctx.store.put_enrollment(updated)
            approved.append(updated)
    if not approved:
        return
    ctx.access.sync(ctx.store)
    ctx.sync()  # their desired state, before they connect
    for entry in approved:
        log.info("device %s approved", entry.device_id)
        _publish_answer(ctx, entry)


def _join_group(ctx: Context, device_id: str, name: str) -> None:
    group = ctx.store.get_group(name)
    if group is None:
        log.warning("device %s: the token's group %r no longer exists", device_id, name)
        return
    if group.selector is not None:
        return  # a selector group: the token's (pinned) labels are what makes it match
    if device_id not in group.devices:
        ctx.store.delete_group(name)
        ctx.store.create_group(
            group.model_copy(update={"devices": tuple(sorted({*group.devices, device_id}))})
        )


# --- the answers on the broker ---


def _publish_answer(ctx: Context, entry: Enrollment) -> bool:
    if entry.sealed is None:
        return False
    message = EnrollmentResponse(device_id=entry.device_id, sealed=entry.sealed)
    return ctx.publisher.publish_retained(topics.enroll_response(entry.device_id), codec.encode(message))


def publish_answers(ctx: Context) -> None:
    """After (re)connecting: answers the broker may have lost (a fresh embedded broker)."""
    for entry in ctx.store.list_enrollments():
        if entry.sealed is not None and not entry.cleared:
            _publish_answer(ctx, entry)


def seen(ctx: Context, device_id: str) -> None:
    """The device came online with its own credentials: clear its retained answer."""
    entry = ctx.store.get_enrollment(device_id)
    if entry is None or entry.state != "approved" or entry.cleared:
        return
    if ctx.publisher.publish_retained(topics.enroll_response(device_id), b""):
        with ctx.store.transaction():
            ctx.store.put_enrollment(entry.model_copy(update={"cleared": True, "sealed": None}))
        log.info("device %s enrolled and online", device_id)
