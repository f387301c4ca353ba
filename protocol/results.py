"""The controller's results: what a :class:`~.models.Reply` carries in ``result``, per command.

Each command of :mod:`.commands` answers with one of these models (the controller's
registry, controller/registry.py, reads it from the handler's return annotation);
docs/topics.md documents them and tests/unit/test_results.py checks the two agree. Like
every wire model they ignore fields they do not know, so a CLI reads a newer controller's
replies. Parts that are other wire models rendered as maps (a reported state, a metrics
sample, a rollout strategy) stay maps here: their models are in :mod:`.models`,
:mod:`.device_api` and :mod:`.commands`.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .models import WireModel


def _absent(value: Any) -> bool:
    return value is None


class Removed(WireModel):
    """``groups.rm``, ``stacks.rm``, ``jobs.rm``: the name removed."""

    removed: str


# --- devices -------------------------------------------------------------------------------


class DeviceView(WireModel):
    """A device as the controller knows it (docs/topics.md, DeviceView)."""

    id: str
    status: str
    since: float | None
    session: int
    labels: dict[str, str]
    label_sources: dict[str, str]
    desired_generation: int | None
    applied_generation: int | None
    stacks: dict[str, str]
    storage_error: str | None


class DeviceDetails(DeviceView):
    """``devices.show``: the view with its facts, desired and reported state, events and drops."""

    facts: dict[str, Any] | None
    desired: list[dict[str, Any]]
    reported: dict[str, Any] | None
    events: list[dict[str, Any]]
    dropped: dict[str, int]


class DeviceList(WireModel):
    """``devices.ls``; paged or filtered: how many devices match and are known, how many of
    those matching every filter but presence have each presence, and the ``after`` of the
    next page (None on the last)."""

    devices: list[DeviceView]
    matched: int | None = Field(default=None, exclude_if=_absent)
    total: int | None = Field(default=None, exclude_if=_absent)
    by_presence: dict[str, int] | None = Field(default=None, exclude_if=_absent)
    next: str | None = Field(default=None, exclude_if=_absent)


class DeviceResult(WireModel):
    """``devices.label``."""

    device: DeviceView


class DeviceShown(WireModel):
    """``devices.show``."""

    device: DeviceDetails


class DeviceSample(WireModel):
    """One row of ``devices.top``: the latest metrics sample (a map; None before one arrived)."""

    id: str
    status: str
    since: float | None
    sample: dict[str, Any] | None


class DeviceSamples(WireModel):
    """``devices.top``."""

    devices: list[DeviceSample]


class DeviceMetricsHistory(WireModel):
    """``devices.metrics``: each series' points, oldest first, one per ``step_s`` seconds from
    ``start`` (controller clock) to now; a point is the mean of the samples received in it, in %
    (memory and disk: of their totals), None where none was (all empty before any arrived)."""

    id: str
    step_s: float
    start: float
    cpu: list[float | None]
    mem: list[float | None]
    disk: list[float | None]


# --- groups --------------------------------------------------------------------------------


class GroupView(WireModel):
    """A group, its members now and the stacks deployed to it."""

    name: str
    kind: str
    devices: list[str]
    selector: str | None
    trust_device_labels: bool
    members: list[str]
    stacks: list[str]


class GroupResult(WireModel):
    """``groups.show``, ``groups.trust``."""

    group: GroupView


class GroupCreated(GroupResult):
    """``groups.create``: also the devices it names that never connected (a typo, or not yet)."""

    never_seen: list[str]


class GroupList(WireModel):
    """``groups.ls``."""

    groups: list[GroupView]


# --- stacks --------------------------------------------------------------------------------


class StackView(WireModel):
    """A stack's current version (``placement``, ``assignment``: maps of the stored models)."""

    name: str
    group: str
    spec_hash: str
    version: int
    services: list[str]
    placement: dict[str, Any]
    assignment: list[dict[str, Any]]
    updated: float


class StackSummary(StackView):
    """A row of ``stacks.ls``: the view with how many devices should run it and run it."""

    devices: int
    running: int


class StackList(WireModel):
    """``stacks.ls``."""

    stacks: list[StackSummary]


class StackDeployed(WireModel):
    """``stacks.deploy``."""

    stack: StackView
    changed: bool
    devices: list[str]
    never_seen: list[str]
    """Those of ``devices`` that never connected to this controller."""
    deployment: int | None
    warnings: list[str]


class ServiceChange(WireModel):
    """What a deploy would do to one service."""

    name: str
    change: str
    """``added``, ``replaced``, ``kept`` or ``removed``."""


class StackPlan(WireModel):
    """``stacks.plan``: what ``stacks.deploy`` would do, nothing changed."""

    name: str
    group: str
    spec_hash: str
    changed: bool
    version: int
    placement: dict[str, Any]
    devices: list[str]
    services: list[ServiceChange]
    warnings: list[str]


