"""``tether jobs run|schedule|ls|status|logs|rm``: one-shot or scheduled commands on the devices of a group."""

from __future__ import annotations

from typing import Any

import click
from tether.protocol.client import ControllerClient
from tether.protocol.commands import JobsList, JobsLogs, JobsRemove, JobsRun, JobsSchedule, JobsStatus

from . import output
from .common import common, duration_option, send_and_print


@click.group()
def jobs() -> None:
    """Edge jobs: one-shot or scheduled commands on every device of a group."""


def _job_line(j: dict[str, Any]) -> str:
    return f"job {j['name']} on group {j['group']} ({j['trigger']}): {' '.join(j['command'])}"


@jobs.command("run")
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option("--group", required=True)
@click.option("--image", default=None, help="Run in this image (docker driver); else a host command.")
@click.option("--timeout", "timeout_s", callback=duration_option, default="5m", show_default=True)
@common
def jobs_run(
    client: ControllerClient,
    fmt: str,
    name: str,
    command: tuple[str, ...],
    group: str,
    image: str | None,
    timeout_s: float,
) -> None:
    """Run COMMAND once on every device of a group: tether jobs run NAME --group G -- CMD..."""
    run = JobsRun(name=name, group=group, command=command, image=image, timeout_s=timeout_s)
    send_and_print(client, fmt, run, _job_line, key="job")


@jobs.command("schedule")
@click.argument("name")
@click.argument("command", nargs=-1, required=True)
@click.option("--group", required=True)
@click.option("--cron", default=None, help="5-field cron expression, evaluated on the device (UTC).")
@click.option("--every", "every_s", callback=duration_option, default=None, help="Or an interval, e.g. 30s.")
@click.option("--image", default=None, help="Run in this image (docker driver); else a host command.")
@click.option("--timeout", "timeout_s", callback=duration_option, default="5m", show_default=True)
@click.option("--concurrency", type=click.Choice(["skip", "queue"]), default="skip", show_default=True)
@common
def jobs_schedule(
    client: ControllerClient,
    fmt: str,
    name: str,
    command: tuple[str, ...],
    group: str,
    cron: str | None,
    every_s: float | None,
    image: str | None,
    timeout_s: float,
    concurrency: str,
) -> None:
    """Run COMMAND on a schedule on every device of a group (runs offline too)."""
    send_and_print(
        client,
        fmt,
        JobsSchedule(
            name=name,
            group=group,
            command=command,
            cron=cron,
            every_s=every_s,
            image=image,
            timeout_s=timeout_s,
            concurrency=concurrency,  # type: ignore[arg-type]
        ),
        _job_line,
        key="job",
    )


@jobs.command("ls")
@common
def jobs_ls(client: ControllerClient, fmt: str) -> None:
    """List jobs."""
    send_and_print(client, fmt, JobsList(), _jobs_table, key="jobs")


def _jobs_table(jobs: list[dict[str, Any]]) -> str:
    rows = [
        (j["name"], j["group"], j["trigger"], " ".join(j["command"]), f"{j['succeeded']}/{j['devices']}")
        for j in jobs
    ]
    return output.table(["JOB", "GROUP", "TRIGGER", "COMMAND", "LAST OK"], rows)


@jobs.command("status")
@click.argument("name")
@common
def jobs_status(client: ControllerClient, fmt: str, name: str) -> None:
    """The last run of a job on each device."""
    send_and_print(client, fmt, JobsStatus(name=name), _status_text)


def _status_text(result: dict[str, Any]) -> list[str]:
    rows = []
    for r in result["devices"]:
        last = r["last"]
        if last is None:
            rows.append((r["device"], "-", "", "", ""))
            continue
        outcome = (
            "skipped"
            if last["skipped"]
            else "timed out"
            if last["timed_out"]
            else f"exit {last['exit_code']}"
        )
        rows.append(
            (r["device"], last["run"], output.when(last["started"]), f"{last['duration_s']:g}s", outcome)
        )
    return [_job_line(result["job"]), output.table(["DEVICE", "RUN", "STARTED", "DURATION", "RESULT"], rows)]


@jobs.command("logs")
@click.argument("name")
@click.option("--device", "device_id", default=None)
@click.option("--limit", type=click.IntRange(1, 200), default=5, show_default=True)
@common
def jobs_logs(client: ControllerClient, fmt: str, name: str, device_id: str | None, limit: int) -> None:
    """Output (a bounded tail) of a job's recent runs."""
    send_and_print(
        client,
        fmt,
        JobsLogs(name=name, device_id=device_id, limit=limit),
        lambda results: _logs_text(results, name, device_id),
        key="results",
    )


def _logs_text(results: list[dict[str, Any]], name: str, device_id: str | None) -> list[str]:
    if not results:
        where = f" on {device_id}" if device_id else ""
        return [
            f"no run of job {name}{where} has reported yet: a device sends a run's output when the run ends"
        ]
    lines = []
    for r in results:
        lines.append(f"== {r['device']} {r['run']} ({output.when(r['started'])}, exit {r['exit_code']})")
        lines.append(r["output"].rstrip("\n"))
    return lines


@jobs.command("rm")
@click.argument("name")
@common
def jobs_rm(client: ControllerClient, fmt: str, name: str) -> None:
    """Remove a job (devices stop scheduling it)."""
    send_and_print(client, fmt, JobsRemove(name=name), lambda _: f"job {name} removed")


def register(main: click.Group) -> None:
    main.add_command(jobs)
