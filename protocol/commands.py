"""The controller's commands: what a :class:`~.models.Request` carries in ``command``.

Kept apart from :mod:`.models` because only the controller and the CLI use them: the agent
answers its own device commands (:mod:`.device_api`) and never loads these models and
their discriminated union (1.0 MB of resident memory on a device).

A command is a :class:`CommandModel` subclass defined here; defining it adds it to
:data:`Command`. Its handler is declared once in the controller's registry
(controller/registry.py).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args

from pydantic import ConfigDict, Field, TypeAdapter

from .models import MAX_STACK_FILES, StackFile, WireModel

# Bounds on every duration and count an operator can send: a value outside is one clear
# validation error (naming the field) before anything is stored, never a crash later.
DAY_S = 86400.0
MAX_TOKEN_LIFETIME_S = 3660 * DAY_S
"""Ten years: the longest an enrollment token may stay valid."""
MAX_TIMEOUT_S = 7 * DAY_S
"""The longest job timeout or rollout health deadline."""
MAX_MIN_HEALTHY_S = DAY_S
MIN_JOB_INTERVAL_S = 1.0
MAX_JOB_INTERVAL_S = 366 * DAY_S
MAX_COUNT = 1_000_000
"""Token uses, rollout batch and canary sizes."""
MAX_ID = 2**63 - 1
"""Deployment ids are 64-bit integers in the store."""

COMMANDS: list[type[CommandModel]] = []
"""Every command model, in the order defined: the members of :data:`COMMAND_ADAPTER`'s union."""


class CommandModel(WireModel):
    """Base of every controller command: a subclass with a ``kind`` literal is one.

    Defining it here is all the wire needs: it joins the discriminated union that
    :data:`COMMAND_ADAPTER` validates. The controller declares its handler once, in its
    command registry (controller/registry.py), and a test checks that every command has one.
    """

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        COMMANDS.append(cls)

    @classmethod
    def kinds(cls) -> tuple[str, ...]:
        """The ``kind`` values this model carries (one, or several for :class:`DeploymentsAction`)."""
        return tuple(get_args(cls.model_fields["kind"].annotation))


DEVICES_PAGE_MAX = 1000
"""The most devices one ``devices.ls`` page asks for."""


class DevicesList(CommandModel):
    """Every device, or one page of those matching filters (the web UI's device list).

    Without ``limit`` and filters every device comes back, as before paging existed. With
    them: the devices in id order after ``after`` (the previous page's ``next``), at most
    ``limit``, whose id or a label value contains ``search`` (or whose label is ``key=value``),
    whose presence is ``presence``, that report a stack in ``state`` (``none``: no stack),
    and that belong to ``group``; the reply counts every match (``matched``)."""

    kind: Literal["devices.ls"] = "devices.ls"
    search: str | None = Field(default=None, max_length=256, exclude_if=lambda v: v is None)
    presence: Literal["online", "offline", "unknown", "never seen"] | None = Field(
        default=None, exclude_if=lambda v: v is None
    )
    state: Literal["converging", "running", "failed", "removing", "none"] | None = Field(
        default=None, exclude_if=lambda v: v is None
    )
    group: str | None = Field(default=None, max_length=256, exclude_if=lambda v: v is None)
    after: str | None = Field(default=None, max_length=256, exclude_if=lambda v: v is None)
    limit: int | None = Field(default=None, ge=0, le=DEVICES_PAGE_MAX, exclude_if=lambda v: v is None)


class DevicesShow(CommandModel):
    kind: Literal["devices.show"] = "devices.show"
    device_id: str


class DevicesTop(CommandModel):
    """The latest metrics sample of each device (all, or ``device_ids``), kept in memory."""

    kind: Literal["devices.top"] = "devices.top"
    device_ids: tuple[str, ...] = ()


class DevicesMetrics(CommandModel):
    """A device's recent usage (CPU, memory, disk), downsampled, kept in memory."""

    kind: Literal["devices.metrics"] = "devices.metrics"
    device_id: str


class DevicesLabel(CommandModel):
    """Set (``set``) and remove (``remove``) operator labels of a device."""

    kind: Literal["devices.label"] = "devices.label"
    device_id: str
    set: dict[str, str] = Field(default_factory=dict)
    remove: tuple[str, ...] = ()


