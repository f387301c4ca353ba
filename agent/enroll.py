"""Enrollment on the device: join the fleet with a token, get this device's own credentials.

Used only when the agent has an ``enrollment_token`` and no credentials yet (neither
configured nor in ``{data_dir}/credentials.json``); otherwise the agent starts as usual.

Pure core: :func:`build_request` (the :class:`EnrollmentRequest` payload) and
:func:`open_response` (check and open the controller's sealed answer). The loop,
:func:`enroll`, connects as ``enroll-{token id}`` (client id ``tether-enroll-{device_id}``)
with the token as password, subscribes
to its response topic, publishes the request (again with a growing backoff, up to every
five minutes, until an answer arrives), and on approval saves the credentials (0600) and
returns; the agent then connects as the device. The X25519 private key stays in
``{data_dir}/enroll.key`` (0600), so an agent restarted while pending can still open its answer.
"""

from __future__ import annotations

import binascii
import logging
import platform
import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tether.protocol import codec, topics
from tether.protocol.backoff import Backoff
from tether.protocol.credentials import enroll_username
from tether.protocol.enrollment import DeviceKey
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


def build_request(device_id: str, token: str, key: DeviceKey, facts: DeviceFacts) -> bytes:
    """The enrollment request payload for ``device_id``."""
    request = EnrollmentRequest(device_id=device_id, token=token, public_key=key.public, facts=facts)
    return codec.encode(request)


def open_response(payload: bytes, key: DeviceKey, device_id: str) -> EnrollmentGrant:
    """The controller's answer, opened; :class:`PayloadError` if malformed, tampered or not ours."""
    response = codec.decode(payload, EnrollmentResponse)
    if response.device_id != device_id:
        raise PayloadError(f"enrollment response for {response.device_id!r}, not {device_id!r}")
    grant = key.open_grant(response.sealed)
    if grant.device_id != device_id:
        raise PayloadError(f"enrollment grant for {grant.device_id!r}, not {device_id!r}")
    if grant.status == "approved" and (not grant.username or not grant.password):
        raise PayloadError("enrollment response: approved without credentials")
    return grant


# --- files ---


def load_or_create_key(data_dir: Path) -> DeviceKey:
    """This device's key pair, created on first use (``{data_dir}/enroll.key``, 0600): its
    enrollment answer and its secrets are sealed to it. A file from before the public key
    was kept in it gets that line added."""
    path = data_dir / KEY_FILE
    if path.exists():
        try:
            text = path.read_text()
            key = DeviceKey.from_text(text)
        except (OSError, ValueError, binascii.Error) as exc:
            raise ConfigError(
                f"enrollment key {path} is unreadable ({exc}); remove it to make a new one"
            ) from exc
        if len(text.split()) == 1:
            write_secret_text(path, key.save_text())
        return key
    key = _generate_apart()
    write_secret_text(path, key.save_text())
    return key


def _generate_apart() -> DeviceKey:
    """A new key pair, made by a short-lived child process (as ssh-keygen is apart from sshd).

    Making a key loads PyNaCl and libsodium, 1.2 MB of resident memory the agent would then
    keep for good; made apart, the agent maps them only if it opens a sealed box (a secret,
    an enrollment answer). In-process if the child cannot run.
    """
    program = (
        "from tether.protocol.enrollment import DeviceKey; print(DeviceKey.generate().save_text(), end='')"
    )
    try:
        made = subprocess.run(
            [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
        )
        return DeviceKey.from_text(made.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.debug("key pair made in-process: the child failed (%s)", exc)
        return DeviceKey.generate()


def device_facts(config: AgentConfig) -> DeviceFacts:
    from .host import agent_version, os_name

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
        username=enroll_username(config.enrollment_token, device_id),
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
