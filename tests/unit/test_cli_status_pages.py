"""The CLI reads a stack's and a deployment's status page by page: every row once, counts over all, --wait on the counts."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel
from support.fleet import report_running, web_on_twelve
from tether.cli import deployments as cli_deployments
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


@pytest.fixture
def rolled(fleet: InProcessClient, monkeypatch: pytest.MonkeyPatch) -> int:
    """Stack web's deployment on the 12 devices: d-00..d-04 healthy, the 7 others updating,
    read by the CLI 5 devices a page. Its id."""
    monkeypatch.setattr(cli_deployments, "STATUS_PAGE", 5)
    monkeypatch.setattr(cli_deployments, "WAIT_PAGE", 5)
    controller = fleet.controller
    controller.advance_deployments()  # d-00..d-04 report it running: their healthy timers start
    controller.clock.now += 11  # type: ignore[attr-defined]  # past min_healthy_time
    controller.advance_deployments()
    fleet.requests.clear()
    return controller.store.latest_deployments()["web"].id


def test_deployment_status_reads_every_page(fleet: InProcessClient, rolled: int) -> None:
    """_deployment_status joins the pages: all 12 devices once, in order, with the counts; three requests."""
    d = cli_deployments._deployment_status(fleet, rolled)  # type: ignore[arg-type]
    assert list(d["devices"]) == [f"d-{i:02}" for i in range(12)]
    assert (d["counts"], len(fleet.requests)) == ({"healthy": 5, "updating": 7}, 3)
    assert d["devices"]["d-00"]["state"] == "healthy" and d["devices"]["d-11"]["state"] == "updating"


def test_following_a_big_deployment_prints_counts_and_names_the_devices_it_waits_for(
    fleet: InProcessClient, rolled: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """--wait past one page polls one page and prints the counts; a timeout names the devices not done."""
    with pytest.raises(TetherError) as timed_out:
        cli_deployments.wait_deployment(fleet, rolled, 0, "table")  # type: ignore[arg-type]
    assert "still waits for d-05, d-06, d-07, d-08, d-09, d-10, d-11 (" in str(timed_out.value)
    assert "12 devices: 5 healthy, 7 updating" in capsys.readouterr().out
    polls = [r for r in fleet.requests if getattr(r, "after", None) is None and not getattr(r, "states", ())]
    assert [getattr(r, "limit", None) for r in polls] == [5], "one poll of one page, not every device"


def test_following_a_deployment_to_success_returns_every_device(fleet: InProcessClient, rolled: int) -> None:
    """A followed deployment that succeeds is returned whole (every page), as the CLI prints it with -o json."""
    controller = fleet.controller
    stack = controller.store.get_stack("web")
    assert stack is not None
    for i in range(5, 12):
        record = controller.store.get_desired(f"d-{i:02}")
        assert record is not None
        report_running(controller, f"d-{i:02}", record.generation, {"web": stack.spec_hash})
    controller.advance_deployments()
    controller.clock.now += 11  # type: ignore[attr-defined]
    controller.advance_deployments()
    d = cli_deployments.wait_deployment(fleet, rolled, 5, "json")  # type: ignore[arg-type]
    assert d["state"] == "succeeded" and d["counts"] == {"healthy": 12}
    assert list(d["devices"]) == [f"d-{i:02}" for i in range(12)]
