"""``tether deployments ls|status|events|pause|resume|promote|switch|rollback``: versions of
a stack rolling out to its group, and following one until it settles (``stacks deploy --wait``
follows with :func:`wait_deployment` too)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import Any

import click
from tether.protocol.client import ControllerClient
from tether.protocol.commands import DeploymentsAction, DeploymentsEvents, DeploymentsList, DeploymentsStatus
from tether.protocol.durations import format_duration
from tether.protocol.errors import TetherError
from tether.protocol.logsafe import printable

from . import output
from .common import common, send_and_print, wait_timeout_option


@click.group()
def deployments() -> None:
    """Deployments: versions of a stack rolling out to its group."""


@deployments.command("ls")
@click.option("--stack", default=None, help="Only this stack's deployments.")
@common
def deployments_ls(client: ControllerClient, fmt: str, stack: str | None) -> None:
    """List recent deployments, newest first."""
    send_and_print(client, fmt, DeploymentsList(stack=stack), _deployments_table, key="deployments")


def _deployments_table(deployments: list[dict[str, Any]]) -> str:
    rows = [
        (
            d["id"],
            d["stack"],
            d["state"],
            d["strategy"]["kind"],
            (d["from_hash"] or "-")[:12],
            d["to_hash"][:12],
            ", ".join(f"{k}:{v}" for k, v in sorted(d["counts"].items())),
            output.when(d["updated"]),
        )
        for d in deployments
    ]
    return output.table(["ID", "STACK", "STATE", "STRATEGY", "FROM", "TO", "DEVICES", "UPDATED"], rows)


@deployments.command("status")
@click.argument("deployment_id", type=int)
@click.option(
    "-f", "--follow", is_flag=True, help="Follow it until it settles (Ctrl-C stops following only)."
)
@click.option(
    "--timeout",
    callback=wait_timeout_option,
    default="5m",
    show_default=True,
    help="How long --follow waits.",
)
@common
def deployments_status(
    client: ControllerClient, fmt: str, deployment_id: int, follow: bool, timeout: float
) -> None:
    """Show a deployment and every device's progress."""
    if follow:
        wait_deployment(client, deployment_id, timeout, fmt)
    d = _deployment_status(client, deployment_id)
    if fmt == "json":
        click.echo(output.to_json(d))
        return
    for line in _status_text(d):
        click.echo(line)
    _deployment_events(client, d)


STATUS_PAGE = 1000
"""Devices per ``deployments.status`` request: a deployment of any size is read page by page."""
WAIT_PAGE = 200
"""Devices per poll of ``--wait``/``--follow``: a bigger deployment is followed by its counts."""
SETTLED = ("healthy", "pending (offline)", "held", "staged")
"""Device states a deployment that settles does not wait for."""


