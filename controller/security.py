"""Who may connect: broker credentials, revocation and forgetting devices (issue 5).

The store holds credentials (password hashes only, never a password); the controller
mirrors them into a :class:`~tether.protocol.credentials.CredentialTable`, which the
embedded broker authenticates against (in its own process, a copy kept up to date by
:class:`tether.broker.BrokerTable`). Every change here writes the
store first, then updates the table, then (for a revocation) asks the broker to close
the live connections, through :attr:`SecurityHandlers.disconnect_users` (set by
``tether up`` when it runs the embedded broker; a no-op with an external broker, whose
password file must be regenerated: see ``tether mosquitto-config``).

:class:`SecurityHandlers` is mixed into :class:`~.service.Controller` like
the other handler mixins: its methods run on the controller's worker thread.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tether.protocol import codec, names, topics
from tether.protocol.acl import RESERVED_DEVICE_PREFIXES
from tether.protocol.commands import DevicesCredentials, DevicesRemove, DevicesRevoke
from tether.protocol.credentials import Credential, CredentialTable, TokenGrant, hash_password, new_password
from tether.protocol.errors import StoreError
from tether.protocol.models import Presence
from tether.protocol.secret_files import write_secret_json
from tether.protocol.topics import DeviceTopic

from .models import Device
from .registry import CommandRegistry
from .store import Store

log = logging.getLogger(__name__)
commands = CommandRegistry()
"""The commands handled here (see :mod:`.registry`)."""

OPERATOR_USER = "admin"


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
        store.put_credential(
            Credential(OPERATOR_USER, "operator", OPERATOR_USER, hash_password(password)), now
        )
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
        raise StoreError(f"device id {device_id!r} is reserved (starts with {device_id.split('-')[0]}-)")
    existing = store.get_credential(device_id)
    if existing is not None and existing.role != "device":
        raise StoreError(f"{device_id!r} is the name of a {existing.role} user, not a device")


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


class SecurityHandlers:
    """Credential commands; mixed into the Controller (see the module docstring)."""

    store: Store
    table: CredentialTable | None
    disconnect_users: Callable[[set[str]], int]
    clock: Callable[[], float]

    if TYPE_CHECKING:  # the Controller's own

        def sync(self, device_ids: set[str] | None = None) -> None: ...

    client_cert: tuple[str, str] | None = None
    """Our own client certificate and key files (mTLS: ``tether up --require-client-cert``)."""
    issue_certificate: Callable[[str], tuple[str, str, str]] | None = None
    """Sign a client certificate for a user: (certificate, key, CA) PEMs; set by ``tether up``
    when it holds the quick-start CA."""

    on_credentials_changed: Callable[[], None] | None = None
    """Called after credentials or a device's stacks changed (``tether up --mosquitto-dir``)."""

    def _sync_table(self) -> None:
        """Mirror the store's credentials into the broker's table (after a committed change)."""
        if self.table is not None:
            self.table.replace(self.store.list_credentials())
        if self.on_credentials_changed is not None:
            self.on_credentials_changed()

    def device_credentials(self, device_id: str) -> str:
        """Create or rotate ``device_id``'s credentials; return the new password (shown once)."""
        was = self.store.get_device(device_id)
        password = issue_device_credentials(self.store, device_id, self.clock())
        if self.table is not None:
            self.table.new_secret(device_id, password)
        self._sync_table()
        if was is not None and was.revoked:
            self.sync({device_id})  # matches its groups again
        log.info("device %s: new broker credentials", device_id)
        return password

    @commands.command(DevicesCredentials)
    def _devices_credentials(self, cmd: DevicesCredentials) -> Any:
        if cmd.certificate:
            return self._device_certificate(cmd.device_id)
        password = self.device_credentials(cmd.device_id)
        return {"device_id": cmd.device_id, "username": cmd.device_id, "password": password}

    def _device_certificate(self, device_id: str) -> dict[str, Any]:
        """A new client certificate and key for ``device_id`` (its common name), shown once."""
        if self.issue_certificate is None:
            raise StoreError(
                "this controller does not sign client certificates (start it with `tether up --tls "
                "--require-client-cert`); with your own CA, sign one with common name "
                f"{device_id!r} and register the device with `tether devices credentials {device_id}`"
            )
        was = self.store.get_device(device_id)
        admit_certificate_user(self.store, device_id, self.clock())
        certificate, key, ca = self.issue_certificate(device_id)
        self._sync_table()
        if was is not None and was.revoked:
            self.sync({device_id})  # matches its groups again
        log.info("device %s: new client certificate", device_id)
        return {
            "device_id": device_id,
            "username": device_id,
            "certificate": certificate,
            "key": key,
            "ca": ca,
        }

    @commands.command(DevicesRevoke)
    def _devices_revoke(self, cmd: DevicesRevoke) -> Any:
        known = {d.id for d in self.store.list_devices()} | {
            c.name for c in self.store.list_credentials() if c.role == "device"
        }
        for device_id in cmd.device_ids:
            if device_id not in known:
                raise StoreError(f"unknown device {device_id!r}")
        usernames: set[str] = set()
        with self.store.transaction():
            for device_id in cmd.device_ids:
                usernames.update(self.store.revoke_device_credentials(device_id))
                device = self.store.get_device(device_id) or Device(id=device_id)
                self.store.put_device(device.model_copy(update={"revoked": True}))
                self._leave_static_groups(device_id)
        self._sync_table()
        closed = self.disconnect_users(usernames) if usernames else 0
        for device_id in cmd.device_ids:
            log.warning("device %s revoked (%d live connection(s) closed)", device_id, closed)
            self._publish_offline(device_id)
        self.sync()
        return {"revoked": list(cmd.device_ids), "closed": closed}

    def _publish_offline(self, device_id: str) -> None:
        """Say a revoked device is offline: the broker no longer publishes its will (a
        revoked identity may publish nothing, its will included)."""
        client = getattr(self, "client", None)
        device = self.store.get_device(device_id)
        if (
            client is None
            or device is None
            or device.status == "offline"
            or not names.DEVICE_ID.ok(device_id)
        ):
            return
        presence = Presence(device_id=device_id, status="offline", session=device.session, at=self.clock())
        client.publish_confirmed(
            topics.device(device_id, DeviceTopic.PRESENCE), codec.encode(presence), retain=True
        )

    def _leave_static_groups(self, device_id: str) -> None:
        for group in self.store.list_groups():
            if group.selector is None and device_id in group.devices:
                remaining = tuple(d for d in group.devices if d != device_id)
                self.store.delete_group(group.name)
                self.store.create_group(group.model_copy(update={"devices": remaining}))

    @commands.command(DevicesRemove)
    def _devices_rm(self, cmd: DevicesRemove) -> Any:
        known = {d.id for d in self.store.list_devices()} | {
            c.name for c in self.store.list_credentials() if c.role == "device"
        }
        for device_id in cmd.device_ids:
            if device_id not in known:  # a malformed id stored before it was refused may go
                topics.check_device_id(device_id)
        usernames: set[str] = set()
        with self.store.transaction():
            for device_id in cmd.device_ids:
                usernames.update(self.store.revoke_device_credentials(device_id))
                for username in usernames:
                    self.store.delete_credential(username)
                self._leave_static_groups(device_id)
                self.store.forget_device(device_id)
            self.variables.forget()  # type: ignore[attr-defined]  # its own variables are gone too
        self._sync_table()
        if usernames:
            self.disconnect_users(usernames)
        cleared = self._clear_retained(cmd.device_ids)
        self.sync()
        for device_id in cmd.device_ids:
            log.warning("device %s forgotten", device_id)
        return {"removed": list(cmd.device_ids), "cleared": cleared}

    def _clear_retained(self, device_ids: tuple[str, ...]) -> bool:
        """Clear the devices' retained desired state and presence (empty retained publishes)."""
        client = getattr(self, "client", None)
        if client is None:
            return False
        ok = True
        for device_id in device_ids:
            if not names.DEVICE_ID.ok(device_id):
                continue  # it has no topic: publishing on a malformed one gets us disconnected
            for kind in (DeviceTopic.DESIRED, DeviceTopic.PRESENCE, DeviceTopic.REPORTED):
                ok = client.publish_confirmed(topics.device(device_id, kind), b"", retain=True) and ok
            ok = client.publish_confirmed(topics.enroll_response(device_id), b"", retain=True) and ok
        return ok
