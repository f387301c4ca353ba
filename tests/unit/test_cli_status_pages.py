"""The CLI reads a stack's status page by page: every row once, counts over all, --wait on the counts."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel
from support.fleet import web_on_twelve
from tether.cli import stacks as cli_stacks
from tether.controller.service import Controller
from tether.protocol import codec, topics
from tether.protocol.errors import TetherError
from tether.protocol.models import ReportedState
from tether.protocol.topics import DeviceTopic

V1 = "services:\n  web:\n    image: busybox:1.36\n"


class InProcessClient:
    """Stands for the CLI's ControllerClient: each request goes to a real controller's
    handler as the wire would carry it (results as plain JSON data); counts the requests."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.requests: list[BaseModel] = []

    def request(self, command: BaseModel, timeout: float | None = None) -> Any:
        self.requests.append(command)
        return self.controller.execute(command).model_dump(mode="json")  # type: ignore[arg-type]


@pytest.fixture
def fleet(controller: Controller, monkeypatch: pytest.MonkeyPatch) -> InProcessClient:
    """Stack ``web`` on 12 devices (d-00..d-04 running it), read by the CLI 5 rows a page."""
    monkeypatch.setattr(cli_stacks, "STATUS_PAGE", 5)
    monkeypatch.setattr(cli_stacks, "WAIT_PAGE", 5)
    web_on_twelve(controller)
    return InProcessClient(controller)


def test_status_reads_every_page(fleet: InProcessClient) -> None:
    """_stack_status joins the pages: all 12 rows once, in order, with the counts; three requests."""
    result = cli_stacks._stack_status(fleet, "web")  # type: ignore[arg-type]
    assert [r["device"] for r in result["devices"]] == [f"d-{i:02}" for i in range(12)]
    assert (result["counts"], result["total"], len(fleet.requests)) == ({"pending": 7, "running": 5}, 12, 3)
    assert "next" not in result


def test_wait_on_a_big_fleet_names_its_failing_devices(
    fleet: InProcessClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """--wait past one page prints the counts, and a rejecting device fails it by name."""
    controller = fleet.controller
    record = controller.store.get_desired("d-09")
    assert record is not None
    rejected = ReportedState(device_id="d-09", generation=record.generation - 1, error="bad file")
    controller.handle(topics.device("d-09", DeviceTopic.REPORTED), codec.encode(rejected))
    with pytest.raises(TetherError, match=r"stack web failed on d-09\Z"):
        cli_stacks._wait(fleet, "web", lambda counts, total: counts.get("running", 0) == total, 5, "table")  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "12 devices: 6 pending, 1 rejected, 5 running" in out and "d-09: rejected: bad file" in out


def test_wait_times_out_naming_the_devices_not_done(fleet: InProcessClient) -> None:
    """--wait that runs out of time names the devices still pending, whatever page they are on."""
    with pytest.raises(TetherError) as timed_out:
        cli_stacks._wait(fleet, "web", lambda counts, total: counts.get("running", 0) == total, 0, "json")  # type: ignore[arg-type]
    assert "waiting for d-05, d-06, d-07, d-08, d-09, d-10, d-11" in str(timed_out.value)
