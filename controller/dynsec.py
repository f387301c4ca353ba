"""Mosquitto's dynamic security plugin, kept in step with the store (issue 13).

With Mosquitto 2.0 (``mosquitto_dynamic_security.so``, shipped in Debian's package) clients,
roles and ACLs change at run time through JSON commands published on
``$CONTROL/dynamic-security/v1``, and a client that is deleted is disconnected at once. So
Mosquitto can do what the embedded broker does: enrollment with a fleet token, approval,
revocation that cuts the live session within a second, and the full ACL of
:mod:`tether.protocol.acl`, with no reload and no extra daemon.

How the pieces fit:

* :func:`seed_config` (pure) is the plugin's JSON file, written by ``tether mosquitto-config``
  while Mosquitto is stopped: every unrevoked user of the store with its **stored hash** (the
  plugin uses the same PBKDF2-SHA512 hashes, 12-byte salts, as Mosquitto's ``$7$`` password
  files), so existing devices keep their passwords and nothing is rotated; the controller's
  own user is in it, with the right to send dynamic-security commands.
* :class:`DynsecTable` is the controller's :class:`CredentialTable` when it runs against such
  a Mosquitto (``tether up --mosquitto-dir DIR`` where ``DIR/dynamic-security.json`` exists).
  Every change is applied to the table, then sent to Mosquitto, and returns once Mosquitto
  answered (like the embedded broker's ``BrokerTable``): new credentials are created with the
  password the controller just made (it has it then, and only then: :meth:`new_secret`), a
  revoked or removed device's client is deleted (and so disconnected), a device's stack
  definitions are added to its role before its desired state is published, a fleet token
  becomes a client ``enroll-{token id}`` whose password is the token, deleted when the token
  is removed or expires.
* :meth:`DynsecTable.sync` runs after every connection of the controller's admin session: it
  compares Mosquitto's clients and roles (those whose text name is ``tether``; others are
  left alone) with the store, and mends every difference it can. A user the store has and
  Mosquitto lacks can only be created without a password (the store keeps hashes only): it
  is, so certificate logins work, and it is logged: give the device new credentials, or
  write the seed again (``tether mosquitto-config`` with Mosquitto stopped).

Client ids are bound to users: a device's client must connect as ``tether-{device id}``
(``clientid`` of its client), so it can neither take another device's session over nor the
controller's. Users without a bound client id (the operator, the controller, enrolling
devices, which share their token's client) can still connect with any client id; they gain
no rights from it (delivery is checked against the ACL of the receiving user).
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from tether.protocol import names
from tether.protocol.acl import DEVICE_READS, DEVICE_WRITES, LEGACY_USER, USER_ROLES, WATCHABLE
from tether.protocol.credentials import TOKEN_USER_PREFIX, Credential, CredentialTable, TokenGrant
from tether.protocol.errors import StoreError
from tether.protocol.topics import ROOT
from tether.protocol.transport import Transport

log = logging.getLogger(__name__)

__all__ = [
    "CONTROL",
    "DynsecAdmin",
    "DynsecTable",
    "client_entry",
    "role_acls",
    "seed_config",
]

CONTROL = "$CONTROL/dynamic-security/v1"
RESPONSES = f"{CONTROL}/response"
TEXT = "tether"
"""The text name of every client and role Tether manages; others in the file are left alone."""
CONTROLLER_ROLE = "tether-controller"
OPERATOR_ROLE = "tether-operator"
VIEWER_ROLE = "tether-viewer"
USER_ROLE_PREFIX = "tether-user-"
"""A user's own role: its request topic (``controller/requests/{user}``), which no one else may use."""
ENROLLING_ROLE = "tether-enrolling"
SHARED_ROLES = (CONTROLLER_ROLE, OPERATOR_ROLE, VIEWER_ROLE, ENROLLING_ROLE)
DEVICE_ROLE_PREFIX = "tether-device-"
BATCH = 100
"""Commands per message (a fleet's sync is many)."""

Acl = tuple[str, str]
"""(acltype, topic): every ACL Tether writes allows."""


def _send(topic: str) -> set[Acl]:
    return {("publishClientSend", topic)}


def _read(topic: str, literal: bool = False) -> set[Acl]:
    kind = "subscribeLiteral" if literal else "subscribePattern"
    return {(kind, topic), ("publishClientReceive", topic)}


