"""codec.encode_with and the agent's report comparison: the same bytes and answers as the copies they replace."""

from __future__ import annotations

import pytest
from tether.agent.core import _same_report
from tether.protocol import codec
from tether.protocol.models import Event, ReportedState, StackStatus


@pytest.mark.parametrize("spec_hash", [None, "a" * 64])
@pytest.mark.parametrize("stored_oldest", [0, 3])
@pytest.mark.parametrize("oldest", [0, 1, 7])
def test_encode_with_matches_a_copy(spec_hash: str | None, stored_oldest: int, oldest: int) -> None:
    """An event encoded with ``oldest`` set has the bytes of an encoded copy with it (order, left-out fields)."""
    event = Event(
        device_id="dev-1",
        seq=9,
        kind="service.created",
        message="created",
        stack="app",
        service="web",
        at=12.5,
        spec_hash=spec_hash,
        oldest=stored_oldest,
    )
    assert codec.encode_with(event, {"oldest": oldest}) == codec.encode(
        event.model_copy(update={"oldest": oldest})
    )


def test_same_report_ignores_only_the_time() -> None:
    """Two reports equal but for ``at`` are the same report; any other difference is not."""
    stacks = {"app": StackStatus(spec_hash="b" * 64, state="running")}
    one = ReportedState(device_id="d", generation=2, stacks=stacks, at=1.0)
    assert _same_report(one, one.model_copy(update={"at": 5.0}))
    assert not _same_report(one, None)
    assert not _same_report(one, one.model_copy(update={"generation": 3}))
    other = {"app": StackStatus(spec_hash="b" * 64, state="converging")}
    assert not _same_report(one, ReportedState(device_id="d", generation=2, stacks=other, at=1.0))
    assert not _same_report(one, one.model_copy(update={"held": True, "at": 1.0}))