class DevicesCredentials(CommandModel):
    """Create (or rotate) a device's broker credentials; the reply holds the password, once.

    ``certificate``: a client certificate and key instead (mTLS), signed by the controller's
    quick-start CA; the reply holds both (and the CA), once."""

    kind: Literal["devices.credentials"] = "devices.credentials"
    device_id: str
    certificate: bool = False


class DevicesRevoke(CommandModel):
    """Cut devices off: credentials revoked, live sessions closed, removed from static groups."""

    kind: Literal["devices.revoke"] = "devices.revoke"
    device_ids: tuple[str, ...] = Field(min_length=1)


class DevicesRemove(CommandModel):
    """Forget devices: their record, desired state (cleared on the broker), events, credentials."""

    kind: Literal["devices.rm"] = "devices.rm"
    device_ids: tuple[str, ...] = Field(min_length=1)


class DevicesPending(CommandModel):
    """The waiting room: devices that asked to join (pending, and rejected ones)."""

    kind: Literal["devices.pending"] = "devices.pending"


class DevicesApprove(CommandModel):
    """Approve waiting devices: ``device_ids``, or every pending one (``all``) matching ``selector``.

    ``labels`` are pinned on them (with their token's, winning): trusted, like operator labels."""

    kind: Literal["devices.approve"] = "devices.approve"
    device_ids: tuple[str, ...] = ()
    all: bool = False
    selector: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class DevicesReject(CommandModel):
    kind: Literal["devices.reject"] = "devices.reject"
    device_ids: tuple[str, ...] = Field(min_length=1)


class TokensCreate(CommandModel):
    """Create a fleet enrollment token; the reply holds the token, once."""

    kind: Literal["tokens.create"] = "tokens.create"
    group: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    auto_approve: bool = False
    expires_s: float | None = Field(default=None, gt=0, le=MAX_TOKEN_LIFETIME_S)
    uses: int | None = Field(default=None, ge=1, le=MAX_COUNT)


class TokensList(CommandModel):
    kind: Literal["tokens.ls"] = "tokens.ls"


class TokensRemove(CommandModel):
    kind: Literal["tokens.rm"] = "tokens.rm"
    ids: tuple[str, ...] = Field(min_length=1)


class VarsKey(CommandModel):
    """The controller's public key for secrets: ``vars.set`` seals a secret's keys to it."""

    kind: Literal["vars.key"] = "vars.key"


class VarsSet(CommandModel):
    """Set keys of a variable (merged into the keys it has).

    A plain variable's keys come in ``items``. A secret's never travel in plaintext: they
    come in ``sealed``, a sealed box to the controller's key (``vars.key``) holding a JSON
    object of keys to values. Scope: the fleet (neither ``group`` nor ``device_id``), one
    group, or one device.
    """

    kind: Literal["vars.set"] = "vars.set"
    path: str
    items: dict[str, str] = Field(default_factory=dict)
    secret: bool = False
    sealed: str | None = None
    group: str | None = None
    device_id: str | None = None


class VarsGet(CommandModel):
    """A variable's keys and plain values (a secret's values are never sent back)."""

    kind: Literal["vars.get"] = "vars.get"
    path: str
    group: str | None = None
    device_id: str | None = None


class VarsList(CommandModel):
    kind: Literal["vars.ls"] = "vars.ls"
    prefix: str = ""


class VarsRemove(CommandModel):
    """Remove a variable, or only some of its ``keys``."""

    kind: Literal["vars.rm"] = "vars.rm"
    path: str
    keys: tuple[str, ...] = ()
    group: str | None = None
    device_id: str | None = None


class RegistriesAdd(CommandModel):
    """Credentials for a private image registry, for the fleet, one group or one device.

    They never travel in plaintext: ``sealed`` is a sealed box to the controller's key
    (``vars.key``) holding the JSON object ``{"username": ..., "password": ...}``.
    """

    kind: Literal["registries.add"] = "registries.add"
    host: str = Field(max_length=255)
    sealed: str = Field(min_length=1, max_length=8192)
    group: str | None = None
    device_id: str | None = None


class RegistriesList(CommandModel):
    kind: Literal["registries.ls"] = "registries.ls"