def device_role(device_id: str) -> str:
    return f"{DEVICE_ROLE_PREFIX}{device_id}"


def user_role(username: str) -> str:
    return f"{USER_ROLE_PREFIX}{username}"


def own_role(c: Credential) -> str | None:
    """The role of ``c`` alone (a device's topics, a user's request topic), or None."""
    if c.role == "device":
        return device_role(c.name)
    if c.role in USER_ROLES:
        return user_role(c.username)
    return None


def role_acls(role: str, hashes: Collection[str] = ()) -> set[Acl]:
    """The ACLs of one of Tether's roles: the rules of :mod:`tether.protocol.acl` (pure).

    A device's role (``tether-device-{id}``) has exact topics only (``subscribeLiteral``), its
    assigned stack definitions included: no wildcard can reach another device."""
    if role == CONTROLLER_ROLE:
        return (
            _send(f"{ROOT}/#")
            | _read(f"{ROOT}/#")
            | {("subscribePattern", f"$share/+/{ROOT}/#")}
            | _send(f"{CONTROL}")
            | _read(f"{CONTROL}/#")
        )
    if role in (OPERATOR_ROLE, VIEWER_ROLE):  # replies: Mosquitto 2.0's plugin has no %c, so every client's
        acls = _send(f"{ROOT}/devices/+/requests") if role == OPERATOR_ROLE else set()
        acls |= _read(f"{ROOT}/clients/+/replies")
        for kind in WATCHABLE:
            acls |= _read(f"{ROOT}/devices/+/{kind}")
        return acls
    if role.startswith(USER_ROLE_PREFIX):
        username = role[len(USER_ROLE_PREFIX) :]
        acls = _send(f"{ROOT}/controller/requests/{username}")
        if username == LEGACY_USER:  # older CLIs (the controller runs them as admin)
            acls |= _send(f"{ROOT}/controller/requests")
        return acls
    if role == ENROLLING_ROLE:  # shared by every device enrolling with one token (answers are sealed)
        return _send(f"{ROOT}/enroll/+/request") | _read(f"{ROOT}/enroll/+/response")
    if role.startswith(DEVICE_ROLE_PREFIX):
        device_id = role[len(DEVICE_ROLE_PREFIX) :]
        acls = {a for kind in DEVICE_READS for a in _read(f"{ROOT}/devices/{device_id}/{kind}", True)}
        acls |= {a for kind in DEVICE_WRITES for a in _send(f"{ROOT}/devices/{device_id}/{kind}")}
        acls |= _send(f"{ROOT}/clients/+/replies")
        for h in hashes:
            if names.SPEC_HASH.ok(h):
                acls |= _read(f"{ROOT}/stacks/{h}", True)
        return acls
    raise ValueError(f"not one of Tether's roles: {role!r}")


def _acl_json(acls: Iterable[Acl]) -> list[dict[str, Any]]:
    return [{"acltype": kind, "topic": topic, "allow": True} for kind, topic in sorted(acls)]


def usable(c: Credential) -> bool:
    """Whether ``c`` belongs in Mosquitto: unrevoked, not enrolling, names safe to send."""
    if c.revoked or c.role == "enrolling" or not names.USERNAME.ok(c.username):
        return False
    return c.role != "device" or names.DEVICE_ID.ok(c.name)


def client_roles(c: Credential) -> list[str]:
    if c.role == "controller":
        return [CONTROLLER_ROLE]
    if c.role == "operator":
        return [OPERATOR_ROLE, user_role(c.username)]
    if c.role == "viewer":
        return [VIEWER_ROLE, user_role(c.username)]
    return [device_role(c.name)]


def client_entry(c: Credential) -> dict[str, Any]:
    """A client as the plugin keeps it (without its password): text name, roles, and for a
    device the one client id it may use."""
    entry: dict[str, Any] = {
        "username": c.username,
        "textname": TEXT,
        "roles": [{"rolename": r} for r in client_roles(c)],
    }
    if c.role == "device":
        entry["clientid"] = f"tether-{c.name}"
    return entry


def _hash_fields(password_hash: str) -> dict[str, Any] | None:
    """A ``$7$`` hash as the plugin's ``password``, ``salt`` and ``iterations``."""
    parts = password_hash.split("$")
    if len(parts) != 5 or parts[1] != "7" or not parts[2].isdigit():
        return None
    return {"password": parts[4], "salt": parts[3], "iterations": int(parts[2])}


