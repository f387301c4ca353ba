"""``tether stacks config|deploy|show|ls|status|rm``: Compose stacks deployed to groups.

The Compose files are resolved here (cli/compose_files.py) before they are sent; ``deploy
--wait`` follows the deployment (cli/deployments.py), ``rm --wait`` the stack's status, read
page by page however big the fleet.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import click
from tether.protocol.client import ControllerClient
from tether.protocol.commands import (
    RolloutStrategy,
    StacksDeploy,
    StacksList,
    StacksPlan,
    StacksRemove,
    StacksShow,
    StacksStatus,
)
from tether.protocol.errors import ErrorCode, RequestError, TetherError
from tether.protocol.logsafe import printable

from . import deployments, output
from .common import common, duration_option, fail, read_pages, send_and_print, wait_timeout_option


@click.group()
def stacks() -> None:
    """Stacks: Compose files deployed to groups."""


STATUS_PAGE = 1000
"""Rows per ``stacks.status`` request: a fleet of any size is read page by page."""
WAIT_PAGE = 200
"""Rows per poll of ``--wait``: a stack on more devices is followed by its counts (each row
costs the controller a report parsed: 0.2 s of CPU per poll for 1,000 rows)."""

FAILING = ("failed", "rejected")


def _stack_status(client: ControllerClient, name: str, states: tuple[str, ...] = ()) -> dict[str, Any]:
    """``stacks.status`` with every row (of ``states``, if given), read page by page; counts
    by state over every device. A controller from before paging answers in one reply
    without counts: they are counted from its rows."""
    result, rows = read_pages(
        client,
        lambda after: StacksStatus(name=name, after=after, limit=STATUS_PAGE, states=states),
        "devices",
    )
    if "counts" not in result:
        result["counts"] = dict(Counter(r["state"] for r in rows))
        result["total"] = len(rows)
        rows = [r for r in rows if not states or r["state"] in states]
    result["devices"] = rows
    result.pop("next", None)
    return result


def _counts_line(counts: dict[str, int], total: int) -> str:
    return f"{output.plural(total, 'device')}: " + (
        ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    )


def _wait(
    client: ControllerClient,
    name: str,
    done: Callable[[dict[str, int], int], bool],
    timeout: float,
    fmt: str,
) -> None:
    """Poll the stack's status until ``done(counts by state, total)`` or failure/timeout.

    Each poll reads the counts and at most :data:`WAIT_PAGE` rows. A stack on at most that
    many devices prints each device's changes; a bigger one prints the counts when they
    change, and names its failing devices when it fails."""
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    last = ""
    while True:
        try:
            result = client.request(StacksStatus(name=name, limit=WAIT_PAGE))
        except RequestError as exc:
            if exc.code == ErrorCode.NOT_FOUND:  # not stored yet, or removed
                result = {"devices": [], "counts": {}, "total": 0}
            else:
                raise
        rows = result["devices"]
        if "counts" not in result:  # a controller from before paging: every row, no counts
            result["counts"] = dict(Counter(r["state"] for r in rows))
            result["total"] = len(rows)
        counts, total = result["counts"], result["total"]
        whole = not result.get("next")
        if whole:
            for row in rows:
                line = f"{row['state']}" + (f" ({row['presence']})" if row["presence"] != "online" else "")
                if row.get("progress"):
                    line += f", {row['progress']}"
                if seen.get(row["device"]) != line:
                    seen[row["device"]] = line
                    detail = row.get("error") or row.get("why") or _service_errors(row)
                    if fmt == "table":
                        click.echo(f"  {row['device']}: {line}" + (f": {detail}" if detail else ""))
        elif fmt == "table" and (line := _counts_line(counts, total)) != last:
            last = line
            click.echo(f"  {line}")
        if any(counts.get(s) for s in FAILING):
            failed = rows if whole else _stack_status(client, name, FAILING)["devices"]
            failed = [r for r in failed if r["state"] in FAILING]
            if not whole and fmt == "table":
                for r in failed[:20]:
                    detail = r.get("error") or r.get("why") or _service_errors(r)
                    click.echo(f"  {r['device']}: {r['state']}" + (f": {detail}" if detail else ""))
            raise TetherError(f"stack {name} failed on {_some(r['device'] for r in failed)}")
        if done(counts, total):
            return
        if time.monotonic() >= deadline:
            waiting_states = tuple(s for s in counts if not done({s: counts[s]}, counts[s]))
            waiting = _stack_status(client, name, waiting_states)["devices"] if waiting_states else []
            raise TetherError(
                f"timed out after {timeout:g}s ({_counts_line(counts, total)}) waiting for "
                f"{_some(r['device'] for r in waiting) or 'devices'}"
            )
        time.sleep(0.5)


def _some(names: Iterable[str], most: int = 20) -> str:
    """Names joined by commas, at most ``most`` of them, then how many more."""
    listed = list(names)
    more = f" and {len(listed) - most} more" if len(listed) > most else ""
    return ", ".join(listed[:most]) + more


def _service_errors(row: dict[str, Any]) -> str:
    errors = [f"{k}: {v['last_error']}" for k, v in row.get("services", {}).items() if v.get("last_error")]
    return "; ".join(errors)


def compose_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The Compose file options of `stacks deploy` and `stacks config` (as docker compose's)."""
    for option in reversed(
        [
            click.argument("file", required=False),
            click.option(
                "-f",
                "--file",
                "more_files",
                multiple=True,
                help="Compose file (repeatable: later files are merged over earlier ones).",
            ),
            click.option(
                "--env-file",
                "env_files",
                multiple=True,
                help="Variables for interpolation (repeatable; default: .env beside the first file).",
            ),
            click.option(
                "-e",
                "--env",
                "env",
                multiple=True,
                metavar="KEY=VALUE",
                help="A variable for interpolation, over the shell's and the env files'.",
            ),
            click.option("--profile", "profiles", multiple=True, help="Enable services of this profile."),
        ]
    ):
        fn = option(fn)
    return fn