class StackShown(WireModel):
    """``stacks.show``: the Compose file of one version of a stack, as the controller received it."""

    name: str
    group: str
    version: int
    current: int
    spec_hash: str
    compose: str
    updated: float


class StackDeviceRow(WireModel):
    """Where one device stands with a stack (docs/topics.md, StackDeviceRow)."""

    device: str
    role: str | None
    rollout: str | None
    held: bool
    presence: str
    state: str
    desired_generation: int
    applied_generation: int | None
    error: str | None
    services: dict[str, dict[str, Any]]
    download: dict[str, Any] | None
    progress: str | None
    why: str | None


class StackStatusResult(WireModel):
    """``stacks.status``: the stack (None once removed, while devices still remove it), how
    many of its devices are in each state, and the rows asked for (all, or one page: ``next``
    is the ``after`` of the next page, None on the last)."""

    stack: StackView | None
    counts: dict[str, int] = Field(default_factory=dict)
    total: int = 0
    devices: list[StackDeviceRow]
    next: str | None = None


# --- deployments ---------------------------------------------------------------------------


class DeploymentView(WireModel):
    """A deployment (docs/topics.md, DeploymentView); ``devices`` only in ``deployments.status``."""

    id: int
    stack: str
    state: str
    from_hash: str | None
    to_hash: str
    strategy: dict[str, Any]
    batch: int
    promoted: bool
    switched: bool
    counts: dict[str, int]
    message: str | None
    created: float
    updated: float
    devices: dict[str, dict[str, Any]] | None = Field(default=None, exclude_if=_absent)


class DeploymentList(WireModel):
    """``deployments.ls``, newest first."""

    deployments: list[DeploymentView]


class DeploymentEvents(WireModel):
    """``deployments.events``: per device (those not healthy first), its events about the
    deployment, oldest first (:class:`~.models.Event` as stored); ``more``: devices left out."""

    id: int
    stack: str
    devices: dict[str, list[dict[str, Any]]]
    more: int


class DeploymentResult(WireModel):
    """The actions on a deployment (``rollback``: the new deployment)."""

    deployment: DeploymentView


class DeploymentStatusResult(DeploymentResult):
    """``deployments.status``: the deployment with its devices (all, or one page: ``next`` is
    the ``after`` of the next page, absent on the last)."""

    next: str | None = Field(default=None, exclude_if=_absent)


# --- jobs ----------------------------------------------------------------------------------


class JobView(WireModel):
    """A job (``trigger``: ``once``, ``cron EXPR`` or ``every Ns``)."""

    name: str
    group: str
    trigger: str
    command: list[str]
    image: str | None
    timeout_s: float
    concurrency: str
    created: float


class JobSummary(JobView):
    """A row of ``jobs.ls``: devices that reported a result, and how many of the latest succeeded."""

    devices: int
    succeeded: int


class JobResultView(WireModel):
    """``jobs.run``, ``jobs.schedule``."""

    job: JobView


class JobList(WireModel):
    """``jobs.ls``."""

    jobs: list[JobSummary]


class JobDeviceRow(WireModel):
    """One device of ``jobs.status``: its latest result without the output (None: none yet)."""

    device: str
    last: dict[str, Any] | None


class JobStatusResult(WireModel):
    """``jobs.status``."""

    job: JobView
    devices: list[JobDeviceRow]


class JobLogs(WireModel):
    """``jobs.logs``: results, each a map of the device and its JobResult fields."""

    results: list[dict[str, Any]]


# --- variables and registries ----------------------------------------------------------------


class PublicKey(WireModel):
    """``vars.key``: the X25519 key secrets and registry credentials are sealed to."""

    public_key: str


class VariableView(WireModel):
    """A variable; ``items`` only for a plain variable, in ``vars.set`` and ``vars.get``."""

    path: str
    scope: str
    secret: bool
    keys: list[str]
    version: int
    updated: float
    items: dict[str, str] | None = Field(default=None, exclude_if=_absent)


class VariableResult(WireModel):
    """``vars.get``."""

    variable: VariableView


class VariableSet(WireModel):
    """``vars.set``."""

    variable: VariableView
    changed: bool


class VariableList(WireModel):
    """``vars.ls``."""

    variables: list[VariableView]


class VariableRemoved(WireModel):
    """``vars.rm``: the keys removed."""

    removed: list[str]
    path: str
    scope: str


class RegistryView(WireModel):
    """A registry's credentials, never shown: where they apply and their version."""

    host: str
    scope: str
    version: int
    updated: float


class RegistryAdded(WireModel):
    """``registries.add``."""

    registry: RegistryView
    changed: bool


