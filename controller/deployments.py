"""Deployments: how a stack's new version reaches its devices (``deployments.*``).

The rollout itself is pure (:mod:`.rollout`); the controller steps every active deployment
(:meth:`~.deploying.Deployer.advance`). These commands show deployments and
pause, resume, promote, switch or roll one back.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from tether.protocol.commands import (
    DeploymentsAction,
    DeploymentsEvents,
    DeploymentsList,
    DeploymentsStatus,
)
from tether.protocol.errors import ConflictError, NotFoundError
from tether.protocol.results import (
    DeploymentEvents,
    DeploymentList,
    DeploymentResult,
    DeploymentStatusResult,
    DeploymentView,
)

from . import rollout, stacks
from .context import Context, require
from .registry import CommandRegistry, Route
from .store import EVENTS_KEPT

commands = CommandRegistry(tag="deployments")
"""The commands handled here (see :mod:`.registry`)."""


def deployment_view(
    ctx: Context, d: rollout.Deployment, full: bool = False, page: Iterable[str] | None = None
) -> DeploymentView:
    """A deployment as replies show it (``full``: with each device's rollout state and
    download; of the devices ``page`` names, in its order, if given)."""
    counts: dict[str, int] = {}
    for r in d.devices.values():
        counts[r.state] = counts.get(r.state, 0) + 1
    view = DeploymentView(
        id=d.id,
        stack=d.stack,
        state=d.state,
        from_hash=d.from_hash,
        to_hash=d.to_hash,
        strategy=d.strategy.model_dump(mode="json"),
        batch=d.batch,
        promoted=d.promoted,
        switched=d.switched,
        counts=counts,
        message=d.message,
        created=d.created,
        updated=d.updated,
    )
    if full:
        fleet = ctx.scheduler.fleet_view()
        now = ctx.clock()
        devices = {}
        for k in sorted(d.devices) if page is None else page:
            r = d.devices[k]
            row = r.model_dump(mode="json")
            seen = fleet.get(k)
            download = seen.downloads.get(d.stack) if seen is not None else None
            if (
                download is not None
                and download.spec_hash == d.to_hash
                and r.state not in ("healthy", "staged")
            ):
                row["download"] = download.model_dump(mode="json")
                row["progress"] = rollout.progress(download)
            if r.state == "updating" and r.healthy_since is not None:
                row["healthy_in"] = max(0.0, d.strategy.min_healthy_time_s - (now - r.healthy_since))
            devices[k] = row
        view = view.model_copy(update={"devices": devices})
    return view


@commands.command(DeploymentsList, role="viewer", http=Route("GET", "/deployments", "Deployments"))
def deployments_ls(ctx: Context, cmd: DeploymentsList) -> DeploymentList:
    return DeploymentList(
        deployments=[deployment_view(ctx, d) for d in ctx.store.list_deployments(cmd.stack)]
    )


def _deployment(ctx: Context, deployment_id: int) -> rollout.Deployment:
    return require(ctx.store.get_deployment(deployment_id), "deployment", deployment_id)


@commands.command(DeploymentsStatus, role="viewer", http=Route("GET", "/deployments/{id}", "A deployment"))
def deployments_status(ctx: Context, cmd: DeploymentsStatus) -> DeploymentStatusResult:
    """Every device (without ``limit``), or one page of them in id order (as ``stacks.status``);
    the counts by state are over every device either way."""
    d = _deployment(ctx, cmd.id)
    if cmd.limit is None:
        return DeploymentStatusResult(deployment=deployment_view(ctx, d, full=True))
    chosen = sorted(
        k
        for k, r in d.devices.items()
        if (not cmd.states or r.state in cmd.states) and (cmd.after is None or k > cmd.after)
    )
    view = deployment_view(ctx, d, full=True, page=chosen[: cmd.limit])
    rows: dict[str, dict[str, Any]] = {}
    size = 0
    for k, row in (view.devices or {}).items():
        size += len(k) + len(json.dumps(row))
        if rows and size > stacks.STATUS_PAGE_BYTES:  # as stacks.status pages end
            break
        rows[k] = row
    more = len(rows) < len(chosen)
    return DeploymentStatusResult(
        deployment=view.model_copy(update={"devices": rows}),
        next=next(reversed(rows)) if more and rows else (cmd.after if more else None),
    )


CLOCK_SKEW_S = 300.0
"""How far a device's clock may lag the controller's for an event about the deployment's
version (``spec_hash``) still to count as the deployment's."""
EVENTS_PER_DEVICE = 50


