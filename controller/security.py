"""Who may connect: broker credentials, revocation and forgetting devices (issue 5).

The store holds credentials (password hashes only, never a password); the controller
mirrors them into a :class:`~tether.protocol.credentials.CredentialTable`, which the
embedded broker authenticates against (in its own process, a copy kept up to date by
:class:`tether.broker.BrokerTable`). Every change here writes the store first, then
updates the table (:class:`BrokerAccess`, the part of the controller that owns it), then
(for a revocation) asks the broker to close the live connections, through
:attr:`BrokerAccess.disconnect_users` (set by ``tether up`` when it runs the embedded broker;
a no-op with an external broker, whose password file must be regenerated: see
``tether mosquitto-config``).

The ``devices.credentials``, ``devices.revoke`` and ``devices.rm`` handlers are functions
over the :class:`~.context.Context`, registered in :data:`commands`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tether.protocol import codec, names, topics
from tether.protocol.acl import LEGACY_USER, RESERVED_DEVICE_PREFIXES
from tether.protocol.commands import DevicesCredentials, DevicesRemove, DevicesRevoke
from tether.protocol.credentials import Credential, CredentialTable, TokenGrant, hash_password, new_password
from tether.protocol.errors import CommandError, ConflictError, NotFoundError
from tether.protocol.models import Presence
from tether.protocol.results import DeviceCredentials, DevicesRemoved, DevicesRevoked
from tether.protocol.secret_files import write_secret_json
from tether.protocol.topics import DeviceTopic

from .context import Context
from .models import Device, User
from .registry import CommandRegistry, Route
from .store import Store

log = logging.getLogger(__name__)
commands = CommandRegistry(tag="devices")
"""The commands handled here (see :mod:`.registry`)."""

OPERATOR_USER = LEGACY_USER
"""The operator ``tether up`` makes on first start (operator.json): the first admin user."""


def load_table(
    store: Store, allow_anonymous: bool, kind: type[CredentialTable] = CredentialTable
) -> CredentialTable:
    """The broker's view of the store's credentials and of each device's assigned stacks.

    ``kind``: :class:`tether.broker.BrokerTable` for the embedded broker (it forwards updates
    to the broker's process)."""
    table = kind(store.list_credentials(), allow_anonymous=allow_anonymous)
    table.set_tokens(
        {
            t.token_hash: TokenGrant(t.id, t.expires, t.uses_left(), frozenset(t.devices))
            for t in store.list_tokens()
        }
    )
    table.set_stacks({r.device_id: set(r.hashes()) for r in store.list_desired()})
    return table


def ensure_controller_credentials(store: Store, data_dir: Path, now: float) -> tuple[str, str]:
    """This controller's own username and password, kept in ``{data_dir}/controller.json`` (0600)."""
    path = data_dir / "controller.json"
    try:
        saved = json.loads(path.read_text())
        username, password = str(saved["username"]), str(saved["password"])
    except (OSError, ValueError, KeyError, TypeError):
        username, password = f"controller-{os.urandom(4).hex()}", new_password()
    current = store.get_credential(username)
    if current is None or current.revoked or current.role != "controller":
        store.put_credential(Credential(username, "controller", "controller", hash_password(password)), now)
    write_secret_json(path, {"username": username, "password": password})
    return username, password


def ensure_operator_credentials(
    store: Store,
    data_dir: Path,
    broker_url: str,
    now: float,
    ca_file: Path | None = None,
    client_cert: tuple[str, str] | None = None,
) -> Path | None:
    """Create the ``admin`` operator on first start and write ``{data_dir}/operator.json`` (0600).

    With ``ca_file`` (``tether up --tls``) the file names it, and an existing file is brought
    up to date with the broker URL and CA; likewise ``client_cert`` (certificate and key files,
    ``--require-client-cert``) as ``tls_cert``/``tls_key``. Returns the file's path, or None if the operator
    exists but its file is not here (it was created by another controller of the same store).
    """
    path = data_dir / "operator.json"
    extra = {"ca_file": str(ca_file.resolve())} if ca_file is not None else {}
    if client_cert is not None:
        extra.update(
            tls_cert=str(Path(client_cert[0]).resolve()), tls_key=str(Path(client_cert[1]).resolve())
        )
    if store.get_credential(OPERATOR_USER) is None:
        password = new_password()
        with store.transaction():
            store.put_credential(
                Credential(OPERATOR_USER, "operator", OPERATOR_USER, hash_password(password)), now
            )
            if store.get_user(OPERATOR_USER) is None:  # the first admin user (tether users)
                store.put_user(User(name=OPERATOR_USER, role="admin", created=now))
        write_secret_json(
            path, {"username": OPERATOR_USER, "password": password, "broker": broker_url, **extra}
        )
        return path
    if not path.exists():
        return None
    if extra:
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return path  # not ours to repair; the CLI says what is wrong with it
        if isinstance(saved, dict):
            if client_cert is None:  # no longer mTLS: a stale certificate would be refused
                saved = {k: v for k, v in saved.items() if k not in ("tls_cert", "tls_key")}
            write_secret_json(path, {**saved, "broker": broker_url, **extra})
    return path


def _check_new_device_user(store: Store, device_id: str) -> None:
    topics.check_device_id(device_id)
    if device_id.startswith(RESERVED_DEVICE_PREFIXES):
        raise CommandError(f"device id {device_id!r} is reserved (starts with {device_id.split('-')[0]}-)")
    existing = store.get_credential(device_id)
    if existing is not None and existing.role != "device":
        raise ConflictError(f"{device_id!r} is the name of a {existing.role} user, not a device")


def issue_device_credentials(store: Store, device_id: str, now: float) -> str:
    """Create or rotate ``device_id``'s credentials in ``store``; return the new password."""
    _check_new_device_user(store, device_id)
    password = new_password()
    with store.transaction():
        store.put_credential(Credential(device_id, "device", device_id, hash_password(password)), now)
        device = store.get_device(device_id)
        if device is not None and device.revoked:
            store.put_device(device.model_copy(update={"revoked": False}))
    return password


def admit_certificate_user(store: Store, device_id: str, now: float) -> None:
    """Make ``device_id`` a known, unrevoked broker user for a client certificate (mTLS).

    An existing password is kept (a revoked one works again); a new user gets a random
    password nobody is told, so only its certificate lets it in.
    """
    _check_new_device_user(store, device_id)
    existing = store.get_credential(device_id)
    with store.transaction():
        if existing is None or existing.revoked:
            password_hash = existing.password_hash if existing else hash_password(new_password())
            store.put_credential(Credential(device_id, "device", device_id, password_hash), now)
        device = store.get_device(device_id)
        if device is not None and device.revoked:
            store.put_device(device.model_copy(update={"revoked": False}))


@dataclass
class BrokerAccess:
    """The broker's view of who may connect, owned by the controller: the credential table
    (None with an external broker that has none of ours) and what ``tether up`` plugs in."""

    table: CredentialTable | None = None
    disconnect_users: Callable[[set[str]], int] = lambda usernames: 0
    """Close the live connections of these users; how many were closed."""
    client_cert: tuple[str, str] | None = None
    """Our own client certificate and key files (mTLS: ``tether up --require-client-cert``)."""
    issue_certificate: Callable[[str], tuple[str, str, str]] | None = None
    """Sign a client certificate for a user: (certificate, key, CA) PEMs; set by ``tether up``
    when it holds the quick-start CA."""
    on_credentials_changed: Callable[[], None] | None = None
    """Called after credentials or a device's stacks changed (``tether up --mosquitto-dir``)."""

    def sync(self, store: Store) -> None:
        """Mirror the store's credentials into the broker's table (after a committed change)."""
        if self.table is not None:
            self.table.replace(store.list_credentials())
        if self.on_credentials_changed is not None:
            self.on_credentials_changed()

    def sync_tokens(self, store: Store) -> None:
        """Mirror the stored enrollment tokens into the broker's table (after a committed change)."""
        if self.table is not None:
            self.table.set_tokens(
                {
                    t.token_hash: TokenGrant(t.id, t.expires, t.uses_left(), frozenset(t.devices))
                    for t in store.list_tokens()
                }
            )

    def new_secret(self, username: str, secret: str) -> None:
        """Tell the table a new password or token (it keeps a fast check of it)."""
        if self.table is not None:
            self.table.new_secret(username, secret)


def device_credentials(ctx: Context, device_id: str) -> str:
    """Create or rotate ``device_id``'s credentials; return the new password (shown once)."""
    was = ctx.store.get_device(device_id)
    password = issue_device_credentials(ctx.store, device_id, ctx.clock())
    ctx.access.new_secret(device_id, password)
    ctx.access.sync(ctx.store)
    if was is not None and was.revoked:
        ctx.sync({device_id})  # matches its groups again
    log.info("device %s: new broker credentials", device_id)
    return password


@commands.command(
    DevicesCredentials,
    role="admin",
    http=Route(
        "POST",
        "/devices/{device_id}/credentials",
        "Create or rotate a device's broker credentials (shown once)",
    ),
)
def devices_credentials(ctx: Context, cmd: DevicesCredentials) -> DeviceCredentials:
    if cmd.certificate:
        return _device_certificate(ctx, cmd.device_id)
    password = device_credentials(ctx, cmd.device_id)
    return DeviceCredentials(device_id=cmd.device_id, username=cmd.device_id, password=password)


def _device_certificate(ctx: Context, device_id: str) -> DeviceCredentials:
    """A new client certificate and key for ``device_id`` (its common name), shown once."""
    issue = ctx.access.issue_certificate
    if issue is None:
        raise ConflictError(
            "this controller does not sign client certificates (start it with `tether up --tls "
            "--require-client-cert`); with your own CA, sign one with common name "
            f"{device_id!r} and register the device with `tether devices credentials {device_id}`"
        )
    was = ctx.store.get_device(device_id)
    admit_certificate_user(ctx.store, device_id, ctx.clock())
    certificate, key, ca = issue(device_id)
    ctx.access.sync(ctx.store)
    if was is not None and was.revoked:
        ctx.sync({device_id})  # matches its groups again
    log.info("device %s: new client certificate", device_id)
    return DeviceCredentials(device_id=device_id, username=device_id, certificate=certificate, key=key, ca=ca)


def _known_devices(store: Store) -> set[str]:
    """Devices heard from, and devices with credentials that never connected."""
    return {d.id for d in store.list_devices()} | {
        c.name for c in store.list_credentials() if c.role == "device"
    }


@commands.command(DevicesRevoke, role="admin", http=Route("POST", "/devices/revoke", "Cut devices off"))
def devices_revoke(ctx: Context, cmd: DevicesRevoke) -> DevicesRevoked:
    known = _known_devices(ctx.store)
    unknown = [d for d in cmd.device_ids if d not in known]
    if unknown:
        raise NotFoundError(", ".join(f"unknown device {d!r}" for d in unknown))
    usernames: set[str] = set()
    with ctx.store.transaction():
        for device_id in cmd.device_ids:
            usernames.update(ctx.store.revoke_device_credentials(device_id))
            device = ctx.store.get_device(device_id) or Device(id=device_id)
            ctx.store.put_device(device.model_copy(update={"revoked": True}))
            _leave_static_groups(ctx.store, device_id)
    ctx.access.sync(ctx.store)
    closed = ctx.access.disconnect_users(usernames) if usernames else 0
    for device_id in cmd.device_ids:
        log.warning("device %s revoked (%d live connection(s) closed)", device_id, closed)
        _publish_offline(ctx, device_id)
    ctx.sync()
    return DevicesRevoked(revoked=list(cmd.device_ids), closed=closed)


def _publish_offline(ctx: Context, device_id: str) -> None:
    """Say a revoked device is offline: the broker no longer publishes its will (a
    revoked identity may publish nothing, its will included)."""
    device = ctx.store.get_device(device_id)
    if device is None or device.status == "offline" or not names.DEVICE_ID.ok(device_id):
        return
    presence = Presence(device_id=device_id, status="offline", session=device.session, at=ctx.clock())
    ctx.publisher.publish_retained(topics.device(device_id, DeviceTopic.PRESENCE), codec.encode(presence))


def _leave_static_groups(store: Store, device_id: str) -> None:
    for group in store.list_groups():
        if group.selector is None and device_id in group.devices:
            remaining = tuple(d for d in group.devices if d != device_id)
            store.delete_group(group.name)
            store.create_group(group.model_copy(update={"devices": remaining}))


@commands.command(
    DevicesRemove,
    http=Route("DELETE", "/devices/{device_id}", "Forget a device", lists={"device_id": "device_ids"}),
)
def devices_rm(ctx: Context, cmd: DevicesRemove) -> DevicesRemoved:
    known = _known_devices(ctx.store)
    for device_id in cmd.device_ids:
        if device_id not in known:  # a malformed id stored before it was refused may go
            topics.check_device_id(device_id)
    usernames: set[str] = set()
    with ctx.store.transaction():
        for device_id in cmd.device_ids:
            usernames.update(ctx.store.revoke_device_credentials(device_id))
            for username in usernames:
                ctx.store.delete_credential(username)
            _leave_static_groups(ctx.store, device_id)
            ctx.store.forget_device(device_id)
        ctx.variables.forget()  # its own variables are gone too
    ctx.access.sync(ctx.store)
    if usernames:
        ctx.access.disconnect_users(usernames)
    cleared = _clear_retained(ctx, cmd.device_ids)
    ctx.sync()
    for device_id in cmd.device_ids:
        ctx.device_metrics.pop(device_id, None)  # a device enrolled again under the id starts afresh
        ctx.device_history.forget(device_id)
        log.warning("device %s forgotten", device_id)
    return DevicesRemoved(removed=list(cmd.device_ids), cleared=cleared)


def _clear_retained(ctx: Context, device_ids: tuple[str, ...]) -> bool:
    """Clear the devices' retained desired state and presence (empty retained publishes)."""
    ok = True
    for device_id in device_ids:
        if not names.DEVICE_ID.ok(device_id):
            continue  # it has no topic: publishing on a malformed one gets us disconnected
        for kind in (DeviceTopic.DESIRED, DeviceTopic.PRESENCE, DeviceTopic.REPORTED):
            ok = ctx.publisher.publish_retained(topics.device(device_id, kind), b"") and ok
        ok = ctx.publisher.publish_retained(topics.enroll_response(device_id), b"") and ok
    return ok
