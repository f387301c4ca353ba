"""The simulated device's store keeps what the agent's in-memory store keeps: a JSON round trip's value."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tether.sim.store import SimStore, json_copy

VALUES: list[Any] = [
    {"applied": {"app": "ab" * 32}, "previous": {}},
    {"jobs": [{"name": "j", "at": 1.5, "args": ("a", "b"), "done": None, "ok": True, "n": -3}]},
    {"nested": [[1, 2.25, (3,)], {"x": [None, False]}]},
    {1: "int key", "s": "str key"},  # json.dumps turns the key into "1"
    {"big": float("inf"), "nan": [0.0]},  # not finite: as json.dumps writes it
    [],
    "plain",
    None,
]


@pytest.mark.parametrize("value", VALUES)
def test_json_copy_is_the_json_round_trip(value: Any) -> None:
    """json_copy returns what json.loads(json.dumps(value)) returns (types, keys, tuples as lists)."""
    expected = json.loads(json.dumps(value))
    got = json_copy(value)
    assert json.dumps(got) == json.dumps(expected)
    assert repr(got) == repr(expected)  # same types too: tuples became lists, keys strings


def test_sim_store_keeps_a_copy_the_caller_cannot_change() -> None:
    """What SimStore.save_json kept does not change when the saved dict does, as with a file."""
    store = SimStore()
    value = {"applied": {"app": "h1"}, "previous": {}}
    store.save_json("applied", value)
    value["applied"]["app"] = "h2"
    assert store.load_json("applied") == {"applied": {"app": "h1"}, "previous": {}}
    store.save_json("jobs", {"at": (1, 2)})
    assert store.load_json("jobs") == {"at": [1, 2]}
