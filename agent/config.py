"""Agent configuration: one TOML file, environment variables and flags, in that order of
increasing precedence. The same file can be baked into every device image of a batch.

    # /etc/tether/agent.toml
    brokers = ["mqtt://10.0.0.5:1883", "mqtt://backup.example:1883"]
    device_id = "pi-042"          # default: the host name
    data_dir = "/var/lib/tether-agent"
    driver = "docker"             # or "process"
    keepalive = 60                # seconds
    reconcile_interval = 10       # seconds
    metrics_interval = 300        # seconds between metric samples (default: 300, or 2 keepalives); 0: none
    metrics_full_interval = 900   # a full sample at least this often (seconds)
    metrics_threshold = 5         # send a value when it moved more than this (% points)
    username = "pi-042"           # broker credentials (`tether devices credentials ID`); default:
    password = "..."              #   {data_dir}/credentials.json if it exists
    ca_file = "/etc/tether/ca.pem" # with mqtts:// brokers: the CA to verify them with
    tls_cert = "/etc/tether/pi-042.pem"  # a client certificate, if the broker requires one (mTLS;
    tls_key = "/etc/tether/pi-042.key"   #   `tether devices credentials ID --cert`): no password then
    enrollment_token = "tet_..."  # without credentials: enroll with this fleet token (docs/onboarding.md)
    download_rate_limit = "2mbit" # image downloads at most this fast (bit/s: kbit, mbit; bytes/s: KB, MB)
    insecure_registries = ["registry.lan:5000"]  # registries spoken to over plain HTTP (loopback always is)
    host_access = "default"       # or "locked", or a [host_access] table (agent/policy.py, docs/compose.md)
    [labels]
    site = "berlin"

Environment: ``TETHER_BROKERS`` (comma-separated), ``TETHER_DEVICE_ID``, ``TETHER_LABELS``
(``k=v,k=v``), ``TETHER_DATA_DIR``, ``TETHER_DRIVER``, ``TETHER_KEEPALIVE``,
``TETHER_RECONCILE_INTERVAL``, ``TETHER_METRICS_INTERVAL``, ``TETHER_METRICS_FULL_INTERVAL``,
``TETHER_METRICS_THRESHOLD``, ``TETHER_USERNAME``, ``TETHER_PASSWORD``, ``TETHER_ENROLLMENT_TOKEN``,
``TETHER_CA_FILE``, ``TETHER_TLS_CERT``, ``TETHER_TLS_KEY``, ``TETHER_DOWNLOAD_RATE_LIMIT``,
``TETHER_HOST_ACCESS`` (a preset),
``TETHER_CONFIG`` (the file).
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tether.protocol import labels as label_rules
from tether.protocol.codec import describe
from tether.protocol.errors import ConfigError, TopicError
from tether.protocol.mqtt import BrokerAddress, parse_broker_url, tls_context
from tether.protocol.secret_files import read_credentials
from tether.protocol.topics import check_device_id

from .policy import HostAccess

CREDENTIALS_FILE = "credentials.json"
"""The agent's own broker credentials in its data dir (0600), e.g. saved after enrollment."""


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/tether-agent")
    return Path.home() / ".local" / "share" / "tether-agent"


def default_device_id() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-.")[:64]
    return name or "device"


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|b|kb|mb|gb)?(?:/s)?\s*\Z", re.IGNORECASE)
_RATE_UNITS = {
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
    "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9,
}  # fmt: skip