class RegistriesRemove(CommandModel):
    kind: Literal["registries.rm"] = "registries.rm"
    host: str = Field(max_length=255)
    group: str | None = None
    device_id: str | None = None


class GroupsCreate(CommandModel):
    """A static group (``devices``) or a selector group. A selector matches only labels set by
    an operator or pinned at enrollment, unless ``trust_device_labels``: then also what devices
    report about themselves (their own labels and facts), so any device can join it."""

    kind: Literal["groups.create"] = "groups.create"
    name: str
    devices: tuple[str, ...] = ()
    selector: str | None = None
    trust_device_labels: bool = False


class GroupsTrust(CommandModel):
    """Make a selector group trust device-reported labels and facts (``trust``), or stop."""

    kind: Literal["groups.trust"] = "groups.trust"
    name: str
    trust: bool = True


class GroupsList(CommandModel):
    kind: Literal["groups.ls"] = "groups.ls"


class GroupsShow(CommandModel):
    kind: Literal["groups.show"] = "groups.show"
    name: str


class GroupsRemove(CommandModel):
    kind: Literal["groups.rm"] = "groups.rm"
    name: str


class RolloutStrategy(WireModel):
    """How a deployment moves a group to a new version (see docs/rollouts.md)."""

    kind: Literal["all-at-once", "rolling", "canary"] = "all-at-once"
    max_parallel: int = Field(default=1, ge=0, le=MAX_COUNT)
    canary: int = Field(default=1, ge=1, le=MAX_COUNT)
    min_healthy_time_s: float = Field(default=10.0, ge=0, le=MAX_MIN_HEALTHY_S)
    healthy_deadline_s: float = Field(default=300.0, gt=0, le=MAX_TIMEOUT_S)
    download_deadline_s: float = Field(default=DAY_S, gt=0, le=MAX_TIMEOUT_S)
    """How long a device may take to download a version's images (retrying transient errors)."""
    auto_revert: bool = False
    auto_promote: bool = False
    stage_only: bool = False
    """Download the new version on every device first; switch on ``deployments.switch``."""


class StacksDeploy(CommandModel):
    """Deploy ``compose`` (one Compose file, resolved by the CLI) as stack ``name``.

    ``files``: the files beside the Compose file that its relative bind mounts name,
    shipped with the stack (protocol/compose_resolve.py)."""

    kind: Literal["stacks.deploy"] = "stacks.deploy"
    name: str
    group: str
    compose: str
    files: tuple[StackFile, ...] = Field(default=(), max_length=MAX_STACK_FILES, exclude_if=lambda v: not v)
    strategy: RolloutStrategy = Field(default_factory=RolloutStrategy)


class StacksPlan(CommandModel):
    """What ``stacks.deploy`` with these fields would do, changing nothing (``tether stacks
    deploy --dry-run``): the file validated in full, every problem in one error, or the
    devices targeted and each service added, replaced, kept or removed."""

    kind: Literal["stacks.plan"] = "stacks.plan"
    name: str
    group: str
    compose: str
    files: tuple[StackFile, ...] = Field(default=(), max_length=MAX_STACK_FILES, exclude_if=lambda v: not v)


class StacksList(CommandModel):
    kind: Literal["stacks.ls"] = "stacks.ls"


STATUS_PAGE_MAX = 5000
"""The most rows one ``stacks.status`` or ``deployments.status`` page asks for (a page also ends before its reply
would pass about half the message limit, whatever ``limit`` says)."""


class StacksStatus(CommandModel):
    """Where a stack stands on its devices: counts by state over every device, and rows.

    Without ``limit`` every row comes back in one reply, as before paging existed: past a
    few thousand devices that reply is over the message limit (``too_large``). With it,
    one page of rows in device id order, after the device ``after`` (the previous page's
    ``next``), only of the ``states`` given (none: every state)."""

    kind: Literal["stacks.status"] = "stacks.status"
    name: str
    after: str | None = Field(default=None, max_length=256, exclude_if=lambda v: v is None)
    limit: int | None = Field(default=None, ge=0, le=STATUS_PAGE_MAX, exclude_if=lambda v: v is None)
    states: tuple[str, ...] = Field(default=(), max_length=16, exclude_if=lambda v: not v)


