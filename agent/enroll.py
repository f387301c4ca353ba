"""Enrollment on the device: join the fleet with a token, get this device's own credentials.

Used only when the agent has an ``enrollment_token`` and no credentials yet (neither
configured nor in ``{data_dir}/credentials.json``); otherwise the agent starts as usual.

Pure core: :func:`build_request` (the :class:`EnrollmentRequest` payload) and
:func:`open_response` (check and open the controller's sealed answer). The loop,
:func:`enroll`, connects as ``enroll:{device_id}`` with the token as password, subscribes
to its response topic, publishes the request (again with a growing backoff, up to every
five minutes, until an answer arrives), and on approval saves the credentials (0600) and
returns; the agent then connects as the device. The X25519 private key stays in
``{data_dir}/enroll.key`` (0600), so an agent restarted while pending can still open its answer.
"""

from __future__ import annotations

import base64
import binascii
import logging
import platform
import queue
import socket
import threading
import time
from pathlib import Path

from nacl.public import PrivateKey
from tether.protocol import codec, topics
from tether.protocol.backoff import Backoff
from tether.protocol.credentials import ENROLL_PREFIX
from tether.protocol.enrollment import new_private_key, open_grant, public_key_b64
from tether.protocol.errors import ConfigError, PayloadError
from tether.protocol.models import DeviceFacts, EnrollmentGrant, EnrollmentRequest, EnrollmentResponse
from tether.protocol.mqtt import MqttClient
from tether.protocol.secret_files import write_secret_json, write_secret_text

from .config import CREDENTIALS_FILE, AgentConfig

log = logging.getLogger(__name__)

KEY_FILE = "enroll.key"
REQUEST_BACKOFF = Backoff(base=5.0, cap=300.0)
_CONNECTED = b"\x00connected"


# --- pure core ---


def build_request(device_id: str, token: str, private_key: PrivateKey, facts: DeviceFacts) -> bytes:
    """The enrollment request payload for ``device_id``."""
    request = EnrollmentRequest(
        device_id=device_id, token=token, public_key=public_key_b64(private_key), facts=facts
    )
    return codec.encode(request)


def open_response(payload: bytes, private_key: PrivateKey, device_id: str) -> EnrollmentGrant:
    """The controller's answer, opened; :class:`PayloadError` if malformed, tampered or not ours."""
    response = codec.decode(payload, EnrollmentResponse)
    if response.device_id != device_id:
        raise PayloadError(f"enrollment response for {response.device_id!r}, not {device_id!r}")
    grant = open_grant(private_key, response.sealed)
    if grant.device_id != device_id:
        raise PayloadError(f"enrollment grant for {grant.device_id!r}, not {device_id!r}")
    if grant.status == "approved" and (not grant.username or not grant.password):
        raise PayloadError("enrollment response: approved without credentials")
    return grant


# --- files ---


def load_or_create_key(data_dir: Path) -> PrivateKey:
    """This device's key pair, created on first use (``{data_dir}/enroll.key``, 0600): its
    enrollment answer and its secrets are sealed to it."""
    path = data_dir / KEY_FILE
    if path.exists():
        try:
            return PrivateKey(base64.b64decode(path.read_text().strip(), validate=True))
        except (OSError, ValueError, binascii.Error) as exc:
            raise ConfigError(
                f"enrollment key {path} is unreadable ({exc}); remove it to make a new one"
            ) from exc
    key = new_private_key()
    write_secret_text(path, base64.b64encode(bytes(key)).decode() + "\n")
    return key


def device_facts(config: AgentConfig) -> DeviceFacts:
    from .core import agent_version, os_name

    return DeviceFacts(
        agent_version=agent_version(),
        driver=config.driver,
        arch=platform.machine(),
        os=os_name(),
        hostname=socket.gethostname(),
        labels=dict(config.labels),
    )


def needs_enrollment(config: AgentConfig) -> bool:
    return (
        bool(config.enrollment_token)
        and config.credentials() == (None, None)
        and config.client_cert() is None
    )


# --- the loop ---


def enroll(config: AgentConfig, stop: threading.Event) -> bool:
    """Enroll; True once this device's credentials are saved, False if stopped first."""
    assert config.enrollment_token
    device_id = config.device_id
    key = load_or_create_key(config.data_dir)
    response_topic = topics.enroll_response(device_id)
    inbox: queue.Queue[bytes] = queue.Queue()
    client = MqttClient(
        config.broker_addresses(),
        client_id=f"tether-enroll-{device_id}",
        clean_session=True,
        keepalive=config.keepalive,
        on_message=lambda topic, payload, retained: inbox.put(payload) if topic == response_topic else None,
        on_connect=lambda: inbox.put(_CONNECTED),
        username=f"{ENROLL_PREFIX}{device_id}",
        password=config.enrollment_token,
        ca_file=str(config.ca_file) if config.ca_file else None,
    )
    client.subscribe(response_topic)
    request = build_request(device_id, config.enrollment_token, key, device_facts(config))
    log.info("no credentials yet: enrolling as %s with the fleet token", device_id)
    client.start()
    attempt = 0
    next_request: float | None = None
    refusal_logged: str | None = None
    try:
        while not stop.is_set():
            now = time.monotonic()
            due = client.connected and next_request is not None and now >= next_request
            if due and client.publish(topics.enroll_request(device_id), request, qos=1):
                if attempt == 0:
                    log.info("asked to join the fleet as %s; waiting for approval", device_id)
                wait = REQUEST_BACKOFF.ceiling(attempt) / 2 + REQUEST_BACKOFF.delay(attempt) / 2
                next_request = now + wait
                attempt += 1
            error = client.last_error
            if not client.connected and error and "refused" in error and error != refusal_logged:
                log.error(
                    "enrollment refused by the broker (%s): the token is unknown, expired or used up; retrying",
                    error,
                )
                refusal_logged = error
            try:
                payload = inbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if payload == _CONNECTED:
                next_request = time.monotonic()  # ask (again) on every connection
                refusal_logged = None
                continue
            if not payload:
                continue  # a cleared retained answer
            try:
                grant = open_response(payload, key, device_id)
            except PayloadError as exc:
                log.error("ignoring an enrollment response: %s", exc)
                continue
            if grant.status == "rejected":
                log.error(
                    "enrollment of %s was rejected (%s); still waiting, an operator may approve it later",
                    device_id,
                    grant.message or "no reason given",
                )
                continue
            assert grant.username is not None and grant.password is not None
            path = config.data_dir / CREDENTIALS_FILE
            write_secret_json(path, {"username": grant.username, "password": grant.password})
            log.info("enrolled: credentials for %s saved in %s", device_id, path)
            return True
        return False
    finally:
        client.stop()
