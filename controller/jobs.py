"""Edge jobs: one-shot and scheduled commands run on every device of a group (``jobs.*``).

The controller stores the job and puts it in each member's desired state; the devices run
it (agent/jobs.py) and send each result as a ``job.result`` event (see docs/jobs.md).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from tether.protocol import names
from tether.protocol.commands import JobsList, JobsLogs, JobsRemove, JobsRun, JobsSchedule, JobsStatus
from tether.protocol.errors import CommandError, ConflictError
from tether.protocol.models import JobSpec
from tether.protocol.results import (
    JobDeviceRow,
    JobList,
    JobLogs,
    JobResultView,
    JobStatusResult,
    JobSummary,
    JobView,
    Removed,
)
from tether.protocol.schedule import cron_error

from .context import Context, require
from .devices import attributes
from .models import Job
from .registry import CommandRegistry, Route
from .scheduler import members

commands = CommandRegistry(tag="jobs")
"""The commands handled here (see :mod:`.registry`)."""


def _add_job(ctx: Context, job: Job) -> JobResultView:
    if not names.NAME.ok(job.name):
        raise CommandError(f"invalid job name {job.name!r} (lower-case letters, digits, '.', '_', '-')")
    require(ctx.store.get_group(job.group), "group", job.group)
    if not job.spec.command:
        raise CommandError("a job needs a command")
    if ctx.store.get_job(job.name) is not None:
        raise ConflictError(f"job {job.name!r} already exists; remove it first")
    with ctx.store.transaction():
        ctx.store.put_job(job)
        ctx.scheduler.recompute()
    ctx.publisher.publish_pending()
    return JobResultView(job=job_view(job))


@commands.command(
    JobsRun, http=Route("POST", "/jobs/{name}/run", "Run a job once on every device of a group")
)
def jobs_run(ctx: Context, cmd: JobsRun) -> JobResultView:
    spec = (
        JobSpec(
            name=cmd.name,
            command=cmd.command,
            image=cmd.image,
            timeout_s=cmd.timeout_s,
            run_id=uuid.uuid4().hex[:12],
        )
        if names.NAME.ok(cmd.name)
        else None
    )
    if spec is None:
        raise CommandError(f"invalid job name {cmd.name!r} (lower-case letters, digits, '.', '_', '-')")
    return _add_job(ctx, Job(name=cmd.name, group=cmd.group, spec=spec, created=ctx.clock()))


@commands.command(JobsSchedule, http=Route("POST", "/jobs", "Schedule a job (cron or interval)", status=201))
def jobs_schedule(ctx: Context, cmd: JobsSchedule) -> JobResultView:
    if (cmd.cron is None) == (cmd.every_s is None):
        raise CommandError("a scheduled job needs either a cron expression or an interval (not both)")
    if cmd.cron is not None and (problem := cron_error(cmd.cron)) is not None:
        raise CommandError(f"invalid cron expression {cmd.cron!r}: {problem}")
    if not names.NAME.ok(cmd.name):
        raise CommandError(f"invalid job name {cmd.name!r} (lower-case letters, digits, '.', '_', '-')")
    spec = JobSpec(
        name=cmd.name,
        command=cmd.command,
        image=cmd.image,
        timeout_s=cmd.timeout_s,
        cron=cmd.cron,
        every_s=cmd.every_s,
        concurrency=cmd.concurrency,
    )
    return _add_job(ctx, Job(name=cmd.name, group=cmd.group, spec=spec, created=ctx.clock()))


def job_view(job: Job) -> JobView:
    """A job as replies show it (its trigger in words)."""
    spec = job.spec
    trigger = f"cron {spec.cron}" if spec.cron else f"every {spec.every_s:g}s" if spec.every_s else "once"
    return JobView(
        name=job.name,
        group=job.group,
        trigger=trigger,
        command=list(spec.command),
        image=spec.image,
        timeout_s=spec.timeout_s,
        concurrency=spec.concurrency,
        created=job.created,
    )


def _job(ctx: Context, name: str) -> Job:
    return require(ctx.store.get_job(name), "job", name)


@commands.command(JobsList, role="viewer", http=Route("GET", "/jobs", "Every job"))
def jobs_ls(ctx: Context, cmd: JobsList) -> JobList:
    out = []
    for job in ctx.store.list_jobs():
        latest = _latest_results(ctx, job.name)
        succeeded = sum(1 for r in latest.values() if r["exit_code"] == 0)
        out.append(JobSummary(**dict(job_view(job)), devices=len(latest), succeeded=succeeded))
    return JobList(jobs=out)


def _latest_results(ctx: Context, name: str) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for device_id, body in ctx.store.list_job_results(name, None, 100_000):
        result = json.loads(body)
        if device_id not in latest or result["started"] >= latest[device_id]["started"]:
            latest[device_id] = result
    return latest


@commands.command(JobsStatus, role="viewer", http=Route("GET", "/jobs/{name}", "A job on each device"))
def jobs_status(ctx: Context, cmd: JobsStatus) -> JobStatusResult:
    job = _job(ctx, cmd.name)
    group = ctx.store.get_group(job.group)
    targets = members(group, attributes(ctx.store)) if group else []
    latest = _latest_results(ctx, job.name)
    rows = []
    for device_id in sorted(set(targets) | set(latest)):
        r = latest.get(device_id)
        last = {k: v for k, v in r.items() if k != "output"} if r else None
        rows.append(JobDeviceRow(device=device_id, last=last))
    return JobStatusResult(job=job_view(job), devices=rows)


@commands.command(JobsLogs, role="viewer", http=Route("GET", "/jobs/{name}/logs", "A job's last runs"))
def jobs_logs(ctx: Context, cmd: JobsLogs) -> JobLogs:
    _job(ctx, cmd.name)
    results = [
        {"device": d, **json.loads(b)}
        for d, b in ctx.store.list_job_results(cmd.name, cmd.device_id, cmd.limit)
    ]
    return JobLogs(results=results)


@commands.command(JobsRemove, http=Route("DELETE", "/jobs/{name}", "Remove a job"))
def jobs_rm(ctx: Context, cmd: JobsRemove) -> Removed:
    _job(ctx, cmd.name)
    with ctx.store.transaction():
        ctx.store.delete_job(cmd.name)
        ctx.scheduler.recompute()
    ctx.publisher.publish_pending()
    return Removed(removed=cmd.name)