def _deployment_status(
    client: ControllerClient, deployment_id: int, states: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``deployments.status`` with every device (of ``states``, if given), read page by page.
    A controller from before paging answers with every device in one reply."""
    result = client.request(DeploymentsStatus(id=deployment_id, limit=STATUS_PAGE, states=states))
    d: dict[str, Any] = result["deployment"]
    devices = dict(d.get("devices") or {})
    while result.get("next"):
        result = client.request(
            DeploymentsStatus(id=deployment_id, after=result["next"], limit=STATUS_PAGE, states=states)
        )
        d = result["deployment"]
        devices.update(d.get("devices") or {})
    d["devices"] = {k: r for k, r in devices.items() if not states or r["state"] in states}
    return d


def _status_text(d: dict[str, Any]) -> list[str]:
    s = d["strategy"]
    lines = [
        f"deployment {d['id']} of {d['stack']}: {d['state']}" + (f" ({d['message']})" if d["message"] else "")
    ]
    strategy = _strategy_line(s)
    if s.get("stage_only"):
        strategy = strategy[:-1] + f", stage only, {'switched' if d.get('switched') else 'not switched yet'})"
    lines.append(f"strategy:   {strategy}")
    lines.append(f"version:    {(d['from_hash'] or '-')[:12]} -> {d['to_hash'][:12]}, batch {d['batch']}")
    rows = [
        (
            k,
            r["state"],
            r["batch"] or "",
            r.get("progress")
            or (f"healthy in {format_duration(r['healthy_in'])}" if "healthy_in" in r else ""),
            r.get("error") or r.get("reason") or "",
        )
        for k, r in d["devices"].items()
    ]
    return [*lines, "", output.table(["DEVICE", "STATE", "BATCH", "PROGRESS", "WHY"], rows)]


EVENT_DEVICES = 10
"""Devices whose events `deployments status` shows (the ones not healthy first)."""


def _deployment_events(client: ControllerClient, d: dict[str, Any]) -> None:
    """What each device said about the deployment (``deployments.events``), after its status."""
    events = client.request(DeploymentsEvents(id=d["id"], devices=EVENT_DEVICES))
    if any(events["devices"].values()):
        more = f" (the first {EVENT_DEVICES} devices: tether deployments events {d['id']} --device ID)"
        click.echo("")
        click.echo(f"events since the deployment began{more if events['more'] else ''}:")
        click.echo(_events_table(events["devices"]))


def _events_table(devices: dict[str, list[dict[str, Any]]]) -> str:
    rows = [
        (
            device_id,
            output.when(e["at"])[11:],
            e["kind"],
            printable("/".join(x for x in (e.get("stack"), e.get("service")) if x)),
            printable(e["message"]),
        )
        for device_id, events in devices.items()
        for e in events
    ]
    return output.table(["DEVICE", "AT", "EVENT", "SERVICE", "MESSAGE"], rows)


@deployments.command("events")
@click.argument("deployment_id", type=int)
@click.option("--device", "device_id", help="Only this device of the deployment.")
@click.option(
    "--devices",
    "count",
    type=click.IntRange(1, 100),
    default=EVENT_DEVICES,
    show_default=True,
    help="At most this many devices (those not healthy first).",
)
@common
def deployments_events(
    client: ControllerClient, fmt: str, deployment_id: int, device_id: str | None, count: int
) -> None:
    """What each device said about a deployment, in order: images downloaded, services created,
    restarted (exit code), healthy, unhealthy, exited (last log lines), errors."""
    send_and_print(
        client,
        fmt,
        DeploymentsEvents(id=deployment_id, device_id=device_id, devices=count),
        lambda events: _events_text(events, deployment_id),
    )


def _events_text(events: dict[str, Any], deployment_id: int) -> list[str]:
    if not any(events["devices"].values()):
        lines = [f"no events from the devices of deployment {deployment_id} yet"]
    else:
        lines = [_events_table(events["devices"])]
    if events["more"]:
        lines.append(f"({events['more']} more device(s): --devices N or --device ID)")
    return lines


def say_next_step(d: dict[str, Any]) -> None:
    """What a deployment that settled short of success waits for, and the command for it."""
    steps = {
        "awaiting-promotion": f"awaits promotion: tether deployments promote {d['id']} (or resume {d['id']})",
        "paused": f"is paused: tether deployments resume {d['id']}",
    }
    click.echo(f"deployment {d['id']} " + steps.get(d["state"], f"is {d['state']}"))


def _strategy_line(s: dict[str, Any]) -> str:
    """The settings that apply to this kind of deployment, in the CLI's own words."""
    parts = []
    if s["kind"] != "all-at-once":
        parts.append(f"{s['max_parallel']} at a time")
    if s["kind"] == "canary":
        parts.append(f"{output.plural(s['canary'], 'canary')}".replace("canarys", "canaries"))
    parts += [
        f"healthy after {format_duration(s['min_healthy_time_s'])}",
        f"deadline {format_duration(s['healthy_deadline_s'])}",
        f"downloads within {format_duration(s.get('download_deadline_s', 86400))}",
    ]
    if s["auto_revert"]:
        parts.append("auto-revert")
    if s["auto_promote"]:
        parts.append("auto-promote")
    return f"{s['kind']} ({', '.join(parts)})"


def _deployment_action(kind: str, verb: str) -> Callable[..., Any]:
    @click.argument("deployment_id", type=int)
    @click.option("--wait", is_flag=True, help="Then follow the deployment until it settles.")
    @click.option(
        "--timeout",
        callback=wait_timeout_option,
        default="5m",
        show_default=True,
        help="How long --wait waits.",
    )
    @common
    def command(client: ControllerClient, fmt: str, deployment_id: int, wait: bool, timeout: float) -> None:
        d = client.request(DeploymentsAction(kind=kind, id=deployment_id))["deployment"]  # type: ignore[arg-type]
        if fmt == "table":
            click.echo(f"deployment {d['id']} of {d['stack']}: {d['state']}")
        if wait:
            d = wait_deployment(client, d["id"], timeout, fmt)
            if fmt == "table":
                if d["state"] == "succeeded":
                    click.echo(f"deployment {d['id']} succeeded")
                else:
                    say_next_step(d)
        if fmt == "json":
            click.echo(output.to_json(d))

    command.__doc__ = f"{verb} a deployment."
    return command


deployments.command("pause")(_deployment_action("deployments.pause", "Pause (move no more devices)"))
deployments.command("resume")(_deployment_action("deployments.resume", "Resume"))
deployments.command("promote")(_deployment_action("deployments.promote", "Promote the canaries of"))
deployments.command("switch")(
    _deployment_action("deployments.switch", "Switch devices to the version staged by (--stage-only)")
)
deployments.command("rollback")(
    _deployment_action("deployments.rollback", "Roll back (deploy the previous version of)")
)


def _rollout_line(r: dict[str, Any], min_healthy: float) -> str:
    """``updating (batch 1), healthy in 8s`` or ``downloading (batch 1): 43% (...)`` (the state
    said once): the countdown ticks in steps of a tenth of min_healthy_time (at least a second)."""
    line = r["state"] + (f" (batch {r['batch']})" if r["batch"] else "")
    progress = r.get("progress") or ""
    if r["state"] == "downloading" and progress.startswith("downloading"):
        progress = progress.removeprefix("downloading").strip()
        line += f": {progress}" if progress else ""
    elif progress:
        line += f", {progress}"
    if r.get("healthy_in") is not None:
        tick = max(1.0, min_healthy / 10)
        line += f", healthy in {format_duration(math.ceil(r['healthy_in'] / tick) * tick)}"
    return line


def wait_deployment(client: ControllerClient, deployment_id: int, timeout: float, fmt: str) -> dict[str, Any]:
    """Follow a deployment, printing each device's progress by batch, until it settles.

    Ctrl-C stops following, not the deployment: it says so, and how to follow it again."""
    try:
        return _follow_deployment(client, deployment_id, timeout, fmt)
    except KeyboardInterrupt:
        click.echo(
            f"\ntether: stopped following; deployment {deployment_id} goes on "
            f"(tether deployments status {deployment_id} --follow)",
            err=True,
        )
        sys.exit(130)


def _follow_deployment(
    client: ControllerClient, deployment_id: int, timeout: float, fmt: str
) -> dict[str, Any]:
    """Each poll reads the counts and at most :data:`WAIT_PAGE` devices: a deployment of at
    most that many devices prints each device's changes, a bigger one its counts when they
    change. What it returns holds every device (read page by page once it settled)."""
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    last = ""
    while True:
        result = client.request(DeploymentsStatus(id=deployment_id, limit=WAIT_PAGE))
        d = result["deployment"]
        whole = not result.get("next")
        if whole:
            for device, r in d["devices"].items():
                line = _rollout_line(r, d["strategy"]["min_healthy_time_s"])
                if seen.get(device) != line:
                    seen[device] = line
                    if fmt == "table":
                        detail = r.get("error") or r.get("reason")
                        click.echo(f"  {device}: {line}" + (f": {detail}" if detail else ""))
        elif fmt == "table" and (line := _counts_line(d["counts"])) != last:
            last = line
            click.echo(f"  {line}")
        if d["state"] in ("failed", "reverted", "superseded"):
            raise TetherError(
                f"deployment {deployment_id} {d['state']}: {d.get('message') or ''}".rstrip(": ")
            )
        if d["state"] in ("succeeded", "awaiting-promotion", "paused", "staged"):
            return d if whole else _deployment_status(client, deployment_id)
        if time.monotonic() >= deadline:
            if whole:
                busy = [k for k, r in d["devices"].items() if r["state"] not in SETTLED]
            else:
                states = tuple(s for s in d["counts"] if s not in SETTLED)
                busy = list(_deployment_status(client, deployment_id, states)["devices"]) if states else []
            raise TetherError(
                f"timed out after {format_duration(timeout)}; deployment {deployment_id} goes on and still "
                f"waits for {_some(busy)} (tether deployments status {deployment_id} --follow)"
            )
        time.sleep(0.5)


def _counts_line(counts: dict[str, int]) -> str:
    """``10000 devices: 9000 healthy, 1000 updating``."""
    total = sum(counts.values())
    return f"{output.plural(total, 'device')}: " + (
        ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    )


def _some(names: list[str], most: int = 20) -> str:
    """Names joined by commas, at most ``most`` of them, then how many more."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def register(main: click.Group) -> None:
    main.add_command(deployments)
