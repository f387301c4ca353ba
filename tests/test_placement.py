"""Replica placement and the disconnect policy (pure)."""

from __future__ import annotations

from tether.controller.placement import Assignment, Candidate, Placement, is_lost, place

POLICY = Placement(mode="replicas", replicas=2, lost_after_s=30, replace=True)


def _devices(
    online: dict[str, bool], since: float = 0.0, load: dict[str, int] | None = None
) -> dict[str, Candidate]:
    return {d: Candidate(d, up, None if up else since, (load or {}).get(d, 0)) for d, up in online.items()}


def test_global_stacks_have_no_assignment() -> None:
    """A global stack is not placed by assignment."""
    assert place(Placement(), ["a"], _devices({"a": True}), (), 0) == ()


def test_initial_placement_prefers_least_loaded_online_members() -> None:
    """New replicas go to online members, least loaded first, then by id."""
    devices = _devices({"a": True, "b": True, "c": True, "d": False}, load={"a": 3, "b": 0, "c": 1})
    result = place(POLICY, ["a", "b", "c", "d"], devices, (), 10)
    assert [a.device_id for a in result] == ["b", "c"]
    assert {a.role for a in result} == {"original"}


def test_offline_device_is_not_lost_before_lost_after() -> None:
    """Offline for less than lost_after: still counts, nothing is replaced."""
    current = (Assignment(device_id="a"), Assignment(device_id="b"))
    devices = _devices({"a": False, "b": True, "c": True}, since=100)
    assert place(POLICY, ["a", "b", "c"], devices, current, 129) == current
    assert not is_lost(POLICY, devices["a"], 129)


def test_lost_device_is_replaced_but_stays_assigned() -> None:
    """After lost_after a replacement is placed; the lost device keeps its stack."""
    current = (Assignment(device_id="a"), Assignment(device_id="b"))
    devices = _devices({"a": False, "b": True, "c": True}, since=100)
    result = place(POLICY, ["a", "b", "c"], devices, current, 130)
    assert [(a.device_id, a.role) for a in result] == [
        ("a", "original"),
        ("b", "original"),
        ("c", "replacement"),
    ]


def test_without_replace_lost_devices_still_count() -> None:
    """replace: false never places a replacement."""
    policy = POLICY.model_copy(update={"replace": False})
    current = (Assignment(device_id="a"), Assignment(device_id="b"))
    devices = _devices({"a": False, "b": True, "c": True}, since=0)
    assert place(policy, ["a", "b", "c"], devices, current, 1000) == current


def test_reconnect_keep_original_stops_the_replacement() -> None:
    """keep_original: when the lost device returns, the replacement goes and N is exact."""
    current = (
        Assignment(device_id="a"),
        Assignment(device_id="b"),
        Assignment(device_id="c", role="replacement", since=130),
    )
    devices = _devices({"a": True, "b": True, "c": True})
    result = place(POLICY, ["a", "b", "c"], devices, current, 200)
    assert [a.device_id for a in result] == ["a", "b"]


def test_reconnect_keep_replacement_stops_the_original() -> None:
    """keep_replacement: the returning original goes."""
    policy = POLICY.model_copy(update={"reconcile": "keep_replacement"})
    current = (
        Assignment(device_id="a", since=1),
        Assignment(device_id="b", since=0),
        Assignment(device_id="c", role="replacement", since=130),
    )
    result = place(policy, ["a", "b", "c"], _devices({"a": True, "b": True, "c": True}), current, 200)
    assert len(result) == 2 and "c" in {a.device_id for a in result}


def test_reconnect_best_score_keeps_least_loaded() -> None:
    """best_score: the most loaded replica goes."""
    policy = POLICY.model_copy(update={"reconcile": "best_score"})
    current = (
        Assignment(device_id="a"),
        Assignment(device_id="b"),
        Assignment(device_id="c", role="replacement"),
    )
    devices = _devices({"a": True, "b": True, "c": True}, load={"a": 5, "b": 1, "c": 1})
    assert [a.device_id for a in place(policy, ["a", "b", "c"], devices, current, 0)] == ["b", "c"]


def test_devices_leaving_the_group_are_dropped_and_replaced() -> None:
    """An assigned device that left the group is dropped; an online member takes its place."""
    current = (Assignment(device_id="a"), Assignment(device_id="x"))
    result = place(POLICY, ["a", "b"], _devices({"a": True, "b": True, "x": True}), current, 0)
    assert [a.device_id for a in result] == ["a", "b"]


def test_scaling_down_removes_replicas() -> None:
    """Fewer replicas wanted: the count drops to exactly N."""
    policy = POLICY.model_copy(update={"replicas": 1})
    current = (Assignment(device_id="a"), Assignment(device_id="b"))
    assert len(place(policy, ["a", "b"], _devices({"a": True, "b": True}), current, 0)) == 1