def _resolve(
    file: str | None,
    more_files: tuple[str, ...],
    env_files: tuple[str, ...],
    env: tuple[str, ...],
    profiles: tuple[str, ...],
) -> Any:
    """The stack's Compose files resolved here (warnings on stderr), as docker compose would."""
    from .compose_files import resolve_files

    resolved = resolve_files([*([file] if file else []), *more_files], env_files, env, profiles)
    for warning in resolved.warnings:
        click.echo(f"tether: warning: {warning}", err=True)
    return resolved


def _plan(plan: dict[str, Any], fmt: str) -> None:
    """What `stacks deploy --dry-run` prints: the version, the devices, each service's fate."""
    if fmt == "json":
        click.echo(output.to_json(plan))
        return
    devices = plan["devices"]
    if not plan["changed"]:
        head = f"stack {plan['name']}: no change (version {plan['version']})"
    else:
        head = f"stack {plan['name']}: would deploy version {plan['version']} ({plan['spec_hash'][:12]})"
    click.echo(
        f"{head} on group {plan['group']}, {len(devices)} device(s)"
        + (f": {printable(', '.join(devices))}" if devices else "")
    )
    rows = [(s["name"], s["change"]) for s in plan["services"]]
    click.echo(output.table(["SERVICE", "CHANGE"], rows))


def _diff_with_deployed(client: ControllerClient, name: str, text: str) -> None:
    """`--dry-run`: the resolved file against the deployed one, as a unified diff."""
    import difflib

    try:
        deployed = client.request(StacksShow(name=name))
    except RequestError as exc:
        if exc.code == ErrorCode.NOT_FOUND:
            return  # a new stack: nothing to compare with
        raise
    diff = difflib.unified_diff(
        deployed["compose"].splitlines(keepends=True),
        text.splitlines(keepends=True),
        f"{name} version {deployed['version']} (deployed)",
        f"{name} (this deploy)",
    )
    lines = [printable(line.rstrip("\n")) for line in diff]
    if lines:
        click.echo("")
        click.echo("\n".join(lines))


@stacks.command("show")
@click.argument("name")
@click.option("--version", "version", type=click.IntRange(1), default=None, help="An earlier version.")
@common
def stacks_show(client: ControllerClient, fmt: str, name: str, version: int | None) -> None:
    """Print the Compose file a stack runs (or ran, with --version), as the controller received it."""
    shown = client.request(StacksShow(name=name, version=version))
    if fmt == "json":
        click.echo(output.to_json(shown))
        return
    state = "current" if shown["version"] == shown["current"] else f"current: {shown['current']}"
    click.echo(
        f"# stack {shown['name']} version {shown['version']} ({state}), {shown['spec_hash'][:12]}, "
        f"group {shown['group']}, deployed {output.when(shown['updated'])}",
        err=True,
    )
    click.echo("\n".join(printable(line) for line in shown["compose"].splitlines()))