def deployment_events(
    d: rollout.Deployment, events: list[dict[str, Any]], until: float | None
) -> list[dict[str, Any]]:
    """Of a device's stored events (oldest first), those about deployment ``d``: about its stack's
    new version (device clocks lag: see :data:`CLOCK_SKEW_S`), or its previous version (a
    revert) or no version (older agents) from its start on; and the device's warnings and
    errors from its start on; none from ``until`` (the next deployment of the stack) on."""
    chosen = []
    for e in events:
        at = e.get("at") or 0.0
        if until is not None and at >= until:
            continue
        if e.get("stack") == d.stack:
            version = e.get("spec_hash")
            if version == d.to_hash:
                ours = at >= d.created - CLOCK_SKEW_S
            else:
                ours = version in (None, d.from_hash) and at >= d.created
        else:
            ours = e.get("stack") is None and e.get("level") != "info" and at >= d.created
        if ours:
            chosen.append(e)
    return chosen[-EVENTS_PER_DEVICE:]


@commands.command(
    DeploymentsEvents, http=Route("GET", "/deployments/{id}/events", "What devices said about a deployment")
)
def deployments_events(ctx: Context, cmd: DeploymentsEvents) -> DeploymentEvents:
    d = _deployment(ctx, cmd.id)
    if cmd.device_id is not None:
        if cmd.device_id not in d.devices:
            raise NotFoundError(f"device {cmd.device_id} is not part of deployment {d.id}")
        devices = [cmd.device_id]
    else:
        devices = sorted(d.devices, key=lambda k: (d.devices[k].state == "healthy", k))
    later = [x.created for x in ctx.store.list_deployments(d.stack) if x.id > d.id]
    until = min(later) if later else None
    shown = {
        device_id: deployment_events(
            d, [json.loads(b) for b in ctx.store.list_events(device_id, EVENTS_KEPT)], until
        )
        for device_id in devices[: cmd.devices]
    }
    return DeploymentEvents(id=d.id, stack=d.stack, devices=shown, more=max(0, len(devices) - cmd.devices))


@commands.command(
    DeploymentsAction,
    http=[
        Route(
            "POST",
            f"/deployments/{{id}}/{action}",
            f"{action.capitalize()} a deployment",
            fixed={"kind": f"deployments.{action}"},
        )
        for action in ("pause", "resume", "promote", "switch", "rollback")
    ],
)
def deployments_action(ctx: Context, cmd: DeploymentsAction) -> DeploymentResult:
    d = _deployment(ctx, cmd.id)
    latest = ctx.store.latest_deployments().get(d.stack)
    action = cmd.kind.split(".", 1)[1]
    now = ctx.clock()
    if action == "rollback":
        stack = ctx.store.get_stack(d.stack)
        if stack is None or d.from_hash is None:
            raise ConflictError(f"deployment {d.id} has no previous version to roll back to")
        spec = ctx.store.get_spec(d.from_hash)
        if spec is None:
            raise ConflictError(f"deployment {d.id}: previous version {d.from_hash[:12]} is unknown")
        with ctx.store.transaction():
            reverted = stack.model_copy(
                update={
                    "spec_hash": d.from_hash,
                    "spec": spec,
                    "version": stack.version + 1,
                    "updated": now,
                }
            )
            ctx.store.put_stack(reverted)
            new = ctx.deployer.start(reverted, stack.spec_hash, d.strategy)
            ctx.scheduler.recompute()
        ctx.publisher.publish_pending()
        return DeploymentResult(deployment=deployment_view(ctx, new))
    if latest is None or latest.id != d.id or not d.active:
        raise ConflictError(
            f"deployment {d.id} is {d.state}; only the active deployment of a stack can {action}"
        )
    before = d
    if action == "pause":
        d = d.model_copy(update={"state": "paused", "updated": now})
    elif action == "resume":
        d = d.model_copy(update={"state": "running", "updated": now})
    elif action == "promote":
        if d.strategy.kind != "canary":
            raise ConflictError(f"deployment {d.id} is not a canary deployment")
        d = rollout.promote(d, now)
    elif action == "switch":
        if not d.strategy.stage_only or d.switched:
            raise ConflictError(f"deployment {d.id} is not waiting for a switch (deploy with --stage-only)")
        d = rollout.switch(d, now)
    with ctx.store.transaction():
        ctx.store.put_deployment(d)
    ctx.events.deployment(before, d)
    ctx.deployer.advance()
    return DeploymentResult(deployment=deployment_view(ctx, _deployment(ctx, d.id)))
