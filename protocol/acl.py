"""Who may publish and subscribe to what: the topic ACL, as pure functions.

The embedded broker's plugins call :func:`may_publish` / :func:`may_subscribe` for every
PUBLISH and SUBSCRIBE; the Mosquitto ACL file Tether generates says the same thing in
Mosquitto's syntax. Rules (``D`` is the device's id, ``C`` the connection's client id):

=============  ===========================================================  ===========================================
identity       may subscribe                                                may publish
=============  ===========================================================  ===========================================
device D       ``devices/D/{desired,presence,requests,acked}``, the stack   ``devices/D/{presence,reported,events,
               definitions assigned to it (``stacks/{hash}``), exact only    metrics}``, ``clients/+/replies``
operator U     ``clients/C/replies``; ``devices/+/{presence,reported,       ``controller/requests/U``, ``devices/+/requests``
               events,metrics}`` (or one device's)                           (and ``controller/requests`` if U is ``admin``)
viewer U       as an operator                                                ``controller/requests/U`` only
enrolling D    ``enroll/D/response``                                         ``enroll/D/request``
controller     everything under ``tether/v1/`` (and shared subscriptions)   everything under ``tether/v1/``
=============  ===========================================================  ===========================================

(all topics under ``tether/v1/``). ``operator`` and ``viewer`` are users of ``tether users``
(a viewer's broker role is ``viewer``; an operator's or admin's is ``operator``). Each may
send controller requests on its own topic only, so the controller knows who asks from the
topic (the broker enforces it, the payload never claims it). The shared ``controller/requests``
of older CLIs is left to :data:`LEGACY_USER`, the one operator of before users existed: the
controller takes what arrives there as coming from that user. A subscription filter is allowed only when every topic
it can match is allowed (MQTT 3.1.1 section 4.7 wildcards).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

from . import names
from .topics import ROOT

Role = Literal["device", "controller", "operator", "viewer", "enrolling"]
USER_ROLES = ("operator", "viewer")
"""The broker roles of people and integrations (``tether users``)."""
LEGACY_USER = "admin"
"""The user that may still send on the shared ``controller/requests`` (older CLIs)."""
DEVICE_READS = ("desired", "presence", "requests", "acked")
DEVICE_WRITES = ("presence", "reported", "events", "metrics")
WATCHABLE = ("presence", "reported", "events", "metrics")


@dataclass(frozen=True)
class Identity:
    """An authenticated connection: its role, its name (device id or user) and client id."""

    role: Role
    name: str
    client_id: str = ""


def client_id_allowed(identity: Identity) -> bool:
    """Whether ``identity`` may use its client id: nobody may take over another's session.

    A device connects as ``tether-{device id}`` (the agent's id), an enrolling device as
    ``tether-enroll-{device id}``, the controller as ``tether-controller-*``; an operator
    or integration as ``tether-cli-*`` or any id not starting with ``tether-``.
    (MQTT 3.1.1 section 3.1.4: a second CONNECT with the same client id ends the first.)
    An id that is not a valid :data:`~.names.CLIENT_ID` (it is a topic level in
    ``clients/C/replies``: no ``/``, ``+``, ``#`` or control character) is never allowed.
    """
    cid = identity.client_id
    if not names.CLIENT_ID.ok(cid):
        return False
    if identity.role == "device":
        return cid == f"tether-{identity.name}"
    if identity.role == "enrolling":
        return cid == f"tether-enroll-{identity.name}"
    if identity.role == "controller":
        return cid.startswith("tether-controller-")
    if identity.role in USER_ROLES:
        return cid.startswith("tether-cli-") or not cid.startswith("tether-")
    return False


RESERVED_DEVICE_PREFIXES = ("cli-", "controller-", "enroll-")
"""Device ids that would give a device another role's client id; refused for credentials."""


def _levels(topic: str) -> list[str]:
    return topic.split("/")


def covers(pattern: str, topic_filter: str) -> bool:
    """Whether every topic ``topic_filter`` can match is matched by ``pattern``.

    ``pattern`` may use ``+`` and a trailing ``#``; so may ``topic_filter``.
    """
    pat, flt = _levels(pattern), _levels(topic_filter)
    for i, p in enumerate(pat):
        if p == "#":
            return True
        if i >= len(flt):
            return False
        f = flt[i]
        if f == "#":
            return False  # the filter reaches further than the pattern allows
        if p == "+":
            continue
        if f != p:  # a literal pattern level allows only that literal (not '+')
            return False
    return len(flt) == len(pat)


def may_subscribe(identity: Identity, topic_filter: str, stack_hashes: Collection[str] = ()) -> bool:
    """May ``identity`` subscribe to ``topic_filter``? ``stack_hashes``: a device's assigned stacks."""
    if identity.role == "controller":
        return covers(f"{ROOT}/#", topic_filter) or covers(f"$share/+/{ROOT}/#", topic_filter)
    if identity.role == "device":
        allowed = [f"{ROOT}/devices/{identity.name}/{kind}" for kind in DEVICE_READS]
        allowed += [f"{ROOT}/stacks/{h}" for h in stack_hashes]
        return topic_filter in allowed  # exact topics only: no wildcard can reach another device
    if identity.role in USER_ROLES:
        cid = identity.client_id
        if names.CLIENT_ID.ok(cid) and topic_filter == f"{ROOT}/clients/{cid}/replies":
            return True  # its own replies only: a client id is never a wildcard
        return any(covers(f"{ROOT}/devices/+/{kind}", topic_filter) for kind in WATCHABLE)
    if identity.role == "enrolling":
        return topic_filter == f"{ROOT}/enroll/{identity.name}/response"
    return False


def may_publish(identity: Identity, topic: str) -> bool:
    """May ``identity`` publish to ``topic`` (a topic name, never a filter)?"""
    if "+" in topic or "#" in topic:
        return False
    if identity.role == "controller":
        return covers(f"{ROOT}/#", topic)
    if identity.role == "device":
        if topic in {f"{ROOT}/devices/{identity.name}/{kind}" for kind in DEVICE_WRITES}:
            return True
        return covers(f"{ROOT}/clients/+/replies", topic)
    if identity.role in USER_ROLES:
        if topic == f"{ROOT}/controller/requests/{identity.name}" and names.USERNAME.ok(identity.name):
            return True
        if topic == f"{ROOT}/controller/requests":
            return identity.name == LEGACY_USER
        if identity.role != "operator":
            return False
        return covers(f"{ROOT}/devices/+/requests", topic)
    if identity.role == "enrolling":
        return topic == f"{ROOT}/enroll/{identity.name}/request"
    return False
