"""The Tether topic tree (version 1). docs/topics.md is the reference for integrators.

    tether/v1/devices/{device_id}/desired    retained, QoS 1, controller -> agent  DesiredState
    tether/v1/devices/{device_id}/reported   retained, QoS 1, agent -> controller  ReportedState
    tether/v1/devices/{device_id}/presence   retained, QoS 1, agent (and its will) Presence
    tether/v1/devices/{device_id}/events     QoS 1,           agent -> anyone      Event
    tether/v1/devices/{device_id}/requests   QoS 1,           clients -> agent     Request (device_api)
    tether/v1/devices/{device_id}/metrics    QoS 0,           agent -> anyone      MetricsSample
    tether/v1/devices/{device_id}/acked      retained, QoS 0, controller -> agent  EventsAcked
    tether/v1/stacks/{spec_hash}             retained, QoS 1, controller -> agents StackDefinition
    tether/v1/controller/requests/{user}     QoS 1,           clients -> controller Request (from user)
    tether/v1/controller/requests            QoS 1,           older clients -> controller (user admin)
    tether/v1/controller/leader[/{user}]     QoS 1,           standby -> leader     Request
    tether/v1/controller/probe               QoS 1,           leader -> itself      opaque token
    tether/v1/clients/{client_id}/replies    QoS 1,           controller/agent -> client Reply
    tether/v1/enroll/{device_id}/request     QoS 1,           enrolling agent -> controller EnrollmentRequest
    tether/v1/enroll/{device_id}/response    retained, QoS 1, controller -> enrolling agent EnrollmentResponse

Incoming topics are never trusted to be ones we subscribed to (some brokers deliver
more than asked): :func:`parse` tells what a topic is, or ``None``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import StrEnum

from . import names
from .errors import TopicError

ROOT = "tether/v1"
DEVICE_ID_RE = names.DEVICE_ID.regex
SPEC_HASH_RE = names.SPEC_HASH.regex
CLIENT_ID_RE = names.CLIENT_ID.regex

REQUESTS = f"{ROOT}/controller/requests"
SHARED_REQUESTS = f"$share/tether-controllers/{REQUESTS}"
"""With several controllers (``tether up --ha``) each request goes to one of them."""
LEADER_REQUESTS = f"{ROOT}/controller/leader"
"""Write requests a standby controller hands to the leader, unchanged (``/{user}`` after it: who sent it)."""
USER_REQUESTS = f"{REQUESTS}/+"
SHARED_USER_REQUESTS = f"$share/tether-controllers/{USER_REQUESTS}"
ALL_LEADER_REQUESTS = f"{LEADER_REQUESTS}/+"


def user_requests(user: str) -> str:
    """Where ``user`` sends controller requests (only that user may publish there: protocol/acl.py)."""
    if not names.USERNAME.ok(user):
        raise TopicError(f"invalid user name {user!r}")
    return f"{REQUESTS}/{user}"


def leader_requests(user: str) -> str:
    """Where a standby hands ``user``'s write request to the leader."""
    return f"{LEADER_REQUESTS}/{user}"


PROBE = f"{ROOT}/controller/probe"
"""The leader's message to itself through the broker: once it is back, every device message
the broker had when it was sent has been handled (see ``Controller.repair_behind``)."""


class DeviceTopic(StrEnum):
    """The kinds of per-device topic."""

    DESIRED = "desired"
    REPORTED = "reported"
    PRESENCE = "presence"
    EVENTS = "events"
    REQUESTS = "requests"
    METRICS = "metrics"
    ACKED = "acked"


_DEVICE_TOPICS = {kind.value: kind for kind in DeviceTopic}


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is usable as a topic level, else raise :class:`TopicError`."""
    problem = names.DEVICE_ID.problem(device_id)
    if problem is not None:
        raise TopicError(problem)
    return device_id


_DEVICES = f"{ROOT}/devices/"
_KIND_LEVELS = {kind: f"/{kind.value}" for kind in DeviceTopic}
"""Each kind's last level, made once (an enum member's ``value`` is a property)."""


def device(device_id: str, kind: DeviceTopic) -> str:
    """The topic of one kind for one device (made per device for every desired state a
    deploy publishes: its parts made once, not formatted each time)."""
    return _DEVICES + check_device_id(device_id) + _KIND_LEVELS[kind]


def all_devices(kind: DeviceTopic) -> str:
    """A subscription filter matching one kind of topic for every device."""
    return f"{ROOT}/devices/+/{kind.value}"


STACKS = f"{ROOT}/stacks/"
"""What every stack definition's topic starts with (then its content hash)."""