def parse_rate(value: str | float) -> float:
    """A rate in bytes/s: a number (bytes/s) or text with a unit (``2mbit``, ``500KB``)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("must be positive")
        return float(value)
    match = _RATE_RE.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{value!r} is not a rate (e.g. 2mbit, 256kbit, 500KB: bytes or bits per second)")
    return float(match.group(1)) * _RATE_UNITS[(match.group(2) or "b").lower()]


DEFAULT_METRICS_INTERVAL = 300.0
"""Seconds between metric samples by default, unless two keepalives are longer."""


class AgentConfig(BaseModel):
    """Validated agent settings. Unknown keys are errors: a typo must not pass silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    brokers: tuple[str, ...] = ("mqtt://127.0.0.1:1883",)
    device_id: str = Field(default_factory=default_device_id)
    labels: dict[str, str] = Field(default_factory=dict)
    data_dir: Path = Field(default_factory=default_data_dir)
    driver: Literal["docker", "process"] = "docker"
    keepalive: int = Field(default=60, ge=5, le=65535)
    reconcile_interval: float = Field(default=10.0, gt=0, le=3600)
    labels_command: str | None = None
    """A shell command printing ``key=value`` lines: dynamic labels, merged over ``labels``."""
    labels_interval: float = Field(default=300.0, gt=0)
    metrics_interval: float | None = Field(default=None, ge=0, le=86400)
    """Seconds between metric samples; 0: none. Default (None): :meth:`metrics_every`."""
    metrics_full_interval: float = Field(default=900.0, gt=0, le=86400)
    metrics_threshold: float = Field(default=5.0, ge=0, le=100)
    username: str | None = None
    password: str | None = Field(default=None, repr=False)
    ca_file: Path | None = None
    """The CA certificate that signed the broker's (``mqtts://``); default: the system's CAs."""
    tls_cert: Path | None = None
    """A client certificate (PEM) whose common name is this device's id, for a broker that
    requires one (``tether up --require-client-cert``); with ``tls_key``."""
    tls_key: Path | None = None
    enrollment_token: str | None = Field(default=None, repr=False)
    """A fleet token: with no credentials yet, the agent enrolls with it (agent/enroll.py)."""
    download_rate_limit: str | float | None = None
    """Image downloads at most this fast (``2mbit``, ``500KB``, a number: bytes/s); None: no limit.
    Keeps a narrow link usable for the workload and the control channel during an update."""
    insecure_registries: tuple[str, ...] = ()
    """Registries (``host:port``) the agent speaks plain HTTP to; loopback registries always."""

    def download_rate(self) -> float | None:
        """The download rate limit in bytes/s, or None."""
        return None if self.download_rate_limit is None else parse_rate(self.download_rate_limit)

    @field_validator("download_rate_limit")
    @classmethod
    def _rate(cls, value: str | float | None) -> str | float | None:
        if value is not None:
            parse_rate(value)
        return value

    host_access: HostAccess = Field(default_factory=HostAccess)
    """What stacks may do to the device itself (privileged, devices, host paths...): agent/policy.py."""

    def metrics_every(self) -> float:
        """Seconds between metric samples: as configured, else 300 s or two keepalives if longer.

        A long keepalive says the link is precious: metrics then stay within the same share
        of the traffic (at most one message per keepalive on average, full samples included).
        """
        if self.metrics_interval is not None:
            return self.metrics_interval
        return max(DEFAULT_METRICS_INTERVAL, 2.0 * self.keepalive)

    def client_cert(self) -> tuple[str, str] | None:
        """(certificate file, key file) to present to the broker, or None."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return str(self.tls_cert), str(self.tls_key)

    def check_tls(self) -> None:
        """Raise :class:`ConfigError` naming a missing or wrong CA, certificate or key file."""
        if self.client_cert() is not None and not any(b.tls for b in self.broker_addresses()):
            raise ConfigError("tls_cert/tls_key need an mqtts:// broker")
        if any(b.tls for b in self.broker_addresses()):
            tls_context(str(self.ca_file) if self.ca_file else None, self.client_cert())

    def credentials(self) -> tuple[str | None, str | None]:
        """(username, password): configured, else ``{data_dir}/credentials.json``, else none."""
        if self.username is not None:
            return self.username, self.password
        path = self.data_dir / CREDENTIALS_FILE
        if path.is_file():
            saved = read_credentials(path)
            return saved["username"], saved["password"]
        return None, None

    @model_validator(mode="after")
    def _cert_and_key(self) -> AgentConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @field_validator("brokers")
    @classmethod
    def _brokers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one broker is needed")
        for url in value:
            try:
                parse_broker_url(url)
            except ConfigError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, value: str) -> str:
        try:
            return check_device_id(value)
        except TopicError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        problem = label_rules.problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    def broker_addresses(self) -> list[BrokerAddress]:
        return [parse_broker_url(url) for url in self.brokers]


def parse_labels(items: list[str] | tuple[str, ...], source: str) -> dict[str, str]:
    """Parse ``k=v`` items (protocol/labels.py); raise :class:`ConfigError` naming ``source``
    and every bad item."""
    try:
        return label_rules.parse(items)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if env.get("TETHER_BROKERS"):
        out["brokers"] = [b for b in env["TETHER_BROKERS"].split(",") if b.strip()]
    if env.get("TETHER_DEVICE_ID"):
        out["device_id"] = env["TETHER_DEVICE_ID"]
    if env.get("TETHER_LABELS"):
        out["labels"] = parse_labels(env["TETHER_LABELS"].split(","), "TETHER_LABELS")
    for var, key in (
        ("TETHER_DATA_DIR", "data_dir"),
        ("TETHER_DRIVER", "driver"),
        ("TETHER_KEEPALIVE", "keepalive"),
        ("TETHER_RECONCILE_INTERVAL", "reconcile_interval"),
        ("TETHER_LABELS_COMMAND", "labels_command"),
        ("TETHER_METRICS_INTERVAL", "metrics_interval"),
        ("TETHER_METRICS_FULL_INTERVAL", "metrics_full_interval"),
        ("TETHER_METRICS_THRESHOLD", "metrics_threshold"),
        ("TETHER_USERNAME", "username"),
        ("TETHER_PASSWORD", "password"),
        ("TETHER_ENROLLMENT_TOKEN", "enrollment_token"),
        ("TETHER_CA_FILE", "ca_file"),
        ("TETHER_TLS_CERT", "tls_cert"),
        ("TETHER_TLS_KEY", "tls_key"),
        ("TETHER_DOWNLOAD_RATE_LIMIT", "download_rate_limit"),
        ("TETHER_HOST_ACCESS", "host_access"),
    ):
        if env.get(var):
            out[key] = env[var]
    return out


def load_config(file: Path | None, env: Mapping[str, str], flags: Mapping[str, Any]) -> AgentConfig:
    """Merge file < environment < flags and validate; raise :class:`ConfigError` on any problem."""
    merged: dict[str, Any] = {}
    path = file or (Path(env["TETHER_CONFIG"]) if env.get("TETHER_CONFIG") else None)
    if path is not None:
        try:
            merged.update(tomllib.loads(path.read_text()))
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: invalid TOML: {exc}") from exc
    merged.update(_from_env(env))
    merged.update({k: v for k, v in flags.items() if v not in (None, (), [], {})})
    try:
        return AgentConfig.model_validate(merged)
    except ValidationError as exc:
        where = f"config file {path}" if path else "agent configuration"
        raise ConfigError(f"{where}: {describe(exc)}") from exc
