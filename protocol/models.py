"""Wire models: every payload Tether puts on MQTT, as frozen pydantic models.

Rules (see docs/topics.md):

* Every message carries ``v``, the schema version (:data:`SCHEMA_VERSION`). A receiver
  accepts any ``v`` >= 1 of the same topic tree and ignores fields it does not know, so an
  old agent survives a newer controller. Breaking changes get a new topic tree (``tether/v2``).
* Desired state carries a monotonic ``generation``; reported state names the generation it
  has applied. Receivers drop anything not newer than what they hold, so duplicates and
  out-of-order deliveries (QoS 1 allows both) are harmless.
* A stack's definition is content-addressed: :func:`content_hash` of its :class:`StackSpec`
  names a retained topic; desired states only reference it.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from functools import cached_property
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import names

SCHEMA_VERSION = 1

NAME_PATTERN = names.NAME.pattern
"""Stack, service and group names: lower case, usable in container names and topics."""


class WireModel(BaseModel):
    """Base of every wire model: immutable, tolerant of unknown fields.

    Each model's validator and serializer are built when first used, not on import: a CLI
    call uses a few of these models and paid 50 ms for building them all (docs/performance.md,
    "Sixth pass: the CLI"); a first build is thread safe (pydantic 2.14)."""

    model_config = ConfigDict(frozen=True, extra="ignore", defer_build=True)


MAX_COUNTER = 2**53 - 1
"""The largest generation, session number or event sequence number on the wire.

