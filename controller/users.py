"""Users, their roles and API tokens, and the audit log (issue 19).

A user (table ``users``) has a name and a role (protocol/principals.py); its password's hash
is the broker credential of the same name (broker role ``viewer`` for a viewer, ``operator``
for an operator or admin: protocol/acl.py), so MQTT and HTTP check the same password.
Passwords are made here, 256 random bits, and shown once (``users.add``, ``users.passwd``);
API tokens likewise (``users.token``: ``tta_{id}_{secret}``, kept as a SHA-256 like the
enrollment tokens, at most ``scope``'s rights, expiring, revocable).

Every write a principal asks for is recorded by :func:`audit` (called from
``Controller.execute``, the one place for MQTT and HTTP): who, when, the door and address,
the command's kind, the names it acts on and the outcome. Never a secret: only the fields of
:data:`AUDITED_FIELDS` are kept (never a variable's values, a password, a token, a Compose
file or a job's command line).
"""

from __future__ import annotations

import hmac
import itertools
import logging
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

from tether.protocol import names
from tether.protocol.acl import RESERVED_DEVICE_PREFIXES
from tether.protocol.acl import Role as BrokerRole
from tether.protocol.commands import (
    AuditList,
    CommandModel,
    UsersAdd,
    UsersList,
    UsersPasswd,
    UsersRemove,
    UsersRevoke,
    UsersToken,
    UsersTokens,
)
from tether.protocol.credentials import ITERATIONS, Credential, hash_password, hash_token, new_password
from tether.protocol.errors import CommandError, ConflictError, PayloadError, StoreError
from tether.protocol.principals import ROLES, Principal, Role, Via
from tether.protocol.results import (
    ApiTokenCreated,
    ApiTokenList,
    ApiTokenRevoked,
    ApiTokenView,
    AuditEntry,
    AuditLog,
    UserList,
    UserPassword,
    UserRemoved,
    UserView,
)

from .context import Context, require
from .models import ApiToken, AuditRecord, User
from .registry import CommandRegistry, Route
from .store import Store

log = logging.getLogger(__name__)
commands = CommandRegistry(tag="users")
"""The commands handled here (see :mod:`.registry`)."""

TOKEN_PREFIX = "tta"
_AUDIT_SEQ = itertools.count()
RESERVED_USER_PREFIXES = (*RESERVED_DEVICE_PREFIXES, "tether-")
AUDITED_FIELDS = (
    "name",
    "group",
    "device_id",
    "device_ids",
    "path",
    "keys",
    "host",
    "stack",
    "id",
    "token_id",
    "role",
    "scope",
    "selector",
    "secret",
    "user",
)
"""The fields of a command an audit record keeps: names, never values or secrets."""


def broker_role(role: Role) -> BrokerRole:
    """The broker role (protocol/acl.py) of a user of ``role``."""
    return "viewer" if role == "viewer" else "operator"


def _view(user: User) -> UserView:
    return UserView(name=user.name, role=user.role, created=user.created)


def _user(store: Store, name: str) -> User:
    return require(store.get_user(name), "user", name)


def _admins(store: Store) -> list[str]:
    return [u.name for u in store.list_users() if u.role == "admin"]


@dataclass(frozen=True)
class NewPassword:
    """A user's next password and its hash (:func:`new_user_password`)."""

    password: str
    password_hash: str
    chosen: bool
    """The user's own (``users passwd`` with ``sealed``), not one made here."""


def new_user_password(ctx: Context, cmd: UsersAdd | UsersPasswd) -> NewPassword:
    """The password ``cmd`` gives its user: the sealed one it carries, or a random one; with
    its hash. The slow part of ``users.add``/``users.passwd`` (a chosen password gets
    :data:`CHOSEN_ITERATIONS` of the KDF: a person's password is guessable, ours are not), so
    the controller runs it off its thread (the handlers' ``prepare``); it reads no store."""
    sealed = getattr(cmd, "sealed", None)
    if sealed is not None:
        password = _chosen_password(ctx, sealed)
        return NewPassword(password, hash_password(password, iterations=CHOSEN_ITERATIONS), True)
    password = new_password()
    return NewPassword(password, hash_password(password, iterations=ITERATIONS), False)


def _prepared(ctx: Context, cmd: UsersAdd | UsersPasswd, prepared: object) -> NewPassword:
    """What ``prepare`` made of ``cmd`` (its refusal raised here), or made now if nothing did."""
    if prepared is None:
        return new_user_password(ctx, cmd)
    if isinstance(prepared, BaseException):
        raise prepared
    assert isinstance(prepared, NewPassword)
    return prepared


def _set_password(ctx: Context, user: User, new: NewPassword) -> None:
    """Store ``new`` as ``user``'s password (its hash; the broker access hears the password)."""
    ctx.store.put_credential(
        Credential(user.name, broker_role(user.role), user.name, new.password_hash), ctx.clock()
    )
    ctx.access.new_secret(user.name, new.password)


