"""The JSON a reported state is stored as (controller/store.py ``report_json``): byte for
byte ``model_dump_json`` but for its stacks, written without their fields' default values
(made once per stacks dict); read back, the same model."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError
from tether.controller.store import report_json
from tether.protocol.models import DownloadStatus, ReportedState, ServiceStatus, StackStatus

HASH = "a" * 64
_STACKS = TypeAdapter(dict[str, StackStatus])


def _stored(reported: ReportedState) -> str:
    """What ``report_json`` must give, made another way: pydantic's JSON, its stacks replaced
    by theirs without default values (the same text: a plain key order, no spaces)."""
    body = json.loads(reported.model_dump_json())
    body["stacks"] = json.loads(_STACKS.dump_json(reported.stacks, exclude_defaults=True))
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def _check(reported: ReportedState) -> None:
    text = report_json(reported)
    assert json.loads(text) == json.loads(_stored(reported))
    assert ReportedState.model_validate_json(text) == reported


def _stacks(state: str = "running", log: str | None = None) -> dict[str, StackStatus]:
    services = {
        "web": ServiceStatus(state="running", spec_hash=HASH, restarts=1, last_error=log, log_tail=log),
        "db": ServiceStatus(state="running", spec_hash=HASH),
    }
    return {"app": StackStatus(spec_hash=HASH, state=state, services=services)}  # type: ignore[arg-type]


def test_report_json_is_model_dump_json_for_every_shape() -> None:
    """Every field set or not, strings that look like JSON keys, no stacks at all."""
    tricky = 'x ,"error": "y", \\ \n \u00e9 \u2028 {"stacks":1}'
    reports = [
        ReportedState(device_id="pi-1", generation=3, stacks=_stacks(), at=1765432.123),
        ReportedState(device_id="pi-2", generation=-1),
        ReportedState(
            device_id="pi-\u00e9",
            generation=2**53 - 1,
            stacks=_stacks("failed", tricky),
            error=tricky,
            held=True,
            events_dropped=7,
            downloads={"app": DownloadStatus(spec_hash=HASH, state="retrying", reason=tricky)},
            storage_error=tricky,
            at=1e-7,
        ),
        ReportedState(device_id="pi-3", generation=1, stacks=_stacks(), error=""),
    ]
    for reported in reports:
        _check(reported)
        assert len(report_json(reported)) < len(reported.model_dump_json()) or not reported.stacks


def test_a_service_running_without_a_blip_is_stored_without_its_defaults() -> None:
    """What makes the row small: a service's unset fields are not written; the fields
    ``Store.stack_reports`` extracts (a stack's spec_hash and state) always are."""
    services = {"web": ServiceStatus(state="running", spec_hash=HASH)}
    stacks = {"app": StackStatus(spec_hash=HASH, state="running", services=services)}
    text = report_json(ReportedState(device_id="pi-1", generation=1, stacks=stacks, at=1765432.5))
    assert json.loads(text)["stacks"] == {
        "app": {
            "spec_hash": HASH,
            "state": "running",
            "services": {"web": {"state": "running", "spec_hash": HASH}},
        }
    }


def test_report_json_reuses_a_stacks_json_only_for_that_very_dict() -> None:
    """Reports sharing one stacks dict share its JSON; another dict (even where a freed one
    lived) gets its own."""
    shared = _stacks()
    one = ReportedState(device_id="pi-1", generation=1, stacks=shared)
    two = ReportedState.model_construct(**{**dict(one), "device_id": "pi-2"})
    assert two.stacks is one.stacks
    _check(one)
    _check(two)
    for n in range(300):  # past what is kept: forgotten, then made again
        _check(ReportedState(device_id="pi-1", generation=1, stacks=_stacks("converging", str(n))))
    _check(one)


@settings(max_examples=300, deadline=None)
@given(
    device_id=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"),
    generation=st.integers(-1, 2**53 - 1),
    at=st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.floats(1.0, 1e15), st.just(0.0)),
    held=st.booleans(),
    dropped=st.integers(0, 2**40),
)
def test_a_plain_report_is_written_as_pydantic_writes_it(
    device_id: str, generation: int, at: float, held: bool, dropped: int
) -> None:
    """The reports written without pydantic (most of a fleet's) and those it is left to:
    the same text, whatever the time (exponents; a time that is not finite is refused) or the device id."""
    reported = ReportedState(
        device_id=device_id, generation=generation, stacks=_stacks(), at=at, held=held, events_dropped=dropped
    )
    _check(reported)


def test_a_report_with_a_time_that_is_not_finite_is_refused() -> None:
    """pydantic writes an infinite or NaN time as null, which it does not read back: such a
    report is refused at validation (one clear error), so none is ever stored."""
    for at in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(ValidationError, match="finite number"):
            ReportedState(device_id="pi-1", generation=1, at=at)
        with pytest.raises(ValidationError, match="finite number"):
            DownloadStatus(spec_hash=HASH, state="downloading", rate=abs(at))