Each of these counts up by one from a small number, so a value beyond this (the largest
integer a double holds exactly) is forged or corrupt; refusing it at decoding keeps it out
of the agent's state and of the controller's 64-bit database columns."""


class Message(WireModel):
    """A top-level payload: carries the schema version."""

    v: int = Field(default=SCHEMA_VERSION, ge=1)


def content_hash(model: BaseModel) -> str:
    """SHA-256 of a canonical JSON rendering of ``model``: equal content, equal hash."""
    return _sha256(_canonical(model.model_dump(mode="json")))


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"))
"""What ``json.dumps(data, sort_keys=True, separators=(",", ":"))`` makes per call (stateless)."""


def _canonical(data: Any) -> str:
    return _CANONICAL.encode(data)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- stack specification ------------------------------------------------------------------


class HashedModel(WireModel):
    """A wire model whose content hash is computed once per (immutable) instance."""

    @cached_property
    def _content_hash(self) -> str:
        return content_hash(self)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("_content_hash", None)  # a copy with other content has another hash
        return copied


class PortSpec(WireModel):
    """A published port: ``host_ip:host -> container/protocol``."""

    container: int = Field(ge=1, le=65535)
    host: int | None = Field(default=None, ge=1, le=65535)
    host_ip: str | None = None
    protocol: Literal["tcp", "udp"] = "tcp"


MAX_STACK_FILES = 500
"""Most files shipped with one stack."""
MAX_STACK_FILE_BYTES = 1024 * 1024
"""Most bytes (before base64) shipped with one stack: definitions stay well under the 4 MiB
payload bound of every receiver."""


def stack_path_problem(path: str) -> str | None:
    """Why ``path`` is not a path inside a stack's directory (None if it is): relative,
    ``/``-separated, no empty, ``.`` or ``..`` part, no NUL; ``"."`` is the directory itself."""
    if path == ".":
        return None
    if not path or len(path) > 1024 or "\x00" in path or path.startswith("/"):
        return "must be a relative path"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "must not have empty, '.' or '..' parts"
    return None


def _unset(value: Any) -> bool:
    """Fields added after schema v1 are left out of payloads (and content hashes) while unset,
    so the hash of a stack written before they existed does not change."""
    return not value


class VolumeSpec(WireModel):
    """A bind mount (absolute host path), a named volume, an anonymous volume (``volume`` with
    an empty ``source``: the service's own, kept across updates), a ``tmpfs`` (``source``
    empty), or (``stack``) a path in the stack's own directory on the device (a relative bind
    mount in Compose: ``./data``).

    For ``stack``, ``digest`` (absent when nothing is shipped there) is the SHA-256 of the
    files shipped under ``source`` (:attr:`StackSpec.files`), so the service is replaced
    when they change; the agent renders ``source`` to the absolute path on the device."""

    type: Literal["bind", "volume", "stack", "tmpfs"]
    source: str
    target: str
    read_only: bool = False
    digest: str | None = Field(default=None, exclude_if=lambda v: not v)
    propagation: str | None = Field(default=None, exclude_if=_unset)
    """Bind mounts: rprivate, private, rshared, shared, rslave or slave."""
    selinux: Literal["z", "Z"] | None = Field(default=None, exclude_if=_unset)
    strict: bool = Field(default=False, exclude_if=_unset)
    """Bind mounts: the host path must exist (Compose's ``create_host_path: false``); by
    default a missing one is created as a directory, as ``docker run -v`` does."""
    nocopy: bool = Field(default=False, exclude_if=_unset)
    subpath: str | None = Field(default=None, exclude_if=_unset)
    tmpfs_size: int | None = Field(default=None, ge=0, exclude_if=_unset)
    tmpfs_mode: int | None = Field(default=None, ge=0, le=0o7777, exclude_if=_unset)

    @model_validator(mode="after")
    def _stack_source(self) -> Self:
        if self.type == "stack" and not self.source.startswith("/"):  # absolute once rendered
            problem = stack_path_problem(self.source)
            if problem is not None:
                raise ValueError(f"stack volume source {self.source[:80]!r} {problem}")
        return self


class HealthcheckSpec(WireModel):
    """A Compose healthcheck, durations in seconds. ``test`` is in Docker's form: ``("NONE",)``
    disables the image's healthcheck; empty keeps the image's test with these timings."""

    test: tuple[str, ...] = Field(default=(), exclude_if=_unset)
    interval_s: float = 30.0
    timeout_s: float = 30.0
    retries: int = 3
    start_period_s: float = 0.0
    start_interval_s: float = Field(default=0.0, ge=0, exclude_if=_unset)


class DeviceMapping(WireModel):
    """A host device made available in a container (``devices``)."""

    source: str = Field(min_length=1, max_length=1024)
    target: str = Field(min_length=1, max_length=1024)
    permissions: str = Field(default="rwm", pattern=r"^[rwm]{1,3}$")


class Ulimit(WireModel):
    name: str = Field(pattern=r"^[a-z]+$")
    soft: int
    hard: int


class GpuRequest(WireModel):
    """A device request (``deploy.resources.reservations.devices``, ``gpus``): GPUs and the like."""

    driver: str | None = None
    count: int | None = None
    """How many devices; -1: all."""
    device_ids: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    options: dict[str, str] = Field(default_factory=dict)


class LoggingSpec(WireModel):
    """A service's log driver and its options (``logging``)."""

    driver: str | None = Field(default=None, min_length=1, max_length=64, exclude_if=_unset)
    """None: the engine's default driver (``logging`` with options only, as docker compose reads it)."""
    options: dict[str, str] = Field(default_factory=dict)


class NetworkAttachment(WireModel):
    """How a service joins one of the stack's networks (``services.X.networks.NET``)."""

    aliases: tuple[str, ...] = Field(default=(), exclude_if=_unset)
    ipv4_address: str | None = Field(default=None, exclude_if=_unset)
    ipv6_address: str | None = Field(default=None, exclude_if=_unset)
    mac_address: str | None = Field(default=None, exclude_if=_unset)
    priority: int = Field(default=0, exclude_if=_unset)


DependencyCondition = Literal["service_started", "service_healthy", "service_completed_successfully"]


class Dependency(WireModel):
    """A ``depends_on`` entry that asks for more than "started first"."""

    condition: DependencyCondition = "service_started"
    restart: bool = Field(default=False, exclude_if=_unset)
    """Replace this service when the dependency is replaced."""
    required: bool = True
    """False: do not wait for a dependency that failed or is missing."""


class IpamPool(WireModel):
    subnet: str | None = None
    ip_range: str | None = None
    gateway: str | None = None
    aux_addresses: dict[str, str] = Field(default_factory=dict)


class NetworkSpec(WireModel):
    """A top-level network of the stack. ``external``: an existing network, used by ``name``."""

    name: str | None = Field(default=None, exclude_if=_unset)
    external: bool = Field(default=False, exclude_if=_unset)
    driver: str | None = Field(default=None, exclude_if=_unset)
    driver_opts: dict[str, str] = Field(default_factory=dict, exclude_if=_unset)
    internal: bool = Field(default=False, exclude_if=_unset)
    attachable: bool = Field(default=False, exclude_if=_unset)
    enable_ipv6: bool = Field(default=False, exclude_if=_unset)
    ipam_driver: str | None = Field(default=None, exclude_if=_unset)
    ipam_config: tuple[IpamPool, ...] = Field(default=(), exclude_if=_unset)
    ipam_options: dict[str, str] = Field(default_factory=dict, exclude_if=_unset)
    labels: dict[str, str] = Field(default_factory=dict, exclude_if=_unset)


class VolumeOptions(WireModel):
    """A top-level named volume's options. ``external``: an existing volume, used by ``name``;
    ``name``: the engine's name for it (else ``tether-{device}-{stack}-{volume}``)."""

    name: str | None = Field(default=None, exclude_if=_unset)
    external: bool = Field(default=False, exclude_if=_unset)
    driver: str | None = Field(default=None, exclude_if=_unset)
    driver_opts: dict[str, str] = Field(default_factory=dict, exclude_if=_unset)
    labels: dict[str, str] = Field(default_factory=dict, exclude_if=_unset)


RestartPolicy = Literal["no", "always", "on-failure", "unless-stopped"]
ChangeMode = Literal["restart", "signal", "noop"]

CONFIG_NAME_PATTERN = names.CONFIG_NAME.pattern


class ConfigMount(WireModel):
    """A config file of the stack (``configs`` in Compose) mounted into a service.

    The file is rendered on the device from the stack's template (``${var:...}`` replaced
    with variable values, secrets decrypted there). ``change_mode`` says what a changed
    file does to a running service: ``restart`` (replaced), ``signal`` (sent
    ``change_signal``), ``noop`` (read on its next start). ``host_path`` and ``digest`` are
    set by the agent when it renders (never sent by the controller).
    """

    source: str = Field(pattern=CONFIG_NAME_PATTERN)
    target: str = Field(min_length=1, max_length=1024)
    mode: int = Field(default=0o444, ge=0, le=0o777)
    change_mode: ChangeMode = "restart"
    change_signal: str = Field(default="SIGHUP", pattern=names.SIGNAL.pattern)
    host_path: str | None = Field(default=None, exclude_if=_unset)
    digest: str | None = Field(default=None, exclude_if=_unset)


class ServiceSpec(HashedModel):
    """One service of a stack, normalised from Compose."""

    name: str = Field(pattern=NAME_PATTERN)
    image: str | None = None
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    ports: tuple[PortSpec, ...] = ()
    volumes: tuple[VolumeSpec, ...] = ()
    restart: RestartPolicy = "no"
    network_mode: str = Field(
        default="bridge", pattern=r"^(bridge|host|none|service:[a-z0-9][a-z0-9_.-]{0,62})$"
    )
    """``bridge``: the stack's networks (``networks``); ``host``; ``none``; ``service:NAME``."""
    labels: dict[str, str] = Field(default_factory=dict)
    healthcheck: HealthcheckSpec | None = None
    depends_on: tuple[str, ...] = ()
    stop_grace_period_s: float = Field(default=10.0, ge=0)
    configs: tuple[ConfigMount, ...] = Field(default=(), exclude_if=_unset)
    # Added with issue 14 (docs/compose.md says how each is honoured); left out while unset.
    dependencies: dict[str, Dependency] = Field(default_factory=dict, exclude_if=_unset)
    """``depends_on`` entries with a condition other than ``service_started``, ``restart`` or
    ``required: false`` (their names are in ``depends_on`` too)."""
    container_name: str | None = Field(default=None, exclude_if=_unset)
    """A name the stack's other services resolve (a network alias); the container itself keeps
    Tether's name, so two devices or stacks on one engine cannot collide."""
    hostname: str | None = Field(default=None, exclude_if=_unset)
    domainname: str | None = Field(default=None, exclude_if=_unset)
    user: str | None = Field(default=None, exclude_if=_unset)
    working_dir: str | None = Field(default=None, exclude_if=_unset)
    networks: dict[str, NetworkAttachment] = Field(default_factory=dict, exclude_if=_unset)
    """The stack networks the service joins (empty: ``default``, the stack's own network)."""
    links: dict[str, str] = Field(default_factory=dict, exclude_if=_unset)
    """Service to the alias it is known by in this service."""
    expose: tuple[str, ...] = Field(default=(), exclude_if=_unset)
    privileged: bool = Field(default=False, exclude_if=_unset)
    read_only: bool = Field(default=False, exclude_if=_unset)
    init: bool = Field(default=False, exclude_if=_unset)
    tty: bool = Field(default=False, exclude_if=_unset)
    stdin_open: bool = Field(default=False, exclude_if=_unset)
    cap_add: tuple[str, ...] = Field(default=(), exclude_if=_unset)
    cap_drop: tuple[str, ...] = Field(default=(), exclude_if=_unset)
    security_opt: tuple[str, ...] = Field(default=(), exclude_if=_unset)
    devices: tuple[DeviceMapping, ...] = Field(default=(), exclude_if=_unset)
    device_cgroup_rules: tuple[str, ...] = Field(default=(), exclude_if=_unset)
    group_add: tuple[str, ...] = Field(default=(), exclude_if=_unset)
    tmpfs: dict[str, str] = Field(default_factory=dict, exclude_if=_unset)
    """Target path to tmpfs mount options (``size=64m,mode=1777``)."""
    dns: tuple[str, ...] = Field(default=(), exclude_if=_unset)
    dns_search: tuple[str, ...] = Field(default=(), exclude_if=_unset)
    dns_opt: tuple[str, ...] = Field(default=(), exclude_if=_unset)
    extra_hosts: tuple[str, ...] = Field(default=(), exclude_if=_unset)
    """``host:address`` entries for /etc/hosts."""
    sysctls: dict[str, str] = Field(default_factory=dict, exclude_if=_unset)
    shm_size: int | None = Field(default=None, ge=0, exclude_if=_unset)
    stop_signal: str | None = Field(default=None, pattern=r"^SIG[A-Z0-9+-]+$", exclude_if=_unset)
    platform: str | None = Field(default=None, exclude_if=_unset)
    pid: str | None = Field(default=None, exclude_if=_unset)
    """``host``, or ``service:NAME`` (another service of the stack)."""
    ipc: str | None = Field(default=None, exclude_if=_unset)
    """``host``, ``private``, ``shareable``, ``none`` or ``service:NAME``."""
    userns_mode: str | None = Field(default=None, exclude_if=_unset)
    cgroup: str | None = Field(default=None, exclude_if=_unset)
    runtime: str | None = Field(default=None, exclude_if=_unset)
    mac_address: str | None = Field(default=None, exclude_if=_unset)
    mem_limit: int | None = Field(default=None, ge=0, exclude_if=_unset)
    mem_reservation: int | None = Field(default=None, ge=0, exclude_if=_unset)
    memswap_limit: int | None = Field(default=None, ge=-1, exclude_if=_unset)
    mem_swappiness: int | None = Field(default=None, ge=0, le=100, exclude_if=_unset)
    oom_kill_disable: bool = Field(default=False, exclude_if=_unset)
    oom_score_adj: int | None = Field(default=None, ge=-1000, le=1000, exclude_if=_unset)
    cpus: float | None = Field(default=None, ge=0, exclude_if=_unset)
    cpu_shares: int | None = Field(default=None, ge=0, exclude_if=_unset)
    cpu_period: int | None = Field(default=None, ge=0, exclude_if=_unset)
    cpu_quota: int | None = Field(default=None, ge=-1, exclude_if=_unset)
    cpuset: str | None = Field(default=None, exclude_if=_unset)
    pids_limit: int | None = Field(default=None, ge=-1, exclude_if=_unset)
    ulimits: tuple[Ulimit, ...] = Field(default=(), exclude_if=_unset)
    gpus: tuple[GpuRequest, ...] = Field(default=(), exclude_if=_unset)
    logging: LoggingSpec | None = Field(default=None, exclude_if=_unset)
    """None: the agent's rotating default (json-file, a few MB), never an unbounded log."""
    restart_max_attempts: int | None = Field(default=None, ge=0, exclude_if=_unset)
    """``deploy.restart_policy.max_attempts``: give up after this many restarts."""

    def spec_hash(self) -> str:
        """Content hash of this service: a container is replaced when it changes."""
        return self._content_hash


class StackFile(WireModel):
    """A file shipped with a stack (beside the Compose file, bind-mounted by a service):
    written to ``path`` in the stack's directory on the device, ``data`` base64-encoded."""

    path: str
    data: str
    mode: int = Field(default=0o644, ge=0, le=0o777)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        problem = stack_path_problem(value)
        if problem is not None or value == ".":
            raise ValueError(f"file path {value[:80]!r} {problem or 'must name a file'}")
        return value

    def content(self) -> bytes:
        """The file's bytes."""
        return base64.b64decode(self.data, validate=True)


class StackSpec(HashedModel):
    """A whole stack: services in start order (dependencies first) and named volumes."""

    services: tuple[ServiceSpec, ...]
    volumes: tuple[str, ...] = ()
    configs: dict[str, str] = Field(default_factory=dict, exclude_if=_unset)
    """Config file templates by name (``configs`` in Compose), rendered on the device. Compose
    ``secrets`` are here too, named ``secret.NAME`` (mounted at ``/run/secrets/NAME``)."""
    files: tuple[StackFile, ...] = Field(default=(), max_length=MAX_STACK_FILES, exclude_if=_unset)
    """Files shipped with the stack, for its ``stack`` volumes (sorted by path)."""
    networks: dict[str, NetworkSpec] = Field(default_factory=dict, exclude_if=_unset)
    """Top-level networks (``default`` is the stack's own network, options or not)."""
    volume_options: dict[str, VolumeOptions] = Field(default_factory=dict, exclude_if=_unset)
    """Options of the named volumes in ``volumes`` that have any."""

    def spec_hash(self) -> str:
        """Content hash of the stack: names its definition topic."""
        return self._content_hash

    @cached_property
    def _content_hash(self) -> str:
        # content_hash(self), from one dump: each service's canonical JSON is the stack's JSON
        # for that element (sorted keys, no spaces), so the services' hashes come on the way.
        data = self.model_dump(mode="json")
        parts = []
        for service, dumped in zip(self.services, data["services"], strict=True):
            text = _canonical(dumped)
            service.__dict__.setdefault("_content_hash", _sha256(text))
            parts.append(text)
        data["services"] = None
        head, _, tail = _canonical(data).partition('"services":null')
        return _sha256(f'{head}"services":[{",".join(parts)}]{tail}')

    def service(self, name: str) -> ServiceSpec | None:
        """The service called ``name``, if any."""
        return self._by_name.get(name)

    @cached_property
    def _by_name(self) -> dict[str, ServiceSpec]:
        # The agent looks services up by name several times per service and reconcile.
        found: dict[str, ServiceSpec] = {}
        for s in self.services:
            found.setdefault(s.name, s)
        return found

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        copied = super().model_copy(update=update, deep=deep)
        copied.__dict__.pop("_by_name", None)  # a copy may have other services
        return copied


class StackDefinition(Message):
    """Payload of ``tether/v1/stacks/{spec_hash}``: the spec, sent once for all devices."""

    spec_hash: str
    spec: StackSpec


# --- device state -------------------------------------------------------------------------


class StackRef(WireModel):
    """A stack a device should run: its deployment name and the hash of its definition."""

    name: str = Field(pattern=NAME_PATTERN)
    spec_hash: str = Field(pattern=names.SPEC_HASH.pattern)


class JobSpec(WireModel):
    """An edge job: a command (process driver) or an image + command (docker driver).

    Exactly one trigger: ``run_id`` (run once per id), ``cron`` (a 5-field cron expression,
    evaluated on the device in UTC, so it runs while offline) or ``every_s`` (an interval).
    """

    name: str = Field(pattern=NAME_PATTERN)
    command: tuple[str, ...]
    image: str | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    run_id: str | None = None
    cron: str | None = None
    every_s: float | None = Field(default=None, gt=0)
    timeout_s: float = Field(default=300.0, gt=0)
    concurrency: Literal["skip", "queue"] = "skip"


VAR_REF_PATTERN = names.VAR_REF.pattern
"""``PATH/KEY`` as in ``${var:PATH/KEY}``: a variable's path and one of its keys."""


class VarBinding(WireModel):
    """The value one of a device's stacks gets for a ``${var:PATH/KEY}`` reference.

    Exactly one of ``value`` (a plain variable), ``sealed`` (a secret: a sealed box to this
    device's public key, base64; only the device can open it) or ``error`` (why there is no
    value: not set, or no public key known for the device yet). ``digest`` changes when the
    value does (a keyed MAC, so it says nothing about the value).
    """

    stack: str = Field(pattern=NAME_PATTERN)
    ref: str = Field(pattern=VAR_REF_PATTERN)
    digest: str = ""
    value: str | None = None
    sealed: str | None = None
    error: str | None = None


class RegistryAuth(WireModel):
    """Credentials for one image registry (``tether registries add``), for this device only.

    ``sealed`` is a sealed box to the device's public key (base64) of the JSON object
    ``{"username": ..., "password": ...}``: neither travels or rests in plain. ``host`` is
    the registry as image references name it (``registry.example:5000``; ``docker.io`` for
    Docker Hub). ``digest`` changes when the credentials do (a keyed MAC). ``error`` says
    why there is no sealed box (the device has not announced its public key yet).
    """

    host: str = Field(min_length=1, max_length=255)
    digest: str = ""
    sealed: str | None = None
    error: str | None = None


class DesiredState(Message):
    """Payload of ``.../desired``: everything one device should run, at one generation.

    ``stage`` names stack versions to download only (``tether stacks deploy --stage-only``):
    the agent fetches their definitions and images and runs nothing of them until a later
    generation moves them into ``stacks``.
    """

    device_id: str
    generation: int = Field(ge=0, le=MAX_COUNTER)
    stacks: tuple[StackRef, ...] = ()
    jobs: tuple[JobSpec, ...] = ()
    vars: tuple[VarBinding, ...] = Field(default=(), exclude_if=_unset)
    stage: tuple[StackRef, ...] = Field(default=(), exclude_if=_unset)
    registries: tuple[RegistryAuth, ...] = Field(default=(), exclude_if=_unset)
    issued_at: float = 0.0


ServiceState = Literal["pending", "starting", "running", "restarting", "exited", "failed", "removing"]
HealthState = Literal["starting", "healthy", "unhealthy"]


class ServiceStatus(WireModel):
    """What one service is doing on the device."""

    state: ServiceState
    spec_hash: str | None = None
    health: HealthState | None = None
    exit_code: int | None = None
    restarts: int = 0
    last_error: str | None = None
    log_tail: str | None = None
    health_output: str | None = Field(default=None, exclude_if=_unset)
    """The output of the last failing health check, while the service is not healthy."""


class StackStatus(WireModel):
    """What one stack is doing on the device. ``state`` summarises its services."""

    spec_hash: str
    state: Literal["converging", "running", "failed", "removing"]
    services: dict[str, ServiceStatus] = Field(default_factory=dict)


class ImageDownload(WireModel):
    """One image of a version being downloaded: bytes on the device and in all (None: not known yet)."""

    image: str
    done: int = Field(default=0, ge=0)
    total: int | None = Field(default=None, ge=0)


DownloadState = Literal["downloading", "retrying", "staged", "failed"]


class DownloadStatus(WireModel):
    """The images of one stack version being fetched while the current version keeps running.

    ``downloading`` (bytes moving), ``retrying`` (a transient error, ``reason``; retried
    with backoff), ``staged`` (every image is on the device, not switched yet: held, or
    staged only), ``failed`` (a permanent error, ``reason`` in the registry's words).
    ``rate`` in bytes/s; ``eta_s`` in seconds.
    """

    spec_hash: str
    state: DownloadState
    done: int = Field(default=0, ge=0)
    total: int | None = Field(default=None, ge=0)
    rate: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    eta_s: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    reason: str | None = None
    images: tuple[ImageDownload, ...] = ()


class ReportedState(Message):
    """Payload of ``.../reported``: what the agent has applied and observes.

    ``downloads`` (by stack name): stack versions whose images are being fetched (or are
    staged), until that version runs.
    """

    device_id: str
    generation: int = Field(ge=-1, le=MAX_COUNTER)
    stacks: dict[str, StackStatus] = Field(default_factory=dict)
    error: str | None = None
    held: bool = False
    events_dropped: int = 0
    downloads: dict[str, DownloadStatus] = Field(default_factory=dict, exclude_if=_unset)
    storage_error: str | None = Field(default=None, exclude_if=_unset)
    """The agent cannot write its data directory (a full disk, a read-only file system): it
    runs from memory meanwhile. Names the path, the error and the bytes free."""
    at: float = Field(default=0.0, allow_inf_nan=False)
    """Finite, as ``rate`` and ``eta_s`` of its downloads: the controller stores a report as
    JSON, where pydantic writes an infinity or NaN as null, which it does not read back (one
    device's report made the stored fleet unreadable)."""


class DeviceFacts(WireModel):
    """What an agent tells about its device when it comes online."""

    agent_version: str
    driver: str
    arch: str
    os: str
    hostname: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    # Host facts (absent from older agents; the live values: the device's `facts` request).
    kernel: str | None = None
    cpu_count: int | None = None
    cpu_model: str | None = None
    memory_total: int | None = None
    disk_total: int | None = None
    docker_version: str | None = None
    addresses: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    public_key: str | None = None
    """The device's X25519 public key (base64): secrets are sealed to it."""
    keepalive: int | None = Field(default=None, exclude_if=_unset)
    """The agent's MQTT keepalive in seconds: how long it may stay silent before it counts as
    gone (the controller's allowance after a restart; absent from older agents)."""


class Presence(Message):
    """Payload of ``.../presence``: ``online`` on connect, ``offline`` as the last will.

    ``session`` increases with every connection of the agent, so a will from an older
    connection that arrives late never overrides a newer ``online``.
    """

    device_id: str
    status: Literal["online", "offline"]
    session: int = Field(ge=0, le=MAX_COUNTER)
    facts: DeviceFacts | None = None
    at: float = Field(default=0.0, allow_inf_nan=False)
    """Finite (as :attr:`ReportedState.at`)."""


class Event(Message):
    """Payload of ``.../events``: something worth telling an operator.

    ``seq`` increases per device and survives agent restarts: events are delivered at
    least once (queued on disk while offline), receivers drop a ``seq`` they have seen.
    """

    device_id: str
    seq: int = Field(default=0, ge=0, le=MAX_COUNTER)
    kind: str
    message: str
    level: Literal["info", "warning", "error"] = "info"
    stack: str | None = None
    service: str | None = None
    data: dict[str, Any] | None = None
    at: float = Field(default=0.0, allow_inf_nan=False)
    """Finite: the controller stores an event as JSON, where pydantic writes an infinity or
    NaN as null, which it does not read back (as :attr:`ReportedState.at`)."""
    oldest: int = Field(default=0, ge=0, exclude_if=_unset)
    """The oldest event the device still queued when it sent this one: every ``seq`` below
    it was acknowledged by the controller or dropped, and will not come (0: not told)."""
    spec_hash: str | None = Field(default=None, pattern=names.SPEC_HASH.pattern, exclude_if=_unset)
    """The stack version (:class:`StackRef` ``spec_hash``) an event about a stack is about:
    how the controller ties a device's events to a deployment (absent from older agents)."""


class EventsAcked(Message):
    """Payload of ``.../acked`` (retained, controller -> agent): which events are stored.

    The agent keeps each event in its outbox until ``seq`` covers it (not merely until the
    broker has it: a broker that lost its state, or a controller not subscribed at that
    moment, would lose it), and sends again at once those it delivered with a ``seq`` below
    ``last`` that ``seq`` does not cover (they got lost on the way: a later one arrived), or
    every one it delivered when ``resend`` is set.
    """

    device_id: str
    seq: int = Field(ge=0)
    """Every event up to this one is stored (or will never come: see ``Event.oldest``)."""
    last: int = Field(default=0, ge=0)
    """The highest ``seq`` stored."""
    resend: bool = False
    """The controller was not subscribed for a while (it started, or the broker lost its
    session): what was delivered and is not covered by ``seq`` may be lost; send it again."""


class JobResult(WireModel):
    """One run of a job, carried as the ``data`` of a ``job.result`` event."""

    job: str
    run: str
    started: float = Field(allow_inf_nan=False)
    duration_s: float = Field(allow_inf_nan=False)
    """Both finite: a job's results are stored as JSON (see :attr:`Event.at`)."""
    exit_code: int | None = None
    timed_out: bool = False
    skipped: bool = False
    output: str = ""


# --- enrollment (docs/onboarding.md) -------------------------------------------------------


class EnrollmentRequest(Message):
    """Payload on ``enroll/{device_id}/request``: a new device asks to join the fleet.

    ``token`` is the fleet enrollment token (only the controller can read this topic);
    ``public_key`` the device's X25519 public key (base64, 32 bytes): the controller seals
    its answer to it.
    """

    device_id: str
    token: str = Field(min_length=1, max_length=256)
    public_key: str = Field(min_length=1, max_length=128)
    facts: DeviceFacts


class EnrollmentResponse(Message):
    """Payload on ``enroll/{device_id}/response`` (retained): ``sealed`` is a libsodium sealed
    box (base64) to the device's public key holding an :class:`EnrollmentGrant`."""

    device_id: str
    sealed: str


class EnrollmentGrant(WireModel):
    """What only the enrolling device can read: approved (with its credentials) or rejected."""

    device_id: str
    status: Literal["approved", "rejected"]
    username: str | None = None
    password: str | None = None
    message: str = ""


# --- request / response (MQTT 3.1.1: reply topic and correlation id ride in the payload) ---
# The controller's commands are in tether.protocol.commands (the agent never loads them).


class Request(Message):
    """Payload on ``tether/v1/controller/requests``.

    ``command`` is validated separately (see :data:`COMMAND_ADAPTER`) so that a request with
    an unknown or malformed command can still be answered on ``reply_to``.
    """

    id: str = Field(min_length=1, max_length=128)
    reply_to: str
    command: dict[str, Any]


class Reply(Message):
    """Payload on a client's reply topic: ``result`` when ``ok``, else ``error``."""

    id: str
    ok: bool
    result: Any = None
    error: str | None = None
    code: str | None = Field(default=None, exclude_if=_unset)
    """Why it failed, for programs (an :class:`~.errors.ErrorCode`; absent from older controllers)."""