@stacks.command("config")
@compose_options
def stacks_config(
    file: str | None,
    more_files: tuple[str, ...],
    env_files: tuple[str, ...],
    env: tuple[str, ...],
    profiles: tuple[str, ...],
) -> None:
    """Print the stack as resolved here (interpolated, merged, included, extended), like
    `docker compose config`: what `stacks deploy` sends to the controller."""
    from tether.protocol.compose_yaml import dump_yaml

    try:
        resolved = _resolve(file, more_files, env_files, env, profiles)
    except TetherError as exc:
        fail(str(exc))
    click.echo(dump_yaml(resolved.doc), nl=False)
    if resolved.files:
        click.echo("# shipped with the stack (the stack's directory on each device):")
        for path, shipped in sorted(resolved.files.items()):
            click.echo(f"#   {path or '.'} ({len(shipped.data)} bytes, mode {shipped.mode:04o})")


@stacks.command("deploy")
@compose_options
@click.option("--name", required=True, help="Stack name.")
@click.option("--group", required=True, help="Target group.")
@click.option(
    "--strategy",
    type=click.Choice(["all-at-once", "rolling", "canary"]),
    default="all-at-once",
    show_default=True,
)
@click.option(
    "--max-parallel",
    type=click.IntRange(0),
    default=1,
    show_default=True,
    help="Devices per batch (0 = all).",
)
@click.option(
    "--canary", "canary", type=click.IntRange(1), default=1, show_default=True, help="Canary devices."
)
@click.option("--min-healthy-time", callback=duration_option, default="10s", show_default=True)
@click.option("--healthy-deadline", callback=duration_option, default="5m", show_default=True)
@click.option(
    "--download-deadline",
    callback=duration_option,
    default="24h",
    show_default=True,
    help="How long a device may take to download the new images, retrying network errors, before it fails.",
)
@click.option(
    "--auto-revert", is_flag=True, help="On failure, move every device back to the previous version."
)
@click.option("--auto-promote", is_flag=True, help="Promote canaries once healthy for --min-healthy-time.")
@click.option(
    "--stage-only",
    is_flag=True,
    help="Download the new version on every device, run nothing new: switch later (tether deployments switch ID).",
)
@click.option("--wait", is_flag=True, help="Follow the deployment until it succeeds or fails.")
@click.option(
    "--timeout",
    callback=wait_timeout_option,
    default="5m",
    show_default=True,
    help="How long --wait waits (90s, 5m).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Validate on the controller and show what would change (devices, services); deploy nothing.",
)
@common
def stacks_deploy(
    client: ControllerClient,
    fmt: str,
    file: str | None,
    more_files: tuple[str, ...],
    env_files: tuple[str, ...],
    env: tuple[str, ...],
    profiles: tuple[str, ...],
    name: str,
    group: str,
    strategy: str,
    max_parallel: int,
    canary: int,
    min_healthy_time: float,
    healthy_deadline: float,
    download_deadline: float,
    auto_revert: bool,
    auto_promote: bool,
    stage_only: bool,
    wait: bool,
    timeout: float,
    dry_run: bool,
) -> None:
    """Deploy (or update) a Compose FILE (and -f overlays) as stack NAME on GROUP.

    The files are resolved here first, as docker compose resolves them (`tether stacks
    config` prints the result); ${var:PATH/KEY} references are left for the device."""
    from tether.protocol.compose_yaml import dump_yaml

    resolved = _resolve(file, more_files, env_files, env, profiles)
    text = dump_yaml(resolved.doc)
    shipped = tuple(f.wire() for _, f in sorted(resolved.files.items()))
    label = " + ".join([*([file] if file else []), *more_files]) or "compose file"
    if dry_run:
        try:
            plan = client.request(StacksPlan(name=name, group=group, compose=text, files=shipped))
        except RequestError as exc:
            raise RequestError(f"{label}: {exc}") from exc
        for warning in plan.get("warnings") or ():
            click.echo(f"tether: warning: {label}: {warning}", err=True)
        _plan(plan, fmt)
        if fmt == "table" and plan["changed"]:
            _diff_with_deployed(client, name, text)
        return
    if healthy_deadline <= 0:
        raise TetherError("--healthy-deadline must be positive")
    rollout = RolloutStrategy(
        kind=strategy,  # type: ignore[arg-type]
        max_parallel=max_parallel,
        canary=canary,
        min_healthy_time_s=min_healthy_time,
        healthy_deadline_s=healthy_deadline,
        download_deadline_s=download_deadline,
        auto_revert=auto_revert,
        auto_promote=auto_promote,
        stage_only=stage_only,
    )
    try:
        result = client.request(
            StacksDeploy(name=name, group=group, compose=text, files=shipped, strategy=rollout)
        )
    except RequestError as exc:
        raise RequestError(f"{label}: {exc}") from exc  # the controller never saw the file's name
    for warning in result.get("warnings") or ():
        click.echo(f"tether: warning: {label}: {warning}", err=True)
    stack = result["stack"]
    never_seen = set(result.get("never_seen") or [])
    reachable = len(result["devices"]) - len(never_seen)
    if fmt == "table":
        verb = "deployed" if result["changed"] else "unchanged"
        click.echo(
            f"stack {stack['name']} {verb}: version {stack['version']} ({stack['spec_hash'][:12]}) "
            f"on group {stack['group']}: reaches {reachable} device(s)"
            + (f" ({len(never_seen)} never connected: {', '.join(sorted(never_seen))})" if never_seen else "")
        )
    if fmt == "table" and result.get("deployment"):
        click.echo(f"deployment {result['deployment']} ({strategy})")
    if wait:
        if result.get("deployment"):
            d = deployments.wait_deployment(client, result["deployment"], timeout, fmt)
            result["final"] = d
            if d["state"] == "staged" and fmt == "table":
                click.echo(
                    f"stack {name} is staged on the {reachable} device(s) of group {group} it reaches: "
                    f"switch with tether deployments switch {d['id']}"
                )
            elif d["state"] != "succeeded" and fmt == "table":
                deployments.say_next_step(d)
        else:
            _wait(client, name, lambda counts, total: counts.get("running", 0) == total, timeout, fmt)
        final = result.get("final", {})
        if fmt == "table" and final.get("state", "succeeded") == "succeeded":
            later = [
                k
                for k, r in final.get("devices", {}).items()
                if r["state"] in ("held", "pending (offline)") and k not in never_seen
            ]
            running = reachable - len(later)
            if running <= 0 and not later:
                click.echo(f"stack {name} runs on no device: group {group} reaches none")
            elif later:
                click.echo(
                    f"stack {name} is running on {running} of {reachable} device(s) of group {group}; "
                    f"{', '.join(later)} will update when released or back online"
                )
            else:
                if (stack.get("placement") or {}).get("mode") == "replicas":
                    click.echo(
                        f"stack {name} is running: {output.plural(running, 'replica')} in group {group}"
                    )
                else:
                    click.echo(f"stack {name} is running on all {running} device(s) of group {group}")
    if fmt == "json":
        click.echo(output.to_json(result))


