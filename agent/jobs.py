"""Edge jobs on the device: one-shot and scheduled commands, evaluated locally.

Theory of operation
-------------------
Jobs arrive in the desired state (:class:`~tether.protocol.models.JobSpec`) and are
scheduled *on the device*, so a cron job runs while the link is down. :class:`JobScheduler`
is pure (the clock is passed in) and keeps a small state the agent saves on disk:

* one-shot jobs (``run_id``) run once per id, ever: finished ids are remembered;
* ``cron`` jobs (5 fields, UTC, via cronsim) run at the first matching minute after the last
  run (missed minutes while the device was off are folded into one run);
* ``every_s`` jobs run every so many seconds after the job first appeared.

When a job is due while its previous run still runs, ``concurrency`` decides: ``skip``
(a skipped result is recorded) or ``queue`` (one more run follows the current one).
Runs happen off the agent's thread (:func:`run_job`); each result goes out as a
``job.result`` event through the agent's on-disk outbox, so results produced offline are
delivered when the link is back.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tether.protocol.models import JobResult, JobSpec
from tether.protocol.schedule import next_cron

OUTPUT_LIMIT = 4096
"""Characters of a run's output kept (the tail)."""


@dataclass
class JobScheduler:
    """Which jobs are due; pure (time passed in). ``state()`` is what to persist."""

    jobs: dict[str, JobSpec] = field(default_factory=dict)
    done: list[str] = field(default_factory=list)
    last: dict[str, float] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    queued: dict[str, int] = field(default_factory=dict)

    DONE_KEPT = 500

    @classmethod
    def from_state(cls, state: dict[str, Any] | None) -> JobScheduler:
        state = state or {}
        return cls(done=list(state.get("done", [])), last=dict(state.get("last", {})))

    def state(self) -> dict[str, Any]:
        return {"done": self.done[-self.DONE_KEPT :], "last": self.last}

    def set_jobs(self, jobs: tuple[JobSpec, ...], now: float) -> None:
        """The jobs the desired state now lists. New scheduled jobs start counting from ``now``."""
        self.jobs = {j.name: j for j in jobs}
        for name in list(self.last):
            if name not in self.jobs:
                del self.last[name]
        for job in jobs:
            if job.run_id is None:
                self.last.setdefault(job.name, now)

    def due(
        self, now: float, ready: Callable[[JobSpec], bool] = lambda job: True
    ) -> tuple[list[tuple[JobSpec, str]], list[tuple[JobSpec, str]]]:
        """(runs to start, runs skipped because the previous one still runs). A job that is not
        ``ready`` (its image still on its way) waits: it runs once when it is, if it is due."""
        start: list[tuple[JobSpec, str]] = []
        skipped: list[tuple[JobSpec, str]] = []
        for name, job in sorted(self.jobs.items()):
            if not ready(job):
                continue
            if job.run_id is not None:
                if job.run_id not in self.done and name not in self.running:
                    start.append((job, job.run_id))
                continue
            last = self.last.get(name, now)
            due_at = last + job.every_s if job.every_s else next_cron(job.cron or "* * * * *", last)
            if now < due_at:
                continue
            self.last[name] = now
            run = f"{name}@{int(now)}"
            if name in self.running:
                if job.concurrency == "queue":
                    self.queued[name] = self.queued.get(name, 0) + 1
                else:
                    skipped.append((job, run))
                continue
            start.append((job, run))
        for job, _ in start:
            self.running.add(job.name)
        return start, skipped

    def finished(self, job_name: str, run: str) -> JobSpec | None:
        """A run ended. Returns the job again when a queued run should start now."""
        self.running.discard(job_name)
        job = self.jobs.get(job_name)
        if job is not None and job.run_id == run:
            self.done.append(run)
        if self.queued.get(job_name):
            self.queued[job_name] -= 1
            if job is not None:
                self.running.add(job_name)
                return job
        return None


def run_job(job: JobSpec, run: str, runner: Any) -> JobResult:
    """Run one job to completion (or its timeout) with ``runner(job) -> (exit_code, output, timed_out)``."""
    started = time.time()
    t0 = time.monotonic()
    try:
        exit_code, output, timed_out = runner(job)
    except Exception as exc:  # noqa: BLE001 - a failed launch is a result too
        exit_code, output, timed_out = None, f"cannot run job: {exc}", False
    return JobResult(
        job=job.name,
        run=run,
        started=started,
        duration_s=round(time.monotonic() - t0, 3),
        exit_code=exit_code,
        timed_out=timed_out,
        output=output[-OUTPUT_LIMIT:],
    )


def run_host_command(job: JobSpec) -> tuple[int | None, str, bool]:
    """Run a job's command as a host process (the process driver's way)."""
    import os

    env = dict(os.environ)
    env.update(job.environment)
    try:
        done = subprocess.run(
            list(job.command), capture_output=True, timeout=job.timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        return None, out.decode(errors="replace"), True
    except OSError as exc:
        return None, str(exc), False
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace"), False