class StacksShow(CommandModel):
    """The Compose file of a stack's current version, or of ``version``."""

    kind: Literal["stacks.show"] = "stacks.show"
    name: str
    version: int | None = Field(default=None, ge=1, le=MAX_ID)


class StacksRemove(CommandModel):
    kind: Literal["stacks.rm"] = "stacks.rm"
    name: str


class JobsRun(CommandModel):
    """Run a job once on every device of a group."""

    kind: Literal["jobs.run"] = "jobs.run"
    name: str
    group: str
    command: tuple[str, ...]
    image: str | None = None
    timeout_s: float = Field(default=300.0, gt=0, le=MAX_TIMEOUT_S)


class JobsSchedule(CommandModel):
    """Run a job on a schedule (cron or interval), evaluated on each device of a group."""

    kind: Literal["jobs.schedule"] = "jobs.schedule"
    name: str
    group: str
    command: tuple[str, ...]
    cron: str | None = None
    every_s: float | None = Field(default=None, ge=MIN_JOB_INTERVAL_S, le=MAX_JOB_INTERVAL_S)
    image: str | None = None
    timeout_s: float = Field(default=300.0, gt=0, le=MAX_TIMEOUT_S)
    concurrency: Literal["skip", "queue"] = "skip"


class JobsList(CommandModel):
    kind: Literal["jobs.ls"] = "jobs.ls"


class JobsStatus(CommandModel):
    kind: Literal["jobs.status"] = "jobs.status"
    name: str


class JobsLogs(CommandModel):
    kind: Literal["jobs.logs"] = "jobs.logs"
    name: str
    device_id: str | None = None
    limit: int = Field(default=10, ge=1, le=200)


class JobsRemove(CommandModel):
    kind: Literal["jobs.rm"] = "jobs.rm"
    name: str


class DeploymentsList(CommandModel):
    kind: Literal["deployments.ls"] = "deployments.ls"
    stack: str | None = None


class DeploymentsStatus(CommandModel):
    """A deployment with each device's progress; counts by state over every device.

    Paged as ``stacks.status`` is: without ``limit`` every device in one reply (past some
    20,000 devices over the message limit: ``too_large``); with it, one page of devices in
    id order, after the device ``after`` (the previous page's ``next``), only of the rollout
    ``states`` given (none: every state)."""

    kind: Literal["deployments.status"] = "deployments.status"
    id: int = Field(ge=1, le=MAX_ID)
    after: str | None = Field(default=None, max_length=256, exclude_if=lambda v: v is None)
    limit: int | None = Field(default=None, ge=0, le=STATUS_PAGE_MAX, exclude_if=lambda v: v is None)
    states: tuple[str, ...] = Field(default=(), max_length=16, exclude_if=lambda v: not v)


class DeploymentsEvents(CommandModel):
    """What the devices of a deployment said about it, per device in order: the agents'
    events about the stack (downloads, services created, restarted, healthy, unhealthy,
    failed) and their warnings and errors, from the deployment's start until the next one."""

    kind: Literal["deployments.events"] = "deployments.events"
    id: int = Field(ge=1, le=MAX_ID)
    device_id: str | None = None
    """One device of the deployment; else up to ``devices`` of them, those not healthy first."""
    devices: int = Field(default=10, ge=1, le=100)


class DeploymentsAction(CommandModel):
    """Pause, resume, promote, switch (a staged deployment) or roll back a deployment."""

    kind: Literal[
        "deployments.pause",
        "deployments.resume",
        "deployments.promote",
        "deployments.switch",
        "deployments.rollback",
    ]
    id: int = Field(ge=1, le=MAX_ID)


NotifyKind = Literal[
    "device.offline",
    "device.online",
    "device.pending",
    "device.disk_low",
    "service.crashloop",
    "download.stuck",
    "job.result",
    "deployment.started",
    "deployment.succeeded",
    "deployment.failed",
    "deployment.reverted",
    "deployment.paused",
]
"""The fleet events a webhook may be told of (docs/notifications.md)."""
NOTIFY_KINDS: tuple[str, ...] = get_args(NotifyKind)
MAX_WEBHOOKS = 100


