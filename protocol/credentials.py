"""Broker credentials: password hashes and the in-memory table the broker authenticates against.

Theory of operation
-------------------
The controller owns the credentials (its store holds username, role, device id, password
hash, revoked flag; never a password). It keeps a :class:`CredentialTable` up to date: a
snapshot of those rows plus, per device, the stack hashes its desired state names. The
embedded broker's plugins (``tether.broker.auth``) read the table from the broker thread;
they never touch the database. Every update replaces whole dictionaries (one reference
assignment each), so a reader sees either the old or the new snapshot, never half of one.

Password hashes use Mosquitto 2.0's ``$7$`` format (PBKDF2-HMAC-SHA512, 12-byte salt,
64-byte key: ``$7$ITERATIONS$base64(salt)$base64(key)``), so the very same hash goes into
the Mosquitto password file Tether generates. Tether's passwords are 256-bit random
strings, so the iteration count only adds defence in depth; verified passwords are cached
(:class:`VerifiedPasswords`, by a SHA-256 of username, password and hash) so that a
reconnect storm does not cost a PBKDF2 run per connection.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from . import names
from .acl import Identity, Role, client_id_allowed
from .heap import Shared

__all__ = [
    "ENROLL_PREFIX",
    "TOKEN_USER_PREFIX",
    "Credential",
    "CredentialTable",
    "TokenGrant",
    "VerifiedPasswords",
    "enroll_username",
    "hash_token",
    "hash_password",
    "new_password",
    "token_id_of",
    "verify_password",
]

ITERATIONS = 10_000
SALT_BYTES = 12  # what mosquitto_passwd uses
KEY_BYTES = 64  # SHA-512's output


def new_password() -> str:
    """A fresh random password (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


ENROLL_PREFIX = "enroll:"
"""Agents before issue 13 enrolled as user ``enroll:{device_id}`` (the embedded broker still
accepts it)."""
TOKEN_USER_PREFIX = "enroll-"
"""An enrolling device connects as user ``enroll-{token id}`` with the fleet token as its
password and ``tether-enroll-{device_id}`` as its client id: a username known before the
device exists, which Mosquitto's dynamic security needs (one client per token). Device ids
starting ``enroll-`` are reserved, so it is never a device's username."""
TOKEN_PREFIX = "tet"


def token_id_of(token: str) -> str | None:
    """The id in a fleet token (``tet_{id}_{secret}``), or None if it is not one."""
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    return token_id if prefix == TOKEN_PREFIX and names.TOKEN_ID.ok(token_id) and secret else None


def enroll_username(token: str, device_id: str) -> str:
    """The username an enrolling device connects with (``enroll-{token id}``)."""
    token_id = token_id_of(token)
    return f"{TOKEN_USER_PREFIX}{token_id}" if token_id else f"{ENROLL_PREFIX}{device_id}"


def hash_token(token: str) -> str:
    """How an enrollment token is stored: SHA-256 (hex). Tokens are 256-bit random, so a
    fast hash is enough, and it lets the broker look a token up without a PBKDF2 run."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenGrant:
    """What the broker needs to know of an enrollment token (the controller's snapshot).

    ``uses_left`` None: unlimited. ``devices``: ids already admitted with it (they may
    reconnect even when no use is left). ``expires`` None: never.
    """

    id: str
    expires: float | None = None
    uses_left: int | None = None
    devices: frozenset[str] = frozenset()

    def admits(self, device_id: str, now: float) -> bool:
        if self.expires is not None and now >= self.expires:
            return False
        return device_id in self.devices or self.uses_left is None or self.uses_left > 0


def hash_password(password: str, *, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    """The ``$7$`` (Mosquitto 2.0 PBKDF2-SHA512) hash of ``password`` with a fresh salt."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, KEY_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def verify_password(password: str, password_hash: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash; False (never an exception) for a malformed hash."""
    parts = password_hash.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except (ValueError, binascii.Error):
        return False
    if not 1 <= iterations <= 10_000_000 or not expected:
        return False
    key = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(expected))
    return hmac.compare_digest(key, expected)


class VerifiedPasswords:
    """:func:`verify_password` remembered: a password once verified against a hash passes again
    without the slow KDF (a CI job's every HTTP request, a reconnect storm of MQTT clients).

    The memory is keyed by a SHA-256 of user, password and hash, never the password: a hash
    changed (a new password) or a credential revoked or removed (the caller checks that before,
    against what is stored now) misses it at once. At ``limit`` entries it starts afresh.
    Thread-safe (a set's ``in`` and ``add`` are atomic in CPython)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._known: set[bytes] = set()

    def verify(self, username: str, password: str, password_hash: str) -> bool:
        key = hashlib.sha256(f"{username}\x00{password}\x00{password_hash}".encode()).digest()
        if key in self._known:
            return True
        if not verify_password(password, password_hash):
            return False
        if len(self._known) >= self.limit:
            self._known = set()
        self._known.add(key)
        return True


@dataclass(frozen=True)
class Credential:
    """One broker user: a device (``name`` = device id), the controller, or an operator."""

    username: str
    role: Role
    name: str
    password_hash: str
    revoked: bool = False

    def identity(self, client_id: str) -> Identity:
        return Identity(self.role, self.name, client_id)


class CredentialTable:
    """What the broker checks connections and topics against; the controller updates it.

    ``allow_anonymous``: clients without a username get full access (a local demo only).
    """

    def __init__(self, credentials: Iterable[Credential] = (), *, allow_anonymous: bool = False) -> None:
        self.allow_anonymous = allow_anonymous
        self._users: dict[str, Credential] = {c.username: c for c in credentials}
        self._stacks: dict[str, frozenset[str]] = {}
        self._stack_sets: Shared[frozenset[str], frozenset[str]] = Shared()
        """One set per set of hashes, shared by the devices that have it (most of a fleet runs
        the same stacks: a set of its own each was 216 bytes a device kept)."""
        self._verified = VerifiedPasswords(100_000)
        self._tokens: dict[str, TokenGrant] = {}  # token hash -> grant
        self._lock = threading.Lock()  # writers only; readers use whole-dict snapshots

    # --- updates (the controller's thread) ---

    def replace(self, credentials: Iterable[Credential]) -> None:
        """Replace every credential at once."""
        self._users = {c.username: c for c in credentials}

    def put(self, credential: Credential) -> None:
        with self._lock:
            users = dict(self._users)
            users[credential.username] = credential
            self._users = users

    def remove(self, username: str) -> None:
        with self._lock:
            users = dict(self._users)
            users.pop(username, None)
            self._users = users

    def set_stacks(self, assigned: Mapping[str, Collection[str]]) -> None:
        """Set the stack hashes of some devices (device id -> hashes); others keep theirs."""
        with self._lock:
            stacks = dict(self._stacks)
            for device_id, hashes in assigned.items():
                given = frozenset(hashes)
                stacks[device_id] = self._stack_sets.get(given, lambda: given)  # noqa: B023 (called at once)
            self._stacks = stacks

    def new_secret(self, username: str, secret: str) -> None:
        """A password (or fleet token, for ``enroll-{token id}``) just made for ``username``,
        given before the update that stores its hash. This table keeps hashes only; a broker
        that wants plain text at creation (Mosquitto's dynamic security) overrides this."""

    def expire(self, now: float) -> None:
        """Called every tick: drop what expired by ``now``. This table checks a token's expiry at
        each connect, so nothing to do here; Mosquitto's dynamic security needs it."""

    def set_tokens(self, grants: Mapping[str, TokenGrant]) -> None:
        """Replace the enrollment tokens (token hash -> grant) at once."""
        self._tokens = dict(grants)

    # --- lookups (any thread, e.g. the broker's) ---

    def token_grant(self, token: str) -> TokenGrant | None:
        return self._tokens.get(hash_token(token))

    def _enrolling(self, username: str, client_id: str) -> Identity | None:
        if username.startswith(TOKEN_USER_PREFIX):  # enroll-{token id}: the device is in the client id
            device_id = client_id.removeprefix("tether-enroll-")
        else:
            device_id = username[len(ENROLL_PREFIX) :]
        if not names.DEVICE_ID.ok(device_id):
            return None
        identity = Identity("enrolling", device_id, client_id)
        return identity if client_id_allowed(identity) else None

    def get(self, username: str) -> Credential | None:
        return self._users.get(username)

    def credentials(self) -> list[Credential]:
        return sorted(self._users.values(), key=lambda c: c.username)

    def all_stacks(self) -> dict[str, frozenset[str]]:
        return dict(self._stacks)

    def stacks_of(self, device_id: str) -> frozenset[str]:
        return self._stacks.get(device_id, frozenset())

    def authenticate(self, username: str | None, password: str | None, client_id: str) -> Identity | None:
        """The identity of a CONNECT, or None to refuse it. Anonymous: ``Identity("controller", "")``."""
        if not username:
            return Identity("controller", "", client_id) if self.allow_anonymous else None
        if username.startswith((ENROLL_PREFIX, TOKEN_USER_PREFIX)):  # a new device with a fleet token
            identity = self._enrolling(username, client_id)
            grant = self.token_grant(password) if password else None
            if identity is None or grant is None or not grant.admits(identity.name, time.time()):
                return None
            if username.startswith(TOKEN_USER_PREFIX) and username != f"{TOKEN_USER_PREFIX}{grant.id}":
                return None
            return identity
        credential = self._users.get(username)
        if credential is None or credential.revoked or password is None:
            return None
        identity = credential.identity(client_id)
        if not client_id_allowed(identity):
            return None
        return identity if self._verified.verify(username, password, credential.password_hash) else None

    def authenticate_certificate(self, name: str, client_id: str) -> Identity | None:
        """The identity of a CONNECT with a verified client certificate whose common name is
        ``name``, or None to refuse it: the user must exist (a device, the controller or an
        operator; not an enrolling one) and not be revoked, and the client id must fit it."""
        credential = self._users.get(name)
        if credential is None or credential.revoked or credential.role == "enrolling":
            return None
        identity = credential.identity(client_id)
        return identity if client_id_allowed(identity) else None

    def identity(self, username: str | None, client_id: str) -> Identity | None:
        """The current identity of a connected session (None once revoked or removed)."""
        if not username:
            return Identity("controller", "", client_id) if self.allow_anonymous else None
        if username.startswith((ENROLL_PREFIX, TOKEN_USER_PREFIX)):
            return self._enrolling(username, client_id)
        credential = self._users.get(username)
        if credential is None or credential.revoked:
            return None
        return credential.identity(client_id)
