"""Groups: static (a list of device ids) or selected by labels (``groups.*`` commands)."""

from __future__ import annotations

import logging

from pydantic import ValidationError
from tether.protocol import topics
from tether.protocol.commands import GroupsCreate, GroupsList, GroupsRemove, GroupsShow, GroupsTrust
from tether.protocol.errors import CommandError, ConflictError
from tether.protocol.results import GroupCreated, GroupList, GroupResult, GroupView, Removed

from .context import Context, require
from .devices import attributes, never_seen
from .models import Group
from .registry import CommandRegistry, Route
from .scheduler import members
from .selectors import parse_selector

log = logging.getLogger(__name__)
commands = CommandRegistry(tag="groups")
"""The commands handled here (see :mod:`.registry`)."""


def group_view(ctx: Context, group: Group) -> GroupView:
    """A group as replies show it: its members now, and the stacks deployed to it."""
    return GroupView(
        name=group.name,
        kind=group.kind,
        devices=list(group.devices),
        selector=group.selector,
        trust_device_labels=group.trust_device_labels,
        members=members(group, attributes(ctx.store)),
        stacks=[s.name for s in ctx.store.list_stacks() if s.group == group.name],
    )


@commands.command(GroupsCreate, http=Route("POST", "/groups", "Create a group", status=201))
def groups_create(ctx: Context, cmd: GroupsCreate) -> GroupCreated:
    if bool(cmd.devices) == bool(cmd.selector):
        raise CommandError("a group needs either devices or a selector (not both)")
    if cmd.selector:
        parse_selector(cmd.selector)
    if cmd.trust_device_labels and not cmd.selector:
        raise CommandError("only a selector group can trust device labels")
    for device_id in cmd.devices:
        topics.check_device_id(device_id)
    try:
        group = Group(
            name=cmd.name,
            devices=tuple(sorted(set(cmd.devices))),
            selector=cmd.selector,
            trust_device_labels=cmd.trust_device_labels,
            created=ctx.clock(),
        )
    except ValidationError as exc:
        raise CommandError(
            f"invalid group name {cmd.name!r} (lower-case letters, digits, '.', '_', '-')"
        ) from exc
    with ctx.store.transaction():
        ctx.store.create_group(group)
        ctx.scheduler.recompute()
    ctx.publisher.publish_pending()
    unknown = never_seen(ctx.store, group.devices)
    if unknown:
        log.warning("group %s names device(s) never heard from: %s", group.name, ", ".join(unknown))
    return GroupCreated(group=group_view(ctx, group), never_seen=unknown)


@commands.command(
    GroupsTrust,
    http=Route("PUT", "/groups/{name}/trust", "Whether a selector group trusts device-reported labels"),
)
def groups_trust(ctx: Context, cmd: GroupsTrust) -> GroupResult:
    """Whether a selector group matches what devices report about themselves: recomputed at once."""
    group = require(ctx.store.get_group(cmd.name), "group", cmd.name)
    if group.selector is None:
        raise ConflictError(f"group {cmd.name!r} is static: only a selector group can trust device labels")
    if group.trust_device_labels != cmd.trust:
        with ctx.store.transaction():
            ctx.store.delete_group(group.name)
            ctx.store.create_group(group.model_copy(update={"trust_device_labels": cmd.trust}))
            ctx.scheduler.recompute()
        ctx.publisher.publish_pending()
        log.warning(
            "group %s: %s",
            group.name,
            "its selector now also matches labels and facts devices report"
            if cmd.trust
            else "its selector now matches only labels set by an operator or at enrollment",
        )
    return GroupResult(group=group_view(ctx, ctx.store.get_group(cmd.name) or group))


@commands.command(GroupsList, read_only=True, http=Route("GET", "/groups", "Every group"))
def groups_ls(ctx: Context, cmd: GroupsList) -> GroupList:
    return GroupList(groups=[group_view(ctx, g) for g in ctx.store.list_groups()])


@commands.command(GroupsShow, read_only=True, http=Route("GET", "/groups/{name}", "A group and its members"))
def groups_show(ctx: Context, cmd: GroupsShow) -> GroupResult:
    group = require(ctx.store.get_group(cmd.name), "group", cmd.name)
    return GroupResult(group=group_view(ctx, group))


@commands.command(GroupsRemove, http=Route("DELETE", "/groups/{name}", "Remove a group"))
def groups_rm(ctx: Context, cmd: GroupsRemove) -> Removed:
    require(ctx.store.get_group(cmd.name), "group", cmd.name)
    used = [s.name for s in ctx.store.list_stacks() if s.group == cmd.name]
    if used:
        raise ConflictError(f"group {cmd.name!r} still has stacks: {', '.join(used)}; remove them first")
    with ctx.store.transaction():
        ctx.store.delete_group(cmd.name)
    return Removed(removed=cmd.name)