class RegistryList(WireModel):
    """``registries.ls``."""

    registries: list[RegistryView]


class RegistryRemoved(WireModel):
    """``registries.rm``."""

    host: str
    scope: str


# --- credentials and enrollment --------------------------------------------------------------


class DeviceCredentials(WireModel):
    """``devices.credentials``: shown once; ``password``, or ``certificate``, ``key`` and ``ca`` (PEM)."""

    device_id: str
    username: str
    password: str | None = Field(default=None, exclude_if=_absent)
    certificate: str | None = Field(default=None, exclude_if=_absent)
    key: str | None = Field(default=None, exclude_if=_absent)
    ca: str | None = Field(default=None, exclude_if=_absent)


class DevicesRevoked(WireModel):
    """``devices.revoke``: the devices revoked and how many live connections were closed."""

    revoked: list[str]
    closed: int


class DevicesRemoved(WireModel):
    """``devices.rm``: the devices forgotten; ``cleared``: their retained messages cleared on the broker."""

    removed: list[str]
    cleared: bool


class PendingView(WireModel):
    """A device in the waiting room (pending or rejected)."""

    id: str
    state: str
    token: str
    group: str | None
    labels: dict[str, str]
    hostname: str
    arch: str
    requested: float
    decided: float | None
    error: str | None


class PendingList(WireModel):
    """``devices.pending``."""

    devices: list[PendingView]


class DevicesApproved(WireModel):
    """``devices.approve``."""

    approved: list[str]


class DevicesRejected(WireModel):
    """``devices.reject``."""

    rejected: list[str]


class TokenView(WireModel):
    """An enrollment token, never its secret."""

    id: str
    group: str | None
    labels: dict[str, str]
    auto_approve: bool
    expires: float | None
    expired: bool
    uses: int | None
    used: int
    devices: list[str]
    created: float


class TokenCreated(TokenView):
    """``tokens.create``: the view and the token itself, shown once."""

    token: str


class TokenList(WireModel):
    """``tokens.ls``."""

    tokens: list[TokenView]


class TokensRemoved(WireModel):
    """``tokens.rm``."""

    removed: list[str]


# --- notifications (docs/notifications.md) --------------------------------------------------


class WebhookView(WireModel):
    """A webhook, never its secret (``signed``: it has one), with its deliveries' counts."""

    id: str
    url: str
    on: list[str]
    offline_after_s: float
    format: str
    window_s: float
    signed: bool
    created: float
    deliveries: dict[str, int]


class WebhookResult(WireModel):
    """``notify.add``."""

    webhook: WebhookView


class WebhookList(WireModel):
    """``notify.ls``."""

    webhooks: list[WebhookView]


class WebhookRemoved(WireModel):
    """``notify.rm``: the webhook and its deliveries are gone."""

    id: str


class DeliveryView(WireModel):
    """One delivery: ``state`` pending (to be sent, ``next_at``), delivered or failed (gave up)."""

    id: int
    webhook: str
    kind: str
    subject: str
    state: str
    attempts: int
    next_at: float | None
    last_error: str | None
    status: int | None
    created: float
    updated: float


class DeliveryResult(WireModel):
    """``notify.test``: the delivery queued."""

    delivery: DeliveryView


class DeliveryList(WireModel):
    """``notify.log``: newest first."""

    deliveries: list[DeliveryView]


# --- users, API tokens and the audit log -----------------------------------------------------


class UserView(WireModel):
    """A user (never a password)."""

    name: str
    role: str
    created: float


class UserList(WireModel):
    """``users.ls``."""

    users: list[UserView]


class UserPassword(WireModel):
    """``users.add`` and ``users.passwd``: the user and its new password, shown once (empty
    when the password was the user's own choice: it is never sent back)."""

    user: UserView
    password: str


class UserRemoved(WireModel):
    """``users.rm``."""

    removed: str
    tokens: int
    """API tokens removed with it."""


class ApiTokenView(WireModel):
    """An API token, never its secret."""

    id: str
    user: str
    scope: str
    expires: float | None
    expired: bool
    created: float


class ApiTokenCreated(ApiTokenView):
    """``users.token``: the view and the token itself (``Authorization: Bearer``), shown once."""

    token: str


class ApiTokenList(WireModel):
    """``users.tokens``."""

    tokens: list[ApiTokenView]


class ApiTokenRevoked(WireModel):
    """``users.revoke``."""

    revoked: str


class AuditEntry(WireModel):
    """One audited write: who, when, through which door and from where, what, how it ended."""

    at: float
    user: str
    via: str
    address: str
    command: str
    target: dict[str, Any]
    outcome: str


class AuditLog(WireModel):
    """``audit.ls``, oldest first."""

    records: list[AuditEntry]