@stacks.command("ls")
@common
def stacks_ls(client: ControllerClient, fmt: str) -> None:
    """List stacks."""
    send_and_print(client, fmt, StacksList(), _stacks_table, key="stacks")


def _stacks_table(stacks: list[dict[str, Any]]) -> str:
    rows = [
        (
            s["name"],
            s["group"],
            s["version"],
            s["spec_hash"][:12],
            f"{s['running']}/{s['devices']}",
            output.when(s["updated"]),
        )
        for s in stacks
    ]
    return output.table(["STACK", "GROUP", "VERSION", "HASH", "RUNNING", "UPDATED"], rows)


@stacks.command("status")
@click.argument("name")
@common
def stacks_status(client: ControllerClient, fmt: str, name: str) -> None:
    """Show where a stack stands on each device: the counts by state, then each device
    (the failing ones first)."""
    result = _stack_status(client, name)
    if fmt == "json":
        click.echo(output.to_json(result))
        return
    click.echo(_counts_line(result["counts"], result["total"]))
    rows = []
    for r in sorted(result["devices"], key=lambda r: r["state"] not in FAILING):
        services = (
            ", ".join(
                f"{k}:{v['state']}" + (f"({v['health']})" if v.get("health") else "")
                for k, v in r["services"].items()
            )
            or "-"
        )
        rollout = r.get("rollout") or ("held" if r.get("held") else "-")
        state = r["state"] + (f", {r['progress']}" if r.get("progress") else "")
        why = r.get("error") or r.get("why") or _service_errors(r)
        rows.append((r["device"], r["presence"], state, rollout, services, why))
    click.echo(output.table(["DEVICE", "PRESENCE", "STATE", "ROLLOUT", "SERVICES", "ERROR"], rows))


@stacks.command("rm")
@click.argument("name")
@click.option("--wait", is_flag=True, help="Wait until every device has removed it.")
@click.option(
    "--timeout",
    callback=wait_timeout_option,
    default="5m",
    show_default=True,
    help="How long --wait waits (90s, 5m).",
)
@common
def stacks_rm(client: ControllerClient, fmt: str, name: str, wait: bool, timeout: float) -> None:
    """Remove a stack from every device."""
    result = client.request(StacksRemove(name=name))
    if fmt == "table":
        click.echo(f"stack {name} removed from the controller; devices are removing it")
    if wait:
        _wait(client, name, lambda counts, total: total == 0, timeout, fmt)
        if fmt == "table":
            click.echo(f"stack {name} is gone from every device")
    if fmt == "json":
        click.echo(output.to_json(result))


def register(main: click.Group) -> None:
    main.add_command(stacks)
