"""The log follower behind `tether logs -f` and the dashboard's log page (pure: time and replies given)."""

from __future__ import annotations

from tether.protocol.device_api import DeviceReply
from tether.protocol.log_follow import LEASE_S, Ended, Failed, LogFollower, Output


def _reply(
    seq: int, more: bool = True, ok: bool = True, request_id: str = "r1", **result: object
) -> DeviceReply:
    return DeviceReply(
        id=request_id, ok=ok, more=more, seq=seq, result=result or None, error=None if ok else "no such stack"
    )


def test_output_in_order_without_duplicates_or_strangers_then_the_end() -> None:
    """The first message names the services; a QoS 1 duplicate and another request's reply say
    nothing; the last message ends the follow with the device's reason."""
    follower = LogFollower("pi-1", "r1", 0.0, answer_s=10, idle_s=30)
    first = follower.take(_reply(1, services=["web", "db"]), 1.0)
    assert isinstance(first, Output) and first.services == ["web", "db"] and first.text == ""
    line = follower.take(_reply(2, service="web", text="hello\n"), 2.0)
    assert isinstance(line, Output) and (line.service, line.text, line.services) == ("web", "hello\n", None)
    assert follower.take(_reply(2, service="web", text="hello\n"), 2.5) is None  # a duplicate
    assert follower.take(_reply(1, request_id="other", text="x"), 2.6) is None
    end = follower.take(_reply(3, more=False, end="exited", dropped=12), 3.0)
    assert (
        isinstance(end, Ended)
        and end.reason == "exited"
        and end.result["dropped"] == 12
        and not end.cancelled
    )


def test_a_refusal_fails_the_follow() -> None:
    """A plain error reply (seq 0) is the follow's failure, with the device's words."""
    follower = LogFollower("pi-1", "r1", 0.0, answer_s=10, idle_s=30)
    assert follower.take(_reply(0, more=False, ok=False), 1.0) == Failed("no such stack", timeout=False)


def test_the_lease_is_extended_every_third_and_cancelled_at_the_limit() -> None:
    """Extend every LEASE_S/3 while it runs; at limit_s one cancel and nothing after it."""
    follower = LogFollower("pi-1", "r1", 0.0, answer_s=10, idle_s=30, limit_s=LEASE_S)
    assert follower.due(1.0) is None
    extend = follower.due(LEASE_S / 3)
    assert extend is not None and (extend.action, extend.request_id, extend.duration) == (
        "extend",
        "r1",
        LEASE_S,
    )
    assert follower.due(LEASE_S / 3 + 1) is None
    assert follower.due(2 * LEASE_S / 3).action == "extend"  # type: ignore[union-attr]
    cancel = follower.due(LEASE_S)
    assert cancel is not None and cancel.action == "cancel"
    assert follower.due(LEASE_S + 100) is None
    end = follower.take(_reply(1, more=False, end="cancelled"), LEASE_S + 1)
    assert isinstance(end, Ended) and end.cancelled


def test_silence_first_answer_idle_and_after_a_cancel() -> None:
    """No first message within answer_s fails; later, only idle_s of silence does; once
    cancelled, the device's lost last word ends the follow quietly after answer_s."""
    follower = LogFollower("pi-1", "r1", 0.0, answer_s=10, idle_s=30)
    assert follower.silence(9.9) is None
    assert follower.silence(10.0) == Failed("device pi-1 did not answer within 10s", timeout=True)
    follower.take(_reply(1, services=["web"]), 5.0)
    assert follower.silence(20.0) is None  # answered: now the idle limit counts
    assert follower.silence(35.0) == Failed("device pi-1 stopped answering (nothing for 30s)", timeout=True)
    limited = LogFollower("pi-1", "r1", 0.0, answer_s=10, idle_s=30, limit_s=5)
    limited.take(_reply(1, services=["web"]), 1.0)
    assert limited.due(5.0) is not None and limited.silence(10.9) is None
    assert limited.silence(11.0) == Ended({}, cancelled=True)
