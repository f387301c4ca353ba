"""Stacks: deploy a Compose file to a group, plan a deploy, list, status, remove (``stacks.*``).

A deploy stores the stack's new version and starts its deployment (:mod:`.deployments`,
:mod:`.rollout`) in the transaction that recomputes every device's desired state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tether.protocol import codec, names
from tether.protocol.commands import (
    StacksDeploy,
    StacksList,
    StacksPlan,
    StacksRemove,
    StacksShow,
    StacksStatus,
)
from tether.protocol.errors import CommandError, ComposeError, ConflictError, NotFoundError, StoreError
from tether.protocol.models import StackDefinition, StackSpec
from tether.protocol.results import (
    Removed,
    ServiceChange,
    StackDeployed,
    StackDeviceRow,
    StackList,
    StackPlan,
    StackShown,
    StackStatusResult,
    StackSummary,
    StackView,
)
from tether.protocol.variables import stack_references

from . import rollout
from .compose import parse_stack_warnings
from .context import Context, require
from .devices import attributes
from .fleet import NO_REPORT, stack_state
from .models import DesiredRecord, Device, Group, Placement, Stack
from .ports import port_clashes, published
from .registry import CommandRegistry, Route
from .rollout import Deployment
from .scheduler import members

commands = CommandRegistry(tag="stacks")
"""The commands handled here (see :mod:`.registry`)."""


@commands.command(
    StacksDeploy,
    http=Route(
        "POST",
        "/stacks/{name}/deploy",
        "Deploy a Compose file as a stack (answers with the deployment started)",
        wait=True,
    ),
)
def stacks_deploy(ctx: Context, cmd: StacksDeploy) -> StackDeployed:
    if not names.NAME.ok(cmd.name):
        raise CommandError(f"invalid stack name {cmd.name!r} (lower-case letters, digits, '.', '_', '-')")
    try:
        spec, placement, warnings = parse_stack_warnings(cmd.compose, cmd.files)
    except ComposeError as exc:
        raise ComposeError(f"stack {cmd.name!r}: {exc}") from exc
    group = require(ctx.store.get_group(cmd.group), "group", cmd.group)
    existing = ctx.store.get_stack(cmd.name)
    if existing is not None and existing.group != cmd.group:
        raise ConflictError(
            f"stack {cmd.name!r} is already deployed to group {existing.group!r}; remove it first or use that group"
        )
    refs = stack_references(spec)
    if refs:  # every device it goes to must have a value for every reference
        ctx.variables.check_stack(cmd.name, refs, members(group, attributes(ctx.store)), cmd.group)
    clashes = _port_clashes(ctx, cmd.name, spec, placement, group, existing)
    if clashes:
        raise ConflictError(f"stack {cmd.name!r}: " + "; ".join(clashes))
    spec_hash = spec.spec_hash()
    size = len(codec.encode(StackDefinition(spec_hash=spec_hash, spec=spec)))
    if size > codec.MAX_PAYLOAD:  # it could never be sent to a device (YAML aliases expand)
        raise ComposeError(
            f"stack {cmd.name!r}: its definition is {size} bytes, over the {codec.MAX_PAYLOAD}-byte message limit"
        )
    now = ctx.clock()
    changed = existing is None or existing.spec_hash != spec_hash or existing.placement != placement
    if changed:
        keep = existing.assignment if existing is not None and placement.mode == "replicas" else ()
        new_version = existing is None or existing.spec_hash != spec_hash
        stack = Stack(
            name=cmd.name,
            group=cmd.group,
            spec_hash=spec_hash,
            spec=spec,
            compose=cmd.compose,
            placement=placement,
            assignment=keep,
            version=(existing.version + 1) if existing else 1,
            created=existing.created if existing else now,
            updated=now,
        )
        deployment = None
        with ctx.store.transaction():
            ctx.store.put_spec(spec_hash, spec)
            ctx.store.put_stack(stack)
            ctx.store.put_stack_version(stack)
            ctx.scheduler.update_placements()
            stack = ctx.store.get_stack(cmd.name) or stack
            if new_version:
                from_hash = existing.spec_hash if existing is not None else None
                deployment = ctx.deployer.start(stack, from_hash, cmd.strategy)
            if not ctx.publisher.recompute_later():  # answering a request: once the reply is sent
                ctx.scheduler.recompute()
        ctx.publisher.publish_pending()
    else:
        stack = existing  # type: ignore[assignment]
        deployment = None
    stack = ctx.store.get_stack(cmd.name) or stack
    # The fleet as the deployment sees it (in memory), no device row read again.
    fleet = ctx.scheduler.fleet_view()
    if stack.placement.mode == "replicas":
        targets = [a.device_id for a in stack.assignment]
    else:
        targets = members(group, {d: seen.attributes for d, seen in fleet.items()})
    return StackDeployed(
        stack=stack_view(stack),
        changed=changed,
        devices=targets,
        never_seen=[d for d in targets if (seen := fleet.get(d)) is None or seen.status == "never seen"],
        deployment=deployment.id if deployment else None,
        warnings=warnings,
    )


def _port_clashes(
    ctx: Context, name: str, spec: StackSpec, placement: Placement, group: Group, existing: Stack | None
) -> list[str]:
    """The host ports stack ``name`` would take from other stacks on its docker-driver devices."""
    if not published(spec):
        return []
    devices = ctx.store.list_devices()
    docker = {d.id for d in devices if d.facts is not None and d.facts.driver == "docker"}
    attrs = {d.id: d.attributes() for d in devices}
    groups = {g.name: g for g in ctx.store.list_groups()}

    def where(placement: Placement, group: Group | None, assignment: Iterable[str]) -> set[str]:
        if placement.mode == "replicas":
            return set(assignment) & docker
        return set(members(group, attrs)) & docker if group is not None else set()

    mine = where(placement, group, [a.device_id for a in existing.assignment] if existing else [])
    others = {
        s.name: (s.spec, where(s.placement, groups.get(s.group), [a.device_id for a in s.assignment]))
        for s in ctx.store.list_stacks()
        if s.name != name and published(s.spec)
    }
    return port_clashes(name, spec, mine, others)


@commands.command(
    StacksPlan,
    role="viewer",
    http=Route("POST", "/stacks/{name}/plan", "What a deploy would do, changing nothing"),
)
def stacks_plan(ctx: Context, cmd: StacksPlan) -> StackPlan:
    """``stacks.deploy`` checked in full and compared with what runs, nothing stored."""
    errors: list[str] = []
    spec = placement = group = None
    warnings: list[str] = []
    if not names.NAME.ok(cmd.name):
        errors.append(f"invalid stack name {cmd.name!r} (lower-case letters, digits, '.', '_', '-')")
    try:
        spec, placement, warnings = parse_stack_warnings(cmd.compose, cmd.files)
    except ComposeError as exc:
        errors.append(f"stack {cmd.name!r}: {exc}")
    group = ctx.store.get_group(cmd.group)
    if group is None:
        errors.append(f"unknown group {cmd.group!r}")
    existing = ctx.store.get_stack(cmd.name) if names.NAME.ok(cmd.name) else None
    if existing is not None and existing.group != cmd.group:
        errors.append(
            f"stack {cmd.name!r} is already deployed to group {existing.group!r}; remove it first or use that group"
        )
    if spec is not None and group is not None and (refs := stack_references(spec)):
        try:
            ctx.variables.check_stack(cmd.name, refs, members(group, attributes(ctx.store)), cmd.group)
        except StoreError as exc:
            errors.append(str(exc))
    if spec is not None and placement is not None and group is not None:
        errors += [
            f"stack {cmd.name!r}: {c}" for c in _port_clashes(ctx, cmd.name, spec, placement, group, existing)
        ]
    if errors or spec is None or placement is None or group is None:
        raise ComposeError("\n".join(errors))
    before = {s.name: s.spec_hash() for s in existing.spec.services} if existing is not None else {}
    services = []
    for service in spec.services:
        old = before.get(service.name)
        change = "added" if old is None else "kept" if old == service.spec_hash() else "replaced"
        services.append(ServiceChange(name=service.name, change=change))
    services += [ServiceChange(name=n, change="removed") for n in before if spec.service(n) is None]
    new_version = existing is None or existing.spec_hash != spec.spec_hash()
    if placement.mode == "replicas":
        targets = [a.device_id for a in existing.assignment] if existing is not None else []
    else:
        fleet = ctx.scheduler.fleet_view()
        targets = members(group, {d: seen.attributes for d, seen in fleet.items()})
    return StackPlan(
        name=cmd.name,
        group=cmd.group,
        spec_hash=spec.spec_hash(),
        changed=new_version or existing is None or existing.placement != placement,
        version=(existing.version + 1 if new_version else existing.version) if existing else 1,
        placement=placement.model_dump(mode="json"),
        devices=targets,
        services=services,
        warnings=warnings,
    )


def stack_view(stack: Stack) -> StackView:
    """A stack as replies show it."""
    return StackView(
        name=stack.name,
        group=stack.group,
        spec_hash=stack.spec_hash,
        version=stack.version,
        services=[s.name for s in stack.spec.services],
        placement=stack.placement.model_dump(mode="json"),
        assignment=[a.model_dump(mode="json") for a in stack.assignment],
        updated=stack.updated,
    )


@commands.command(StacksList, read_only=True, http=Route("GET", "/stacks", "Every stack"))
def stacks_ls(ctx: Context, cmd: StacksList) -> StackList:
    stacks = ctx.store.list_stacks()
    # Leading: the counts the scheduler keeps up to date from the fleet view and the desired
    # records written (dashboards and deploy_latency.py poll this every 0.5 s: reading every
    # device's desired record and report each time was a visible share of a deploy's CPU at
    # 10,000 devices). A standby has no fleet view of its own: it reads them.
    counts = ctx.scheduler.stack_counts()
    if counts is None:
        counts = _stack_counts_read(ctx, [s.name for s in stacks])
    return StackList(
        stacks=[
            StackSummary(
                **dict(stack_view(s)),
                devices=counts.get(s.name, (0, 0))[0],
                running=counts.get(s.name, (0, 0))[1],
            )
            for s in stacks
        ]
    )


def _stack_counts_read(ctx: Context, names: list[str]) -> dict[str, tuple[int, int]]:
    """Per stack, (devices, running) as :meth:`.scheduling.Scheduler.stack_counts` gives them,
    read from the store."""
    out = {}
    records = ctx.store.list_desired()
    for name in names:
        # What each device reports of the stack, extracted by the database: parsing every
        # report (as ``stacks status`` does) cost 0.7 s of CPU per request at 10,000 devices.
        reports = ctx.store.stack_reports(name)
        devices = running = 0
        for record in records:
            ref = next((r for r in record.stacks if r.name == name), None)
            state = stack_state(ref, record.generation, reports.get(record.device_id, NO_REPORT))
            if state is None:
                continue
            devices += 1
            running += state == "running"
        out[name] = (devices, running)
    return out


STATUS_PAGE_BYTES = codec.MAX_PAYLOAD // 2
"""A page of ``stacks.status`` rows ends before its rows pass this many bytes on the wire."""


def _row(
    name: str,
    record: DesiredRecord,
    device: Device,
    state: str,
    roles: Mapping[str, str],
    latest: Deployment | None,
) -> StackDeviceRow:
    reported = device.reported
    status = reported.stacks.get(name) if reported else None
    rolling = latest.devices.get(record.device_id) if latest is not None and latest.active else None
    download = reported.downloads.get(name) if reported else None
    return StackDeviceRow(
        device=record.device_id,
        role=roles.get(record.device_id),
        rollout=rolling.state if rolling else None,
        held=bool(reported and reported.held),
        presence=device.status,
        state=state,
        desired_generation=record.generation,
        applied_generation=reported.generation if reported else None,
        error=reported.error if reported else None,
        services={k: v.model_dump(mode="json") for k, v in status.services.items()} if status else {},
        download=download.model_dump(mode="json") if download else None,
        progress=rollout.progress(download) if download else None,
        why=rollout.explain(status) if status and status.state != "running" else None,
    )


@commands.command(StacksShow, read_only=True, http=Route("GET", "/stacks/{name}", "A stack's Compose file"))
def stacks_show(ctx: Context, cmd: StacksShow) -> StackShown:
    stack = require(ctx.store.get_stack(cmd.name), "stack", cmd.name)
    version = cmd.version or stack.version
    if version == stack.version:
        kept = {"spec_hash": stack.spec_hash, "compose": stack.compose, "updated": stack.updated}
    elif version > stack.version:
        raise NotFoundError(
            f"stack {cmd.name!r} has no version {version} (the current one is {stack.version})"
        )
    elif (kept := ctx.store.get_stack_version(cmd.name, version)) is None:  # type: ignore[assignment]
        raise NotFoundError(
            f"the file of version {version} of stack {cmd.name!r} was not kept (deployed before this "
            "controller kept versions)"
        )
    return StackShown(name=stack.name, group=stack.group, version=version, current=stack.version, **kept)


@commands.command(
    StacksStatus, read_only=True, http=Route("GET", "/stacks/{name}/status", "A stack on each device")
)
def stacks_status(ctx: Context, cmd: StacksStatus) -> StackStatusResult:
    """Counts by state over every device of the stack, from what the database extracts of
    their reports (as ``stacks ls``); rows, which need each report parsed, only for the
    page asked for."""
    name = cmd.name
    stack = ctx.store.get_stack(name)
    reports = ctx.store.stack_reports(name)
    counts: dict[str, int] = {}
    chosen: list[tuple[DesiredRecord, str]] = []
    for record in ctx.store.list_desired():
        ref = next((r for r in record.stacks if r.name == name), None)
        state = stack_state(ref, record.generation, reports.get(record.device_id, NO_REPORT))
        if state is None:
            continue
        counts[state] = counts.get(state, 0) + 1
        if (not cmd.states or state in cmd.states) and (cmd.after is None or record.device_id > cmd.after):
            chosen.append((record, state))
    total = sum(counts.values())
    if stack is None and not total:
        raise NotFoundError(f"unknown stack {name!r}")
    chosen.sort(key=lambda c: c[0].device_id)  # the cursor's order, whatever the database's collation
    latest = ctx.store.latest_deployments().get(name)
    roles = {a.device_id: a.role for a in stack.assignment} if stack else {}
    rows: list[StackDeviceRow] = []
    size = 0
    for record, state in chosen if cmd.limit is None else chosen[: cmd.limit]:
        device = ctx.store.get_device(record.device_id) or Device(id=record.device_id)
        row = _row(name, record, device, state, roles, latest)
        if cmd.limit is not None:
            size += len(codec.encode(row))
            if rows and size > STATUS_PAGE_BYTES:
                break
        rows.append(row)
    more = len(rows) < len(chosen)
    return StackStatusResult(
        stack=stack_view(stack) if stack else None,
        counts=dict(sorted(counts.items())),
        total=total,
        devices=rows,
        next=rows[-1].device if more and rows else (cmd.after if more else None),
    )


@commands.command(StacksRemove, http=Route("DELETE", "/stacks/{name}", "Remove a stack from every device"))
def stacks_rm(ctx: Context, cmd: StacksRemove) -> Removed:
    require(ctx.store.get_stack(cmd.name), "stack", cmd.name)
    with ctx.store.transaction():
        ctx.store.delete_stack(cmd.name)
        ctx.scheduler.recompute()
    ctx.publisher.publish_pending()
    return Removed(removed=cmd.name)
