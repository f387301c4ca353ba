"""Enrollment: fleet tokens, the waiting room, approval (docs/onboarding.md).

A device with a fleet token connects as ``enroll:{device_id}`` (the broker checks the token
against :meth:`CredentialTable.set_tokens`, the snapshot kept here; the broker thread never
reads the database) and publishes an :class:`EnrollmentRequest`. The controller checks it
(token valid, unexpired, a use left; device id as in the topic; a 32-byte X25519 key) and
puts the device in the waiting room (``pending``), or approves it at once for an
``--auto-approve`` token. On approval the device gets its own credentials, sealed to its
public key and published retained on ``enroll/{id}/response``; the retained answer is
cleared once the device comes online with them. Anything wrong is logged once (and kept as
the waiting room entry's ``last_error``) and changes nothing.

:class:`EnrollmentHandlers` is mixed into :class:`~.service.Controller`; its methods run on
the controller's worker thread.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

from tether.protocol import codec, names, topics
from tether.protocol.commands import (
    DevicesApprove,
    DevicesPending,
    DevicesReject,
    TokensCreate,
    TokensList,
    TokensRemove,
)
from tether.protocol.credentials import (
    TOKEN_PREFIX,
    TOKEN_USER_PREFIX,
    CredentialTable,
    TokenGrant,
    hash_token,
)
from tether.protocol.enrollment import decode_public_key, seal_grant
from tether.protocol.errors import PayloadError, StoreError, TopicError
from tether.protocol.models import EnrollmentGrant, EnrollmentRequest, EnrollmentResponse
from tether.protocol.mqtt import MqttClient

from .models import Device, Enrollment, EnrollmentToken
from .registry import CommandRegistry
from .security import issue_device_credentials
from .selectors import Attributes, check_labels, matches, parse_selector
from .store import Store

log = logging.getLogger(__name__)
commands = CommandRegistry()
"""The commands handled here (see :mod:`.registry`)."""


class EnrollmentHandlers:
    """Tokens and the waiting room; mixed into the Controller (see the module docstring)."""

    store: Store
    table: CredentialTable | None
    client: MqttClient | None
    clock: Callable[[], float]

    # --- the broker's snapshot ---

    def sync_tokens(self) -> None:
        """Mirror the stored tokens into the broker's table (after a committed change)."""
        if self.table is None:
            return
        self.table.set_tokens(
            {
                t.token_hash: TokenGrant(t.id, t.expires, t.uses_left(), frozenset(t.devices))
                for t in self.store.list_tokens()
            }
        )

    # --- tokens ---

    @commands.command(TokensCreate)
    def _tokens_create(self, cmd: TokensCreate) -> Any:
        if cmd.group is not None and self.store.get_group(cmd.group) is None:
            raise StoreError(f"unknown group {cmd.group!r} (create it first: tether groups create)")
        check_labels(cmd.labels)
        token_id = secrets.token_hex(4)
        token = f"{TOKEN_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
        now = self.clock()
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
        with self.store.transaction():
            self.store.put_token(record)
        if self.table is not None:
            self.table.new_secret(f"{TOKEN_USER_PREFIX}{token_id}", token)
        self.sync_tokens()
        log.info("enrollment token %s created", token_id)
        return {"token": token, **self._token_view(record)}

    def _token_view(self, t: EnrollmentToken) -> dict[str, Any]:
        return {
            "id": t.id,
            "group": t.group,
            "labels": t.labels,
            "auto_approve": t.auto_approve,
            "expires": t.expires,
            "expired": t.expires is not None and self.clock() >= t.expires,
            "uses": t.uses,
            "used": len(t.devices),
            "devices": list(t.devices),
            "created": t.created,
        }

    @commands.command(TokensList, read_only=True)
    def _tokens_ls(self, cmd: TokensList) -> Any:
        return {"tokens": [self._token_view(t) for t in self.store.list_tokens()]}

    @commands.command(TokensRemove)
    def _tokens_rm(self, cmd: TokensRemove) -> Any:
        for token_id in cmd.ids:
            problem = names.TOKEN_ID.problem(token_id)
            if problem is not None:
                raise StoreError(problem)
            if self.store.get_token(token_id) is None:
                raise StoreError(f"unknown token {token_id!r}")
        with self.store.transaction():
            for token_id in cmd.ids:
                self.store.delete_token(token_id)
        self.sync_tokens()
        log.info("enrollment token(s) %s removed", ", ".join(cmd.ids))
        return {"removed": list(cmd.ids)}

    # --- requests from enrolling devices ---

    def _enroll_error(self, device_id: str, message: str) -> None:
        """One clear log line; kept on the waiting-room entry when there is one. Nothing else changes."""
        log.warning("enrollment of %s refused: %s", device_id, message)
        entry = self.store.get_enrollment(device_id)
        if entry is not None and entry.last_error != message:
            with self.store.transaction():
                self.store.put_enrollment(entry.model_copy(update={"last_error": message}))

    def _on_enroll_request(self, device_id: str, payload: bytes) -> None:
        try:
            request = codec.decode(payload, EnrollmentRequest)
            decode_public_key(request.public_key)
        except PayloadError as exc:
            self._enroll_error(device_id, f"malformed request: {exc}")
            return
        if request.device_id != device_id:
            self._enroll_error(device_id, f"request names device {request.device_id!r}, topic {device_id!r}")
            return
        token = next((t for t in self.store.list_tokens() if t.token_hash == hash_token(request.token)), None)
        now = self.clock()
        if token is None:
            self._enroll_error(device_id, "unknown or removed enrollment token")
            return
        if token.expires is not None and now >= token.expires:
            self._enroll_error(device_id, f"enrollment token {token.id} has expired")
            return
        if device_id not in token.devices and token.uses is not None and len(token.devices) >= token.uses:
            self._enroll_error(device_id, f"enrollment token {token.id} is used up ({token.uses} uses)")
            return
        entry = self.store.get_enrollment(device_id)
        if entry is not None:
            self._known_request(entry, request)
            return
        if self.store.get_credential(device_id) is not None:
            self._enroll_error(device_id, "a device with this id already has credentials")
            return
        try:
            topics.check_device_id(device_id)
            if device_id.startswith(("cli-", "controller-", "enroll-")):
                raise StoreError(f"device id {device_id!r} is reserved")
        except (StoreError, TopicError) as exc:
            self._enroll_error(device_id, str(exc))
            return
        entry = Enrollment(
            device_id=device_id,
            token_id=token.id,
            public_key=request.public_key,
            facts=request.facts,
            requested=now,
        )
        with self.store.transaction():
            self.store.put_enrollment(entry)
            self.store.put_token(token.model_copy(update={"devices": (*token.devices, device_id)}))
        self.sync_tokens()
        log.info("device %s is waiting for approval (token %s)", device_id, token.id)
        if token.auto_approve:
            self._approve([entry])

    def _known_request(self, entry: Enrollment, request: EnrollmentRequest) -> None:
        """A device already in (or through) the waiting room asked again."""
        if request.public_key != entry.public_key:
            self._enroll_error(entry.device_id, "asked again with another public key (ignored)")
            return
        if entry.state == "rejected":
            log.info("rejected device %s asked again; ignored", entry.device_id)
            return
        if entry.state == "approved":
            if entry.cleared:
                self._enroll_error(entry.device_id, "already enrolled (tether devices rm it to enroll again)")
            else:
                self._publish_answer(entry)  # it may have missed it
            return
        log.debug("device %s still pending", entry.device_id)

    # --- the waiting room ---

    def _entry_view(self, e: Enrollment) -> dict[str, Any]:
        token = self.store.get_token(e.token_id)
        return {
            "id": e.device_id,
            "state": e.state,
            "token": e.token_id,
            "group": token.group if token else None,
            "labels": dict(self._entry_attributes(e, token)),
            "hostname": e.facts.hostname,
            "arch": e.facts.arch,
            "requested": e.requested,
            "decided": e.decided,
            "error": e.last_error,
        }

    def _entry_attributes(self, e: Enrollment, token: EnrollmentToken | None) -> Attributes:
        """What ``approve --all --select`` matches: what the device reports, under its token's labels."""
        device = Device(id=e.device_id, facts=e.facts, pinned_labels=token.labels if token else {})
        return device.attributes()

    @commands.command(DevicesPending, read_only=True)
    def _devices_pending(self, cmd: DevicesPending) -> Any:
        rows = [self._entry_view(e) for e in self.store.list_enrollments() if e.state != "approved"]
        return {"devices": rows}

    @commands.command(DevicesApprove)
    def _devices_approve(self, cmd: DevicesApprove) -> Any:
        check_labels(cmd.labels)
        if bool(cmd.device_ids) == cmd.all:
            raise StoreError("name devices to approve, or --all (not both)")
        if cmd.selector and not cmd.all:
            raise StoreError("--select goes with --all")
        if cmd.all:
            selector = parse_selector(cmd.selector) if cmd.selector else ()
            entries = [
                e
                for e in self.store.list_enrollments()
                if e.state == "pending"
                and matches(selector, self._entry_attributes(e, self.store.get_token(e.token_id)))
            ]
        else:
            entries = []
            for device_id in cmd.device_ids:
                entry = self.store.get_enrollment(device_id)
                if entry is None:
                    raise StoreError(f"{device_id!r} is not in the waiting room")
                if entry.state == "approved":
                    raise StoreError(f"{device_id!r} is already approved")
                entries.append(entry)
        self._approve(entries, cmd.labels)
        return {"approved": [e.device_id for e in entries]}

    @commands.command(DevicesReject)
    def _devices_reject(self, cmd: DevicesReject) -> Any:
        entries = []
        for device_id in cmd.device_ids:
            entry = self.store.get_enrollment(device_id)
            if entry is None or entry.state != "pending":
                raise StoreError(f"{device_id!r} is not pending")
            entries.append(entry)
        now = self.clock()
        rejected = []
        with self.store.transaction():
            for entry in entries:
                grant = EnrollmentGrant(
                    device_id=entry.device_id, status="rejected", message="rejected by an operator"
                )
                updated = entry.model_copy(
                    update={
                        "state": "rejected",
                        "decided": now,
                        "sealed": seal_grant(entry.public_key, grant),
                    }
                )
                self.store.put_enrollment(updated)
                rejected.append(updated)
        for entry in rejected:
            log.warning("device %s rejected", entry.device_id)
            self._publish_answer(entry)
        return {"rejected": [e.device_id for e in rejected]}

    def _approve(self, entries: list[Enrollment], labels: dict[str, str] | None = None) -> None:
        """Give each device its credentials, labels and group; publish them sealed.

        The token's labels and ``labels`` (given at approval, winning) are pinned: trusted,
        so selector groups match them (docs/security.md, "Labels and groups")."""
        now = self.clock()
        approved = []
        with self.store.transaction():
            for entry in entries:
                token = self.store.get_token(entry.token_id)
                password = issue_device_credentials(self.store, entry.device_id, now)
                if self.table is not None:
                    self.table.new_secret(entry.device_id, password)
                device = self.store.get_device(entry.device_id) or Device(id=entry.device_id)
                pinned = {**(token.labels if token else {}), **(labels or {})}
                self.store.put_device(
                    device.model_copy(update={"pinned_labels": pinned, "facts": device.facts or entry.facts})
                )
                if token is not None and token.group:
                    self._join_group(entry.device_id, token.group)
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
                self.store.put_enrollment(updated)
                approved.append(updated)
        if not approved:
            return
        self._sync_table()  # type: ignore[attr-defined]  # security.py
        self.sync()  # type: ignore[attr-defined]  # service.py: their desired state, before they connect
        for entry in approved:
            log.info("device %s approved", entry.device_id)
            self._publish_answer(entry)

    def _join_group(self, device_id: str, name: str) -> None:
        group = self.store.get_group(name)
        if group is None:
            log.warning("device %s: the token's group %r no longer exists", device_id, name)
            return
        if group.selector is not None:
            return  # a selector group: the token's (pinned) labels are what makes it match
        if device_id not in group.devices:
            self.store.delete_group(name)
            self.store.create_group(
                group.model_copy(update={"devices": tuple(sorted({*group.devices, device_id}))})
            )

    # --- the answers on the broker ---

    def _publish_answer(self, entry: Enrollment) -> bool:
        client = self.client
        if client is None or entry.sealed is None:
            return False
        message = EnrollmentResponse(device_id=entry.device_id, sealed=entry.sealed)
        return client.publish_confirmed(
            topics.enroll_response(entry.device_id), codec.encode(message), qos=1, retain=True
        )

    def publish_enrollment_answers(self) -> None:
        """After (re)connecting: answers the broker may have lost (a fresh embedded broker)."""
        for entry in self.store.list_enrollments():
            if entry.sealed is not None and not entry.cleared:
                self._publish_answer(entry)

    def enrollment_seen(self, device_id: str) -> None:
        """The device came online with its own credentials: clear its retained answer."""
        entry = self.store.get_enrollment(device_id)
        if entry is None or entry.state != "approved" or entry.cleared or self.client is None:
            return
        if self.client.publish_confirmed(topics.enroll_response(device_id), b"", qos=1, retain=True):
            with self.store.transaction():
                self.store.put_enrollment(entry.model_copy(update={"cleared": True, "sealed": None}))
            log.info("device %s enrolled and online", device_id)
