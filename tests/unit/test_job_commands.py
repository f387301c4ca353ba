"""Job commands on a real SQLite store: desired states, results, status and refusals."""

from __future__ import annotations

import pytest
from support.fleet import desired, job_result, online
from support.recording import RecordingPublisher
from tether.controller.service import Controller
from tether.protocol.commands import (
    CommandModel,
    GroupsCreate,
    JobsList,
    JobsLogs,
    JobsRemove,
    JobsRun,
    JobsSchedule,
    JobsStatus,
)
from tether.protocol.errors import CommandError, ConflictError, ErrorCode
from tether.protocol.models import JobResult
from tether.protocol.results import Removed


@pytest.fixture
def edge(controller: Controller) -> Controller:
    """The controller with group ``edge`` of two online devices."""
    online(controller, "pi-1")
    online(controller, "pi-2")
    controller.execute(GroupsCreate(name="edge", devices=("pi-1", "pi-2")))
    return controller


def test_a_job_run_goes_to_each_member_and_its_results_are_read_back(
    edge: Controller, publisher: RecordingPublisher
) -> None:
    """jobs.run puts the job (with a run id) in each member's desired state; results show in ls, status and logs."""
    job = edge.execute(JobsRun(name="fsck", group="edge", command=("fsck", "-n"))).job
    assert (job.trigger, job.command) == ("once", ["fsck", "-n"])
    state = desired(publisher, "pi-1")
    assert state is not None and [(j.name, j.command) for j in state.jobs] == [("fsck", ("fsck", "-n"))]
    run = state.jobs[0].run_id
    assert run
    job_result(
        edge, "pi-1", 1, JobResult(job="fsck", run=run, started=5.0, duration_s=1.0, exit_code=0, output="ok")
    )
    listed = edge.execute(JobsList()).jobs
    assert [(j.name, j.devices, j.succeeded) for j in listed] == [("fsck", 1, 1)]
    status = edge.execute(JobsStatus(name="fsck")).devices
    assert [(r.device, r.last and r.last["exit_code"]) for r in status] == [
        ("pi-1", 0),
        ("pi-2", None),
    ]
    assert "output" not in status[0].last
    logs = edge.execute(JobsLogs(name="fsck")).results
    assert [(r["device"], r["output"]) for r in logs] == [("pi-1", "ok")]


def test_a_result_of_an_unknown_job_is_not_stored(edge: Controller) -> None:
    """A job.result naming a job the controller does not have is dropped and counted."""
    job_result(edge, "pi-1", 1, JobResult(job="ghost", run="r1", started=1.0, duration_s=0.1, exit_code=0))
    assert edge.store.list_job_results("ghost", None, 10) == []
    assert edge.store.dropped("pi-1") == {"job_result_unknown_job": 1}


def test_a_scheduled_job_and_its_removal(edge: Controller, publisher: RecordingPublisher) -> None:
    """jobs.schedule with a cron goes to the devices; jobs.rm takes it out of their desired states."""
    job = edge.execute(JobsSchedule(name="backup", group="edge", command=("backup",), cron="0 3 * * *")).job
    assert job.trigger == "cron 0 3 * * *"
    state = desired(publisher, "pi-2")
    assert state is not None and [j.cron for j in state.jobs] == ["0 3 * * *"]
    assert edge.execute(JobsRemove(name="backup")) == Removed(removed="backup")
    state = desired(publisher, "pi-2")
    assert state is not None and state.jobs == ()


@pytest.mark.parametrize(
    ("command", "error"),
    [
        (JobsRun(name="Bad!", group="edge", command=("x",)), "invalid job name 'Bad!'"),
        (JobsRun(name="j", group="nope", command=("x",)), "unknown group 'nope'"),
        (JobsRun(name="j", group="edge", command=()), "a job needs a command"),
        (JobsSchedule(name="j", group="edge", command=("x",)), "either a cron expression or an interval"),
        (
            JobsSchedule(name="j", group="edge", command=("x",), cron="* * * * *", every_s=60),
            "either a cron expression or an interval",
        ),
        (JobsSchedule(name="j", group="edge", command=("x",), cron="61 * * * *"), "invalid cron expression"),
        (JobsStatus(name="nope"), "unknown job 'nope'"),
        (JobsLogs(name="nope"), "unknown job 'nope'"),
        (JobsRemove(name="nope"), "unknown job 'nope'"),
    ],
)
def test_bad_job_commands_are_refused_and_store_nothing(
    edge: Controller, command: CommandModel, error: str
) -> None:
    """Each bad job command is one error naming the problem; no job is stored."""
    with pytest.raises(CommandError, match=error) as refused:
        edge.execute(command)
    expected = ErrorCode.NOT_FOUND if error.startswith("unknown") else ErrorCode.INVALID
    assert refused.value.code == expected
    assert edge.store.list_jobs() == []


def test_a_job_name_is_taken_until_removed(edge: Controller) -> None:
    """A second job of the same name is refused; the first stays as it was."""
    edge.execute(JobsRun(name="fsck", group="edge", command=("fsck",)))
    with pytest.raises(ConflictError, match="job 'fsck' already exists"):
        edge.execute(JobsRun(name="fsck", group="edge", command=("other",)))
    job = edge.store.get_job("fsck")
    assert job is not None and job.spec.command == ("fsck",)
