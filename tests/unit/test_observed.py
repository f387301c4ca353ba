"""``Observed`` (agent/drivers/base.py): its hand-written ``__init__`` (one update of the
instance's dict, not the frozen dataclass's ten ``object.__setattr__``) takes the fields in
their order with their defaults, and the instance stays what a frozen dataclass makes."""

from __future__ import annotations

import dataclasses
import inspect
import pickle

import pytest
from tether.agent.drivers.base import Observed


def test_init_takes_the_fields_in_order_with_their_defaults() -> None:
    fields = dataclasses.fields(Observed)
    params = list(inspect.signature(Observed.__init__).parameters.values())[1:]
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields, strict=True):
        assert p.default == (inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)


def test_an_instance_is_frozen_compared_hashed_replaced_and_pickled_by_its_fields() -> None:
    inst = Observed("i-1", "shop", "web", "h" * 64, "exited", exit_code=3, stop_grace=2.5)
    assert vars(inst) == {
        "id": "i-1",
        "stack": "shop",
        "service": "web",
        "spec_hash": "h" * 64,
        "state": "exited",
        "exit_code": 3,
        "health": None,
        "error": None,
        "stop_grace": 2.5,
        "health_output": None,
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        inst.state = "running"  # type: ignore[misc]
    same = Observed(
        id="i-1", stack="shop", service="web", spec_hash="h" * 64, state="exited", exit_code=3, stop_grace=2.5
    )
    assert same == inst and hash(same) == hash(inst)
    running = dataclasses.replace(inst, state="running", exit_code=None)
    assert running != inst and (running.state, running.exit_code, running.stop_grace) == (
        "running",
        None,
        2.5,
    )
    assert pickle.loads(pickle.dumps(inst)) == inst
    assert repr(inst).startswith("Observed(id='i-1', stack='shop'")
