"""The device-side job scheduler (pure) and cron evaluation."""

from __future__ import annotations

from datetime import UTC, datetime

from tether.agent.jobs import JobScheduler, run_host_command, run_job
from tether.protocol.models import JobSpec
from tether.protocol.schedule import cron_error, next_cron

T0 = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC).timestamp()


def test_cron_next_and_errors() -> None:
    """Cron is evaluated in UTC; invalid expressions are explained."""
    assert next_cron("*/5 * * * *", T0) == datetime(2026, 1, 1, 12, 5, tzinfo=UTC).timestamp()
    assert cron_error("* * * * *") is None
    assert cron_error("61 * * * *")
    assert cron_error("not cron")


def test_one_shot_runs_once_even_across_restarts() -> None:
    """A run id runs once; the persisted state remembers it."""
    job = JobSpec(name="once", command=("true",), run_id="r1")
    sched = JobScheduler()
    sched.set_jobs((job,), T0)
    start, _ = sched.due(T0)
    assert [(j.name, r) for j, r in start] == [("once", "r1")]
    assert sched.due(T0 + 1) == ([], [])  # still running
    sched.finished("once", "r1")
    restored = JobScheduler.from_state(sched.state())
    restored.set_jobs((job,), T0 + 100)
    assert restored.due(T0 + 100) == ([], [])


def test_cron_job_runs_at_matching_minutes_and_folds_missed_ones() -> None:
    """A cron job runs at the next matching minute; a long gap gives one run, not many."""
    job = JobSpec(name="c", command=("true",), cron="* * * * *")
    sched = JobScheduler()
    sched.set_jobs((job,), T0)
    assert sched.due(T0 + 10) == ([], [])
    start, _ = sched.due(T0 + 30)  # 12:01:00
    assert len(start) == 1
    sched.finished("c", start[0][1])
    start, _ = sched.due(T0 + 30 + 3600)  # an hour later: one run
    assert len(start) == 1


def test_concurrency_skip_and_queue() -> None:
    """skip records a skipped run; queue runs once more after the current run."""
    skip = JobSpec(name="s", command=("true",), every_s=1)
    queue = JobSpec(name="q", command=("true",), every_s=1, concurrency="queue")
    sched = JobScheduler()
    sched.set_jobs((skip, queue), T0)
    start, _ = sched.due(T0 + 1)
    assert {j.name for j, _ in start} == {"s", "q"}
    start, skipped = sched.due(T0 + 2)
    assert start == [] and [j.name for j, _ in skipped] == ["s"]
    assert sched.finished("q", "q@1") == queue  # the queued run starts now
    assert sched.finished("s", "s@1") is None


def test_removed_jobs_are_forgotten() -> None:
    """A job no longer in the desired state is not scheduled."""
    sched = JobScheduler()
    sched.set_jobs((JobSpec(name="e", command=("true",), every_s=1),), T0)
    sched.set_jobs((), T0)
    assert sched.due(T0 + 5) == ([], []) and sched.state()["last"] == {}


def test_run_job_captures_exit_output_and_timeout() -> None:
    """A host command's exit code and output are captured; a timeout is reported as such."""
    ok = run_job(
        JobSpec(name="a", command=("sh", "-c", "echo out; echo err >&2; exit 3")), "r", run_host_command
    )
    assert ok.exit_code == 3 and "out" in ok.output and "err" in ok.output and not ok.timed_out
    slow = run_job(JobSpec(name="b", command=("sleep", "5"), timeout_s=0.2), "r", run_host_command)
    assert slow.timed_out and slow.exit_code is None
    missing = run_job(JobSpec(name="c", command=("/nonexistent/cmd",)), "r", run_host_command)
    assert missing.exit_code is None and "nonexistent" in missing.output


def test_a_job_whose_image_is_not_here_waits_then_runs_once() -> None:
    """A job that is not ready (its image still downloading) does not start; once ready it
    starts once, a scheduled one folding the runs it missed meanwhile."""
    once = JobSpec(name="once", command=("true",), image="app:1", run_id="r1")
    every = JobSpec(name="every", command=("true",), image="app:1", every_s=10)
    sched = JobScheduler()
    sched.set_jobs((once, every), T0)
    here: set[str] = set()
    assert sched.due(T0 + 35, lambda job: job.image in here) == ([], [])
    here.add("app:1")
    start, _ = sched.due(T0 + 36, lambda job: job.image in here)
    assert sorted(r for _, r in start) == [f"every@{int(T0 + 36)}", "r1"]
