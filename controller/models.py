"""What the controller stores: pydantic models, strict about their fields."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import ConfigDict, Field
from tether.protocol.heap import Kept
from tether.protocol.models import (
    NAME_PATTERN,
    DeviceFacts,
    JobSpec,
    RegistryAuth,
    ReportedState,
    StackRef,
    StackSpec,
    VarBinding,
)

from .placement import Assignment, Placement
from .selectors import Attributes

LabelSource = Literal["operator", "enrollment", "device"]
"""Where a device's label comes from: set by an operator (``devices label``), pinned at
enrollment (by its token or at approval), or reported by the device. The first two are
trusted: group selectors match them (facts, like the device's own labels, are reported)."""


class Stored(Kept):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Device(Stored):
    """A device the controller has heard from (presence) or been told about (a group)."""

    id: str
    status: Literal["online", "offline", "unknown", "never seen"] = "never seen"
    """``unknown``: shown online before the controller (or the broker) restarted, not heard from
    since; ``offline`` once its keepalive allowance has passed without news."""
    session: int = -1
    since: float | None = None
    facts: DeviceFacts | None = None
    reported: ReportedState | None = None
    operator_labels: dict[str, str] = Field(default_factory=dict)
    """Set by an operator (``tether devices label``); trusted."""
    pinned_labels: dict[str, str] = Field(default_factory=dict)
    """Pinned at enrollment: its token's labels and those given at approval; trusted."""
    revoked: bool = False
    """Cut off (``tether devices revoke``): matches no group until it gets new credentials."""

    @property
    def public_key(self) -> str | None:
        """The X25519 key its agent announced (secrets are sealed to it)."""
        return self.facts.public_key if self.facts is not None else None

    @property
    def trusted_labels(self) -> dict[str, str]:
        """Labels the controller vouches for: pinned at enrollment, overridden by the operator's."""
        return {**self.pinned_labels, **self.operator_labels}

    @property
    def labels(self) -> dict[str, str]:
        """The device's own labels, overridden by the trusted ones."""
        merged = dict(self.facts.labels) if self.facts else {}
        merged.update(self.trusted_labels)
        return merged

    def _facts(self) -> dict[str, str]:
        if self.facts is None:
            return {}
        return {
            "arch": self.facts.arch,
            "os": self.facts.os,
            "driver": self.facts.driver,
            "hostname": self.facts.hostname,
            "agent_version": self.facts.agent_version,
        }

    def attributes(self) -> Attributes:
        """What selectors and placement constraints match: facts (``arch``, ``os``, ``driver``,
        ``hostname``, ``agent_version``) overlaid by the device's labels (a label wins over a
        fact), overlaid by the trusted labels; group selectors see only the trusted ones
        unless the group trusts device labels (:class:`~.selectors.Attributes`)."""
        reported = self._facts()
        if self.facts is not None:
            reported.update(self.facts.labels)
        return Attributes(trusted=self.trusted_labels, reported=reported)

    def label_sources(self) -> dict[str, LabelSource]:
        """Where each of :attr:`labels` comes from (the source whose value is in force)."""
        sources: dict[str, LabelSource] = {k: "device" for k in (self.facts.labels if self.facts else {})}
        sources.update({k: "enrollment" for k in self.pinned_labels})
        sources.update({k: "operator" for k in self.operator_labels})
        return dict(sorted(sources.items()))


class Group(Stored):
    """Static (named devices) when ``selector`` is None, else dynamic (label selector)."""

    name: str = Field(pattern=NAME_PATTERN)
    devices: tuple[str, ...] = ()
    selector: str | None = None
    trust_device_labels: bool = False
    """The selector also matches what devices report about themselves (their own labels and
    facts); by default only labels set by an operator or pinned at enrollment count."""
    created: float = 0.0

    @property
    def kind(self) -> Literal["static", "selector"]:
        return "static" if self.selector is None else "selector"


class Stack(Stored):
    """A deployed stack: its name, target group and current definition."""

    name: str = Field(pattern=NAME_PATTERN)
    group: str
    spec_hash: str
    spec: StackSpec
    compose: str
    placement: Placement = Field(default_factory=Placement)
    assignment: tuple[Assignment, ...] = ()
    version: int = 1
    created: float = 0.0
    updated: float = 0.0


class Job(Stored):
    """An edge job on a group (one-shot or scheduled)."""

    name: str = Field(pattern=NAME_PATTERN)
    group: str
    spec: JobSpec
    created: float = 0.0


class DesiredRecord(Stored):
    """The desired state last computed for a device, and whether the broker has it."""

    device_id: str
    generation: int
    stacks: tuple[StackRef, ...] = ()
    jobs: tuple[JobSpec, ...] = ()
    vars: tuple[VarBinding, ...] = ()
    """Values for the variables its stacks reference (a secret sealed to the device's key)."""
    registries: tuple[RegistryAuth, ...] = ()
    """Credentials for the registries its images come from (sealed to the device's key)."""
    stage: tuple[StackRef, ...] = ()
    """Stack versions to download only (a stage-only deployment before its switch)."""
    published: bool = False

    def hashes(self) -> frozenset[str]:
        """Every stack definition the device may fetch (the broker's ACL): run or staged."""
        return frozenset(ref.spec_hash for ref in (*self.stacks, *self.stage))


def spec_hashes(parts: Iterable[tuple[StackRef, ...]]) -> set[str]:
    """Every stack definition the tuples of references ``parts`` name (what
    :meth:`DesiredRecord.hashes` gives, for many), each tuple looked at once: a deploy's
    records share theirs (the very tuples), so 10,000 records are a few tuples to walk."""
    unique = {id(refs): refs for refs in parts if refs}
    return {ref.spec_hash for refs in unique.values() for ref in refs}


class EnrollmentToken(Stored):
    """A fleet enrollment token (``tether tokens create``): only its SHA-256 is kept."""

    id: str
    token_hash: str
    group: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    auto_approve: bool = False
    expires: float | None = None
    uses: int | None = None
    devices: tuple[str, ...] = ()
    """Devices admitted with it (each used one of ``uses``)."""
    created: float = 0.0

    def uses_left(self) -> int | None:
        return None if self.uses is None else max(0, self.uses - len(self.devices))


class Enrollment(Stored):
    """A device in the waiting room (or through it): what it asked with and what was decided."""

    device_id: str
    state: Literal["pending", "approved", "rejected"] = "pending"
    token_id: str
    public_key: str
    facts: DeviceFacts
    requested: float = 0.0
    decided: float | None = None
    sealed: str | None = None
    """The answer (sealed to ``public_key``: ciphertext only), retained until the device is seen."""
    cleared: bool = False
    """The device came online with its credentials: the retained answer was cleared."""
    last_error: str | None = None


class Variable(Stored):
    """A variable (``tether vars set``): keys and values at a path, in one scope.

    ``scope`` is ``fleet``, ``group:NAME`` or ``device:ID``. A plain variable keeps its
    values in ``items``; a secret keeps them only in ``sealed`` (a sealed box to the
    controller's secrets key, see :mod:`.variables`), and its key names in ``keys``.
    """

    scope: str
    path: str
    secret: bool = False
    items: dict[str, str] = Field(default_factory=dict)
    sealed: str | None = None
    keys: tuple[str, ...] = ()
    version: int = 1
    updated: float = 0.0


class Registry(Stored):
    """Credentials for an image registry (``tether registries add``), in one scope.

    ``scope`` is ``fleet``, ``group:NAME`` or ``device:ID``, as for variables. The username
    and password are kept only in ``sealed``, a sealed box to the controller's secrets key.
    """

    scope: str
    host: str
    sealed: str
    version: int = 1
    updated: float = 0.0


class Webhook(Stored):
    """A webhook (``tether notify add``). The signing secret is kept only in ``sealed``, a
    sealed box to the controller's secrets key holding ``{"secret": ...}``."""

    id: str
    url: str
    on: tuple[str, ...]
    offline_after_s: float = 300.0
    format: Literal["json", "slack"] = "json"
    sealed: str | None = None
    window_s: float = 30.0
    created: float = 0.0


class Delivery(Stored):
    """One message to a webhook, kept until delivered or given up (``tether notify log``)."""

    id: int = 0
    webhook: str
    kind: str
    subject: str = ""
    payload: dict[str, Any]
    """The body's content, without the delivery id (added when sent)."""
    state: Literal["pending", "delivered", "failed"] = "pending"
    attempts: int = 0
    next_at: float | None = None
    last_error: str | None = None
    status: int | None = None
    created: float = 0.0
    updated: float = 0.0


class User(Stored):
    """A person or integration of ``tether users``: name and role. The password's hash is the
    broker credential of the same name (table ``credentials``), so MQTT and HTTP check one."""

    name: str
    role: Literal["viewer", "operator", "admin"]
    created: float = 0.0


class ApiToken(Stored):
    """An API token of a user (``tether users token``): only its SHA-256 is kept (the token is
    256 random bits, shown once). ``scope``: the most it allows (a role), whatever the user's."""

    id: str
    user: str
    token_hash: str
    scope: Literal["viewer", "operator", "admin"] = "admin"
    expires: float | None = None
    created: float = 0.0


class AuditRecord(Stored):
    """One write asked of the controller: who, when, through which door, what, and how it ended.
    Never a secret: ``target`` holds only the names a command acts on (see controller/audit.py)."""

    id: str
    at: float
    user: str
    via: Literal["mqtt", "http", "internal"]
    address: str = ""
    command: str
    target: dict[str, object] = Field(default_factory=dict)
    outcome: str
    """``ok``, or the error code of the refusal (protocol/errors.py)."""