DEFAULT_ACCESS = {"publishClientSend": False, "publishClientReceive": False, "subscribe": False}
"""Nothing that is not allowed by a role; unsubscribing is always allowed."""


def seed_config(credentials: Collection[Credential], stacks: Mapping[str, Collection[str]]) -> dict[str, Any]:
    """The plugin's configuration file for the store's users (Mosquitto loads it at start)."""
    clients = []
    roles = [{"rolename": r, "textname": TEXT, "acls": _acl_json(role_acls(r))} for r in SHARED_ROLES]
    for c in sorted(credentials, key=lambda c: c.username):
        if not usable(c):
            continue
        entry = client_entry(c)
        fields = _hash_fields(c.password_hash)
        if fields is not None:
            entry.update(fields)
        clients.append(entry)
        own = own_role(c)
        if own is not None:
            acls = role_acls(own, stacks.get(c.name, ()))
            roles.append({"rolename": own, "textname": TEXT, "acls": _acl_json(acls)})
    return {
        "defaultACLAccess": {**DEFAULT_ACCESS, "unsubscribe": True},
        "clients": clients,
        "groups": [],
        "roles": roles,
    }


class DynsecAdmin:
    """The controller's own session for dynamic-security commands: send, wait for the answer.

    A separate connection (same user as the controller), so answers are read on the paho
    thread while the worker waits; each command carries a correlation id of its own."""

    def __init__(self, client: Transport) -> None:
        self.client = client
        self._prefix = uuid.uuid4().hex[:12]
        self._seq = 0
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[threading.Event, list[Any]]] = {}
        client.on_message = self._on_message
        client.subscribe(RESPONSES)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic != RESPONSES:
            return
        try:
            responses = json.loads(payload)["responses"]
        except (ValueError, KeyError, TypeError):
            return
        for response in responses if isinstance(responses, list) else ():
            key = response.get("correlationData") if isinstance(response, dict) else None
            waiter = self._waiting.get(key) if isinstance(key, str) else None
            if waiter is not None:
                waiter[1].append(response)
                waiter[0].set()

    def request(self, commands: list[dict[str, Any]], timeout: float = 15.0) -> list[dict[str, Any]]:
        """Send ``commands`` (in batches); their responses, in order. :class:`StoreError` if
        Mosquitto does not answer them all within ``timeout``."""
        out: list[dict[str, Any]] = []
        for start in range(0, len(commands), BATCH):
            batch = commands[start : start + BATCH]
            keys = []
            with self._lock:
                for _ in batch:
                    self._seq += 1
                    keys.append(f"{self._prefix}-{self._seq}")
            waiters = {k: (threading.Event(), []) for k in keys}  # type: ignore[var-annotated]
            self._waiting.update(waiters)
            try:
                message = {
                    "commands": [{**c, "correlationData": k} for c, k in zip(batch, keys, strict=True)]
                }
                if not self.client.publish_confirmed(CONTROL, json.dumps(message).encode(), qos=1):
                    raise StoreError("Mosquitto's dynamic security: not connected to the broker")
                for key in keys:
                    event, slot = waiters[key]
                    if not event.wait(timeout):
                        raise StoreError(
                            "Mosquitto's dynamic security did not answer (is the plugin loaded, "
                            "and may this controller's user send it commands?)"
                        )
                    out.append(slot[0])
            finally:
                for key in keys:
                    self._waiting.pop(key, None)
        return out


def _check(
    responses: list[dict[str, Any]], commands: list[dict[str, Any]], benign: Collection[str] = ()
) -> None:
    errors = [
        f"{c['command']} {c.get('username') or c.get('rolename') or ''}: {r['error']}"
        for c, r in zip(commands, responses, strict=True)
        if r.get("error") and r["error"] not in benign
    ]
    if errors:
        raise StoreError(f"Mosquitto's dynamic security refused: {'; '.join(errors)}")