MIN_PASSWORD = 12
CHOSEN_ITERATIONS = 210_000
"""PBKDF2-HMAC-SHA512 iterations for a password a person chose (OWASP's figure for it)."""


def _chosen_password(ctx: Context, sealed: str) -> str:
    """The password in a sealed box to the controller's key; one clear error if unusable."""
    if ctx.secrets is None:
        raise StoreError("this controller has no secrets key (it is made in tether up's --data-dir)")
    try:
        items = ctx.secrets.open_items(sealed, "users passwd: sealed password")
    except PayloadError as exc:
        raise CommandError(str(exc)) from exc
    password = items.get("password", "")
    if set(items) != {"password"}:
        raise CommandError("users passwd: the sealed box must hold exactly a password")
    if len(password) < MIN_PASSWORD or len(password) > 1024:
        raise CommandError(f"users passwd: a password has {MIN_PASSWORD} to 1024 characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in password):
        raise CommandError("users passwd: a password has no control characters")
    return password


def ensure_user(store: Store, name: str, role: Role, now: float) -> None:
    """Make ``name`` a user of ``role`` if it is none (``tether up``'s ``admin``: its credential exists)."""
    if store.get_user(name) is None:
        store.put_user(User(name=name, role=role, created=now))


@commands.command(
    UsersAdd,
    role="admin",
    http=Route("POST", "/users", "Add a user (its password shown once)", status=201),
    prepare=new_user_password,
)
def users_add(ctx: Context, cmd: UsersAdd, prepared: object = None) -> UserPassword:
    problems = []
    if not names.NAME.ok(cmd.name):
        problems.append(f"invalid user name {cmd.name!r}: {names.NAME.hint}")
    elif cmd.name.startswith(RESERVED_USER_PREFIXES):
        problems.append(f"user name {cmd.name!r} is reserved (starts with {cmd.name.split('-')[0]}-)")
    if problems:
        raise CommandError("; ".join(problems))
    if ctx.store.get_user(cmd.name) is not None:
        raise ConflictError(f"user {cmd.name!r} exists (tether users passwd {cmd.name} gives a new password)")
    existing = ctx.store.get_credential(cmd.name)
    if existing is not None:
        raise ConflictError(
            f"{cmd.name!r} is the name of a {existing.role} on the broker, not free for a user"
        )
    new = _prepared(ctx, cmd, prepared)
    user = User(name=cmd.name, role=cmd.role, created=ctx.clock())
    with ctx.store.transaction():
        ctx.store.put_user(user)
        _set_password(ctx, user, new)
    ctx.access.sync(ctx.store)
    log.info("user %s (%s) added", user.name, user.role)
    return UserPassword(user=_view(user), password=new.password)


@commands.command(UsersList, read_only=True, http=Route("GET", "/users", "Users"))
def users_ls(ctx: Context, cmd: UsersList) -> UserList:
    return UserList(users=[_view(u) for u in ctx.store.list_users()])


@commands.command(UsersRemove, role="admin", http=Route("DELETE", "/users/{name}", "Remove a user"))
def users_rm(ctx: Context, cmd: UsersRemove) -> UserRemoved:
    user = _user(ctx.store, cmd.name)
    if user.role == "admin" and _admins(ctx.store) == [user.name]:
        raise ConflictError(f"{user.name!r} is the last admin: make another admin first")
    tokens = [t for t in ctx.store.list_api_tokens() if t.user == user.name]
    with ctx.store.transaction():
        ctx.store.delete_user(user.name)
    ctx.access.sync(ctx.store)
    ctx.access.disconnect_users({user.name})
    log.info("user %s removed (and %d API token(s))", user.name, len(tokens))
    return UserRemoved(removed=user.name, tokens=len(tokens))


@commands.command(
    UsersPasswd,
    role="admin",
    http=Route("POST", "/users/{name}/password", "A new password for a user (shown once)"),
    prepare=new_user_password,
)
def users_passwd(ctx: Context, cmd: UsersPasswd, prepared: object = None) -> UserPassword:
    user = _user(ctx.store, cmd.name)
    if cmd.role is not None and cmd.role != "admin" and _admins(ctx.store) == [user.name]:
        raise ConflictError(f"{user.name!r} is the last admin: make another admin first")
    new = _prepared(ctx, cmd, prepared)
    if cmd.role is not None:
        user = user.model_copy(update={"role": cmd.role})
    with ctx.store.transaction():
        ctx.store.put_user(user)
        _set_password(ctx, user, new)
    ctx.access.sync(ctx.store)
    ctx.access.disconnect_users({user.name})  # the old password and role end with its connections
    log.info("user %s: new password (%s)", user.name, user.role)
    return UserPassword(user=_view(user), password="" if new.chosen else new.password)


def _token_view(token: ApiToken, now: float) -> ApiTokenView:
    expired = token.expires is not None and now >= token.expires
    return ApiTokenView(
        id=token.id,
        user=token.user,
        scope=token.scope,
        expires=token.expires,
        expired=expired,
        created=token.created,
    )


@commands.command(
    UsersToken,
    role="admin",
    http=Route("POST", "/users/{name}/tokens", "Create an API token (shown once)", status=201),
)
def users_token(ctx: Context, cmd: UsersToken) -> ApiTokenCreated:
    user = _user(ctx.store, cmd.name)
    now = ctx.clock()
    token_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"
    stored = ApiToken(
        id=token_id,
        user=user.name,
        token_hash=hash_token(token),
        scope=cmd.scope,
        expires=None if cmd.expires_s is None else now + cmd.expires_s,
        created=now,
    )
    ctx.store.put_api_token(stored)
    log.info("user %s: API token %s made (scope %s)", user.name, token_id, cmd.scope)
    return ApiTokenCreated(**_token_view(stored, now).model_dump(), token=token)


@commands.command(
    UsersTokens, read_only=True, http=Route("GET", "/api-tokens", "API tokens (never the tokens themselves)")
)
def users_tokens(ctx: Context, cmd: UsersTokens) -> ApiTokenList:
    now = ctx.clock()
    found = [t for t in ctx.store.list_api_tokens() if cmd.name is None or t.user == cmd.name]
    found.sort(key=lambda t: (t.user, t.created, t.id))
    return ApiTokenList(tokens=[_token_view(t, now) for t in found])


@commands.command(
    UsersRevoke, role="admin", http=Route("DELETE", "/api-tokens/{token_id}", "Revoke an API token")
)
def users_revoke(ctx: Context, cmd: UsersRevoke) -> ApiTokenRevoked:
    require(
        ctx.store.get_api_token(cmd.token_id), "API token", cmd.token_id, " (tether users tokens lists them)"
    )
    ctx.store.delete_api_token(cmd.token_id)
    log.info("API token %s revoked", cmd.token_id)
    return ApiTokenRevoked(revoked=cmd.token_id)


# --- who is asking (MQTT, HTTP) ---


def principal_of(store: Store, name: str, via: Via, address: str = "") -> Principal | None:
    """The principal of user ``name`` as stored now (None: no such user, or its credential is revoked)."""
    user = store.get_user(name)
    credential = store.get_credential(name)
    if user is None or credential is None or credential.revoked:
        return None
    return Principal(user=user.name, role=user.role, via=via, address=address)


def token_principal(store: Store, token: str, now: float, address: str = "") -> Principal | None:
    """The principal an API token stands for (None: unknown, expired, revoked, or its user is gone).

    Its role is the lesser of the user's and the token's scope."""
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not secret or len(token_id) > 64:
        return None
    stored = store.get_api_token(token_id)
    if stored is None or not hmac.compare_digest(stored.token_hash, hash_token(token)):
        return None
    if stored.expires is not None and now >= stored.expires:
        return None
    principal = principal_of(store, stored.user, "http", address)
    if principal is None:
        return None
    role = min(principal.role, stored.scope, key=ROLES.index)
    return Principal(user=principal.user, role=role, via="http", address=address)


DUMMY_HASH = hash_password(new_password())
"""Checked against when the user does not exist, so a refusal takes as long either way."""


# --- the audit log ---


def audit_target(command: CommandModel) -> dict[str, Any]:
    """The names ``command`` acts on (:data:`AUDITED_FIELDS`), never anything else of it."""
    fields = command.model_dump(mode="json", include=set(AUDITED_FIELDS))
    return {k: v for k, v in fields.items() if v is not False and v not in (None, "", [], ())}


def audit(store: Store, principal: Principal, command: CommandModel, outcome: str, now: float) -> None:
    """Append the audit record of one write (its outcome: ``ok`` or an error code)."""
    record = AuditRecord(
        id=f"{int(now * 1e6):020d}-{next(_AUDIT_SEQ):012d}-{uuid.uuid4().hex[:8]}",
        at=now,
        user=principal.user,
        via=principal.via,
        address=principal.address[:200],
        command=str(getattr(command, "kind", type(command).__name__)),
        target=audit_target(command),
        outcome=outcome,
    )
    store.add_audit(record)


@commands.command(
    AuditList,
    read_only=True,
    http=Route("GET", "/audit", "The audit log: every write, who, when, from where", tag="audit"),
)
def audit_ls(ctx: Context, cmd: AuditList) -> AuditLog:
    records = ctx.store.list_audit(since=cmd.since, user=cmd.user, limit=cmd.limit)
    return AuditLog(
        records=[AuditEntry(**r.model_dump(exclude={"id"})) for r in records]  # type: ignore[arg-type]
    )