def stack(spec_hash: str) -> str:
    """The retained topic holding the definition of the stack with this content hash."""
    if not SPEC_HASH_RE.match(spec_hash):
        raise TopicError(f"invalid stack hash {spec_hash!r}")
    return f"{STACKS}{spec_hash}"


def replies(client_id: str) -> str:
    """The topic a request client receives its replies on."""
    if not CLIENT_ID_RE.match(client_id):
        raise TopicError(f"invalid client id {client_id!r}")
    return f"{ROOT}/clients/{client_id}/replies"


def enroll_request(device_id: str) -> str:
    """Where an enrolling device asks to join (docs/onboarding.md)."""
    return f"{ROOT}/enroll/{check_device_id(device_id)}/request"


def enroll_response(device_id: str) -> str:
    """Where the controller answers an enrolling device (retained, sealed to its key)."""
    return f"{ROOT}/enroll/{check_device_id(device_id)}/response"


ALL_ENROLL_REQUESTS = f"{ROOT}/enroll/+/request"


@dataclass(frozen=True)
class ParsedTopic:
    """What an incoming topic is: a device topic, a stack definition, a request or a reply."""

    kind: str  # "device" | "stack" | "requests" | "leader-requests" | "probe" | "replies" | "enroll-request"
    device_id: str | None = None
    device_topic: DeviceTopic | None = None
    spec_hash: str | None = None
    client_id: str | None = None
    user: str | None = None
    """Who sent a request: the user of its topic (``controller/requests/{user}``), None on the shared one."""


def parse_device(topic: str) -> tuple[str, DeviceTopic] | None:
    """``(device id, kind)`` when ``topic`` is a device's topic, None otherwise: what
    :func:`parse` says of it (same checks, the same interned id), without building a
    :class:`ParsedTopic` (the controller's path for every message a device sends)."""
    if not topic.startswith(_DEVICES):
        return None
    device_id, _, leaf = topic[len(_DEVICES) :].partition("/")
    kind = _DEVICE_TOPICS.get(leaf)  # a leaf holding "/" (more levels) is not in it
    if kind is None or not DEVICE_ID_RE.match(device_id):
        return None
    return sys.intern(device_id), kind


def parse(topic: str) -> ParsedTopic | None:
    """Classify ``topic``; ``None`` if it is not a well-formed Tether v1 topic."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != "tether" or parts[1] != "v1":
        return None
    rest = parts[2:]
    if len(rest) == 3 and rest[0] == "devices" and DEVICE_ID_RE.match(rest[1]):
        kind = _DEVICE_TOPICS.get(rest[2])  # not DeviceTopic(...): an enum call per message is slow
        if kind is None:
            return None
        # One string object per device id, whatever topic it came on: the controller keeps it
        # as a key in several maps per device (59 bytes each at 10,000 devices otherwise).
        return ParsedTopic("device", device_id=sys.intern(rest[1]), device_topic=kind)
    if len(rest) == 2 and rest[0] == "stacks" and SPEC_HASH_RE.match(rest[1]):
        return ParsedTopic("stack", spec_hash=rest[1])
    if rest == ["controller", "requests"]:
        return ParsedTopic("requests")
    if rest == ["controller", "leader"]:
        return ParsedTopic("leader-requests")
    if rest == ["controller", "probe"]:
        return ParsedTopic("probe")
    if len(rest) == 3 and rest[0] == "controller" and rest[1] in ("requests", "leader"):
        if not names.USERNAME.ok(rest[2]):
            return None
        return ParsedTopic("requests" if rest[1] == "requests" else "leader-requests", user=rest[2])
    if len(rest) == 3 and rest[0] == "clients" and rest[2] == "replies" and CLIENT_ID_RE.match(rest[1]):
        return ParsedTopic("replies", client_id=rest[1])
    if len(rest) == 3 and rest[0] == "enroll" and rest[2] == "request" and DEVICE_ID_RE.match(rest[1]):
        return ParsedTopic("enroll-request", device_id=rest[1])
    return None