class DynsecTable(CredentialTable):
    """The controller's table with Mosquitto's dynamic security behind it (module docstring).

    Until :meth:`attach` it is a plain table (``tether up`` fills it before it connects);
    then every update is sent to Mosquitto and waited for, and :meth:`sync` mends the rest."""

    def __init__(self, credentials: Iterable[Credential] = (), *, allow_anonymous: bool = False) -> None:
        super().__init__(credentials, allow_anonymous=allow_anonymous)
        self.admin: DynsecAdmin | None = None
        self._secrets: dict[str, str] = {}
        self._order = threading.RLock()
        self._token_users: dict[str, float | None] = {}  # enroll-{id} -> expiry, as in Mosquitto

    def attach(self, admin: DynsecAdmin) -> None:
        self.admin = admin

    def new_secret(self, username: str, secret: str) -> None:
        self._secrets[username] = secret

    def _send(self, commands: list[dict[str, Any]], benign: Collection[str] = ()) -> None:
        if self.admin is None or not commands:
            return  # before the admin session: sync() sends the whole state
        _check(self.admin.request(commands), commands, benign)

    def _create(self, c: Credential) -> list[dict[str, Any]]:
        """Commands making ``c``'s client (and for a device its role), with its new password if known."""
        commands: list[dict[str, Any]] = []
        own = own_role(c)
        if own is not None:
            acls = role_acls(own, self.stacks_of(c.name) if c.role == "device" else ())
            commands.append(
                {
                    "command": "createRole",
                    "rolename": own,
                    "textname": TEXT,
                    "acls": _acl_json(acls),
                }
            )
        entry = {"command": "createClient", **client_entry(c)}
        password = self._secrets.pop(c.username, None)
        if password is not None:
            entry["password"] = password
        else:
            log.error(
                "Mosquitto: user %s created without a password (the store keeps hashes only): it can log "
                "in with a client certificate only; give it new credentials (tether devices credentials)",
                c.username,
            )
        commands.append(entry)
        return commands

    def _delete(self, c: Credential) -> list[dict[str, Any]]:
        commands: list[dict[str, Any]] = [{"command": "deleteClient", "username": c.username}]
        own = own_role(c)
        if own is not None:
            commands.append({"command": "deleteRole", "rolename": own})
        return commands

    def replace(self, credentials: Iterable[Credential]) -> None:
        with self._order:
            if self.admin is None:  # sync() sends it all (with the secrets kept until then)
                super().replace(credentials)
                return
            before = {u: c for u, c in self._users.items() if usable(c)}
            super().replace(credentials)
            after = {u: c for u, c in self._users.items() if usable(c)}
            commands: list[dict[str, Any]] = []
            for username, c in before.items():
                if username not in after:  # revoked or removed: deleting it disconnects it
                    commands += self._delete(c)
            for username, c in after.items():
                old = before.get(username)
                password = self._secrets.pop(username, None)
                if old is None:
                    if password is not None:
                        self._secrets[username] = password
                    commands += [*self._delete(c), *self._create(c)]  # a stale one goes first
                else:
                    if password is not None:  # rotated
                        commands.append(
                            {"command": "setClientPassword", "username": username, "password": password}
                        )
                    if client_roles(old) != client_roles(c):  # a user's role changed (tether users passwd)
                        roles = client_entry(c)["roles"]
                        commands.append({"command": "modifyClient", "username": username, "roles": roles})
            self._send(commands, benign=("Client not found", "Role not found"))

    def set_stacks(self, assigned: Mapping[str, Collection[str]]) -> None:
        with self._order:
            before = self.all_stacks()
            super().set_stacks(assigned)
            devices = {c.name for c in self._users.values() if c.role == "device" and usable(c)}
            commands: list[dict[str, Any]] = []
            for device_id, hashes in assigned.items():
                if device_id not in devices:
                    continue  # no client, no role: made with these stacks when it gets one
                old = role_acls(device_role(device_id), before.get(device_id, ()))
                new = role_acls(device_role(device_id), hashes)
                role = device_role(device_id)
                commands += [{"command": "addRoleACL", "rolename": role, **a} for a in _acl_json(new - old)]
                commands += [
                    {"command": "removeRoleACL", "rolename": role, "acltype": k, "topic": t}
                    for k, t in sorted(old - new)
                ]
            self._send(commands, benign=("ACL with this topic already exists", "ACL not found"))

    def set_tokens(self, grants: Mapping[str, TokenGrant]) -> None:
        with self._order:
            super().set_tokens(grants)
            if self.admin is None:
                return
            wanted = {f"{TOKEN_USER_PREFIX}{g.id}": g.expires for g in grants.values()}
            commands: list[dict[str, Any]] = []
            for username in set(self._token_users) - set(wanted):
                commands.append({"command": "deleteClient", "username": username})
                del self._token_users[username]
            for username, expires in wanted.items():
                secret = self._secrets.pop(username, None)
                if username in self._token_users or secret is None:
                    continue
                commands.append(
                    {
                        "command": "createClient",
                        "username": username,
                        "password": secret,
                        "textname": TEXT,
                        "roles": [{"rolename": ENROLLING_ROLE}],
                    }
                )
                self._token_users[username] = expires
            self._send(commands, benign=("Client not found",))

    def expire(self, now: float) -> None:
        """Delete the clients of tokens that expired (the embedded broker checks at each connect)."""
        with self._order:
            gone = [u for u, e in self._token_users.items() if e is not None and now >= e]
            for username in gone:
                del self._token_users[username]
            self._send(
                [{"command": "deleteClient", "username": u} for u in gone], benign=("Client not found",)
            )

    def sync(self, now: float) -> None:
        """Mend every difference between Mosquitto and this table (after each admin connect)."""
        admin = self.admin
        if admin is None:
            return
        with self._order:
            listing = [{"command": "listClients", "verbose": True, "count": -1}]
            listing.append({"command": "listRoles", "verbose": True, "count": -1})
            responses = admin.request(listing)
            _check(responses, listing)
            clients = {c["username"]: c for c in responses[0]["data"]["clients"] if c.get("textname") == TEXT}
            roles = {
                r["rolename"]: r for r in responses[1]["data"]["roles"] if r["rolename"].startswith("tether-")
            }
            commands: list[dict[str, Any]] = [
                {
                    "command": "setDefaultACLAccess",
                    "acls": [{"acltype": k, "allow": v} for k, v in DEFAULT_ACCESS.items()],
                }
            ]
            wanted_roles = {r: role_acls(r) for r in SHARED_ROLES}
            users = {u: c for u, c in self._users.items() if usable(c)}
            for c in users.values():
                own = own_role(c)
                if own is not None:
                    wanted_roles[own] = role_acls(own, self.stacks_of(c.name) if c.role == "device" else ())
            for role, acls in wanted_roles.items():
                present = roles.get(role)
                if present is None:
                    commands.append(
                        {"command": "createRole", "rolename": role, "textname": TEXT, "acls": _acl_json(acls)}
                    )
                    continue
                have = {(a["acltype"], a["topic"]) for a in present.get("acls", ()) if a.get("allow")}
                commands += [{"command": "addRoleACL", "rolename": role, **a} for a in _acl_json(acls - have)]
                commands += [
                    {"command": "removeRoleACL", "rolename": role, "acltype": k, "topic": t}
                    for k, t in sorted({(a["acltype"], a["topic"]) for a in present.get("acls", ())} - acls)
                ]
            tokens = {
                f"{TOKEN_USER_PREFIX}{g.id}": g.expires
                for g in self._tokens.values()
                if g.expires is None or now < g.expires
            }
            self._token_users = {u: e for u, e in tokens.items() if u in clients}
            for username in sorted(set(clients) - set(users) - set(self._token_users)):
                commands.append({"command": "deleteClient", "username": username})
            for username in sorted(set(tokens) - set(clients)):
                log.warning(
                    "Mosquitto: enrollment token %s was made before Mosquitto's dynamic security "
                    "knew it (only its hash is stored): make a new token",
                    username[len(TOKEN_USER_PREFIX) :],
                )
            for username, c in users.items():
                present = clients.get(username)
                if present is None:
                    commands += [c2 for c2 in self._create(c) if c2["command"] == "createClient"]
                    continue
                password = self._secrets.pop(username, None)
                if password is not None:  # made while the admin session was away (or at start)
                    commands.append(
                        {"command": "setClientPassword", "username": username, "password": password}
                    )
                entry = client_entry(c)
                have_roles = sorted(r["rolename"] for r in present.get("roles", ()))
                if have_roles != sorted(client_roles(c)) or present.get("clientid") != entry.get("clientid"):
                    modify = {"command": "modifyClient", "username": username, "roles": entry["roles"]}
                    if "clientid" in entry:
                        modify["clientid"] = entry["clientid"]
                    commands.append(modify)
            for role in sorted(set(roles) - set(wanted_roles)):
                commands.append({"command": "deleteRole", "rolename": role})
            self._send(
                commands, benign=("ACL with this topic already exists", "ACL not found", "Client not found")
            )
        log.info("Mosquitto's dynamic security in step with the store (%d command(s))", len(commands) - 1)