class NotifyAdd(CommandModel):
    """A webhook: ``url`` (http or https) is told of the fleet events ``on``.

    ``sealed``: the signing secret, a sealed box to the controller's key (``vars.key``)
    holding ``{"secret": ...}``; never shown again. ``offline_after_s``: how long a device
    stays offline before ``device.offline`` fires (and ``device.online`` once it is back).
    """

    kind: Literal["notify.add"] = "notify.add"
    url: str = Field(min_length=1, max_length=2048)
    on: tuple[NotifyKind, ...] = Field(min_length=1)
    offline_after_s: float = Field(default=300.0, ge=0, le=MAX_TIMEOUT_S)
    format: Literal["json", "slack"] = "json"
    sealed: str | None = Field(default=None, min_length=1, max_length=8192)
    window_s: float = Field(default=30.0, ge=1, le=DAY_S)
    """Past 3 messages of one kind within this window, the rest of the window's are summed up in one."""


class NotifyList(CommandModel):
    """Every webhook (never its secret) with its deliveries' counts."""

    kind: Literal["notify.ls"] = "notify.ls"


class NotifyRemove(CommandModel):
    kind: Literal["notify.rm"] = "notify.rm"
    id: str = Field(min_length=1, max_length=64)


class NotifyTest(CommandModel):
    """Queue a ``test`` delivery to a webhook (sent like any other: signed, retried)."""

    kind: Literal["notify.test"] = "notify.test"
    id: str = Field(min_length=1, max_length=64)


class NotifyLog(CommandModel):
    """The newest deliveries (of one webhook, or all)."""

    kind: Literal["notify.log"] = "notify.log"
    id: str | None = Field(default=None, max_length=64)
    limit: int = Field(default=50, ge=1, le=1000)


UserRole = Literal["viewer", "operator", "admin"]


class UsersAdd(CommandModel):
    """A new user with a new random password (in the result, shown once)."""

    kind: Literal["users.add"] = "users.add"
    name: str = Field(max_length=64)
    role: UserRole


class UsersList(CommandModel):
    kind: Literal["users.ls"] = "users.ls"


class UsersRemove(CommandModel):
    """Remove a user, its API tokens and its broker credential (its connections are closed)."""

    kind: Literal["users.rm"] = "users.rm"
    name: str = Field(max_length=64)


class UsersPasswd(CommandModel):
    """A user's new password: random (in the result, shown once), or the user's own choice,
    ``sealed`` to the controller's key (``vars.key``) as the JSON object ``{"password": ...}``
    (it never travels in plaintext); ``role``: also change its role."""

    kind: Literal["users.passwd"] = "users.passwd"
    name: str = Field(max_length=64)
    role: UserRole | None = None
    sealed: str | None = Field(default=None, min_length=1, max_length=8192)


class UsersToken(CommandModel):
    """A new API token of a user (in the result, shown once): at most ``scope``'s rights,
    valid ``expires_s`` seconds (None: until revoked)."""

    kind: Literal["users.token"] = "users.token"
    name: str = Field(max_length=64)
    scope: UserRole = "admin"
    expires_s: float | None = Field(default=None, gt=0, le=10 * 365 * 86400)


class UsersTokens(CommandModel):
    """The API tokens (never their secrets), of one user or all."""

    kind: Literal["users.tokens"] = "users.tokens"
    name: str | None = Field(default=None, max_length=64)


class UsersRevoke(CommandModel):
    """Revoke an API token (by its id)."""

    kind: Literal["users.revoke"] = "users.revoke"
    token_id: str = Field(max_length=64)


class AuditList(CommandModel):
    """Audit records at or after ``since`` (seconds since the epoch), of one ``user`` or all, newest ``limit``."""

    kind: Literal["audit.ls"] = "audit.ls"
    since: float = Field(default=0.0, ge=0)
    user: str | None = Field(default=None, max_length=64)
    limit: int = Field(default=1000, ge=1, le=10_000)


Command: Any = Annotated[Union[tuple(COMMANDS)], Field(discriminator="kind")]  # noqa: UP007
"""Any command, told apart by ``kind``."""
# Built on first use (see WireModel): a CLI call never validates an arbitrary command.
COMMAND_ADAPTER: TypeAdapter[Any] = TypeAdapter(Command, config=ConfigDict(defer_build=True))
