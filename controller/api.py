"""The controller's request handlers: one method per command, views of the stored state.

:class:`RequestHandlers` is mixed into :class:`~.service.Controller`: handlers run on the
controller's worker thread and use its store, scheduling (``_recompute``, ``sync``) and
publishing (``publish_pending``). Each returns plain data (the reply's ``result``) or
raises a :class:`~tether.protocol.errors.TetherError`, which becomes the reply's ``error``.
docs/topics.md documents every command and the shape of its result.
"""

from __future__ import annotations

import logging
from typing import Any

from tether.protocol import codec, names
from tether.protocol.commands import (
    DeploymentsAction,
    DeploymentsList,
    DeploymentsStatus,
    StacksDeploy,
    StacksList,
    StacksPlan,
    StacksRemove,
    StacksStatus,
)
from tether.protocol.errors import ComposeError, StoreError
from tether.protocol.models import StackDefinition
from tether.protocol.variables import stack_references

from . import rollout
from .compose import parse_stack_warnings
from .devices import all_devices, attributes
from .models import Device, Stack
from .registry import CommandRegistry
from .scheduler import members

log = logging.getLogger(__name__)
commands = CommandRegistry()
"""The commands handled here (see :mod:`.registry`)."""


class RequestHandlers:
    """Command handlers and views; mixed into the Controller (see the module docstring)."""

    # --- views ---

    @commands.command(StacksDeploy)
    def _stacks_deploy(self, cmd: StacksDeploy) -> Any:
        if not names.NAME.ok(cmd.name):
            raise StoreError(f"invalid stack name {cmd.name!r} (lower-case letters, digits, '.', '_', '-')")
        try:
            spec, placement, warnings = parse_stack_warnings(cmd.compose, cmd.files)
        except ComposeError as exc:
            raise ComposeError(f"stack {cmd.name!r}: {exc}") from exc
        group = self.store.get_group(cmd.group)
        if group is None:
            raise StoreError(f"unknown group {cmd.group!r}")
        existing = self.store.get_stack(cmd.name)
        if existing is not None and existing.group != cmd.group:
            raise StoreError(
                f"stack {cmd.name!r} is already deployed to group {existing.group!r}; remove it first or use that group"
            )
        refs = stack_references(spec)
        if refs:  # every device it goes to must have a value for every reference
            self.check_stack_variables(cmd.name, refs, members(group, attributes(self.store)), cmd.group)  # type: ignore[attr-defined]
        spec_hash = spec.spec_hash()
        size = len(codec.encode(StackDefinition(spec_hash=spec_hash, spec=spec)))
        if size > codec.MAX_PAYLOAD:  # it could never be sent to a device (YAML aliases expand)
            raise ComposeError(
                f"stack {cmd.name!r}: its definition is {size} bytes, over the {codec.MAX_PAYLOAD}-byte message limit"
            )
        now = self.clock()
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
            with self.store.transaction():
                self.store.put_spec(spec_hash, spec)
                self.store.put_stack(stack)
                self._update_placements()
                stack = self.store.get_stack(cmd.name) or stack
                if new_version:
                    from_hash = existing.spec_hash if existing is not None else None
                    deployment = self._start_deployment(stack, from_hash, cmd.strategy)
                self.recompute()
            self.publish_pending()
        else:
            stack = existing  # type: ignore[assignment]
            deployment = None
        stack = self.store.get_stack(cmd.name) or stack
        if stack.placement.mode == "replicas":
            targets = [a.device_id for a in stack.assignment]
        else:  # the fleet as the deployment sees it (in memory), not every device row read again
            fleet = self._fleet_view()  # type: ignore[attr-defined]
            targets = members(group, {d: seen.attributes for d, seen in fleet.items()})
        return {
            "stack": self._stack_view(stack),
            "changed": changed,
            "devices": targets,
            "deployment": deployment.id if deployment else None,
            "warnings": warnings,
        }

    @commands.command(StacksPlan)
    def _stacks_plan(self, cmd: StacksPlan) -> Any:
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
        group = self.store.get_group(cmd.group)
        if group is None:
            errors.append(f"unknown group {cmd.group!r}")
        existing = self.store.get_stack(cmd.name) if names.NAME.ok(cmd.name) else None
        if existing is not None and existing.group != cmd.group:
            errors.append(
                f"stack {cmd.name!r} is already deployed to group {existing.group!r}; remove it first or use that group"
            )
        if spec is not None and group is not None and (refs := stack_references(spec)):
            try:
                self.check_stack_variables(cmd.name, refs, members(group, attributes(self.store)), cmd.group)  # type: ignore[attr-defined]
            except StoreError as exc:
                errors.append(str(exc))
        if errors or spec is None or placement is None or group is None:
            raise ComposeError("\n".join(errors))
        before = {s.name: s.spec_hash() for s in existing.spec.services} if existing is not None else {}
        services = []
        for service in spec.services:
            old = before.get(service.name)
            change = "added" if old is None else "kept" if old == service.spec_hash() else "replaced"
            services.append({"name": service.name, "change": change})
        services += [{"name": n, "change": "removed"} for n in before if spec.service(n) is None]
        new_version = existing is None or existing.spec_hash != spec.spec_hash()
        if placement.mode == "replicas":
            targets = [a.device_id for a in existing.assignment] if existing is not None else []
        else:
            fleet = self._fleet_view()  # type: ignore[attr-defined]
            targets = members(group, {d: seen.attributes for d, seen in fleet.items()})
        return {
            "name": cmd.name,
            "group": cmd.group,
            "spec_hash": spec.spec_hash(),
            "changed": new_version or existing is None or existing.placement != placement,
            "version": (existing.version + 1 if new_version else existing.version) if existing else 1,
            "placement": placement.model_dump(mode="json"),
            "devices": targets,
            "services": services,
            "warnings": warnings,
        }

    def _stack_view(self, stack: Stack) -> dict[str, Any]:
        return {
            "name": stack.name,
            "group": stack.group,
            "spec_hash": stack.spec_hash,
            "version": stack.version,
            "services": [s.name for s in stack.spec.services],
            "placement": stack.placement.model_dump(mode="json"),
            "assignment": [a.model_dump(mode="json") for a in stack.assignment],
            "updated": stack.updated,
        }

    @commands.command(StacksList, read_only=True)
    def _stacks_ls(self, cmd: StacksList) -> Any:
        out = []
        for stack in self.store.list_stacks():
            rows = self._stack_devices(stack.name, stack.spec_hash)
            view = self._stack_view(stack)
            view["devices"] = len(rows)
            view["running"] = sum(1 for r in rows if r["state"] == "running")
            out.append(view)
        return {"stacks": out}

    def _stack_devices(self, name: str, spec_hash: str | None) -> list[dict[str, Any]]:
        """Per device that should run (or still runs) stack ``name``: where it stands."""
        devices = all_devices(self.store)
        latest = self.store.latest_deployments().get(name)
        rows = []
        for record in self.store.list_desired():
            ref = next((r for r in record.stacks if r.name == name), None)
            device = devices.get(record.device_id) or Device(id=record.device_id)
            reported = device.reported
            status = reported.stacks.get(name) if reported else None
            if ref is None and status is None:
                continue
            if ref is None:
                state = "removing"
            elif status is None or status.spec_hash != ref.spec_hash:
                state = "pending"
                if reported is not None and reported.error and reported.generation < record.generation:
                    state = "rejected"
            else:
                state = status.state
            stack = self.store.get_stack(name)
            role = (
                next((a.role for a in stack.assignment if a.device_id == record.device_id), None)
                if stack
                else None
            )
            rolling = latest.devices.get(record.device_id) if latest is not None and latest.active else None
            download = reported.downloads.get(name) if reported else None
            rows.append(
                {
                    "device": record.device_id,
                    "role": role,
                    "rollout": rolling.state if rolling else None,
                    "held": bool(reported and reported.held),
                    "presence": device.status,
                    "state": state,
                    "desired_generation": record.generation,
                    "applied_generation": reported.generation if reported else None,
                    "error": reported.error if reported else None,
                    "services": {k: v.model_dump(mode="json") for k, v in status.services.items()}
                    if status
                    else {},
                    "download": download.model_dump(mode="json") if download else None,
                    "progress": rollout.progress(download) if download else None,
                    "why": rollout.explain(status) if status and status.state != "running" else None,
                }
            )
        return rows

    @commands.command(StacksStatus, read_only=True)
    def _stacks_status(self, cmd: StacksStatus) -> Any:
        stack = self.store.get_stack(cmd.name)
        rows = self._stack_devices(cmd.name, stack.spec_hash if stack else None)
        if stack is None and not rows:
            raise StoreError(f"unknown stack {cmd.name!r}")
        return {"stack": self._stack_view(stack) if stack else None, "devices": rows}

    # --- jobs ---

    # --- deployments ---

    def _deployment_view(self, d: rollout.Deployment, full: bool = False) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for r in d.devices.values():
            counts[r.state] = counts.get(r.state, 0) + 1
        view: dict[str, Any] = {
            "id": d.id,
            "stack": d.stack,
            "state": d.state,
            "from_hash": d.from_hash,
            "to_hash": d.to_hash,
            "strategy": d.strategy.model_dump(mode="json"),
            "batch": d.batch,
            "promoted": d.promoted,
            "switched": d.switched,
            "counts": counts,
            "message": d.message,
            "created": d.created,
            "updated": d.updated,
        }
        if full:
            fleet = self._fleet_view()  # type: ignore[attr-defined]
            now = self.clock()  # type: ignore[attr-defined]
            devices = {}
            for k, r in sorted(d.devices.items()):
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
            view["devices"] = devices
        return view

    @commands.command(DeploymentsList)
    def _deployments_ls(self, cmd: DeploymentsList) -> Any:
        return {"deployments": [self._deployment_view(d) for d in self.store.list_deployments(cmd.stack)]}

    def _deployment(self, deployment_id: int) -> rollout.Deployment:
        deployment = self.store.get_deployment(deployment_id)
        if deployment is None:
            raise StoreError(f"unknown deployment {deployment_id}")
        return deployment

    @commands.command(DeploymentsStatus)
    def _deployments_status(self, cmd: DeploymentsStatus) -> Any:
        return {"deployment": self._deployment_view(self._deployment(cmd.id), full=True)}

    @commands.command(DeploymentsAction)
    def _deployments_action(self, cmd: DeploymentsAction) -> Any:
        d = self._deployment(cmd.id)
        latest = self.store.latest_deployments().get(d.stack)
        action = cmd.kind.split(".", 1)[1]
        now = self.clock()
        if action == "rollback":
            stack = self.store.get_stack(d.stack)
            if stack is None or d.from_hash is None:
                raise StoreError(f"deployment {d.id} has no previous version to roll back to")
            spec = self.store.get_spec(d.from_hash)
            if spec is None:
                raise StoreError(f"deployment {d.id}: previous version {d.from_hash[:12]} is unknown")
            with self.store.transaction():
                reverted = stack.model_copy(
                    update={
                        "spec_hash": d.from_hash,
                        "spec": spec,
                        "version": stack.version + 1,
                        "updated": now,
                    }
                )
                self.store.put_stack(reverted)
                new = self._start_deployment(reverted, stack.spec_hash, d.strategy)
                self.recompute()
            self.publish_pending()
            return {"deployment": self._deployment_view(new)}
        if latest is None or latest.id != d.id or not d.active:
            raise StoreError(
                f"deployment {d.id} is {d.state}; only the active deployment of a stack can {action}"
            )
        if action == "pause":
            d = d.model_copy(update={"state": "paused", "updated": now})
        elif action == "resume":
            d = d.model_copy(update={"state": "running", "updated": now})
        elif action == "promote":
            if d.strategy.kind != "canary":
                raise StoreError(f"deployment {d.id} is not a canary deployment")
            d = rollout.promote(d, now)
        elif action == "switch":
            if not d.strategy.stage_only or d.switched:
                raise StoreError(f"deployment {d.id} is not waiting for a switch (deploy with --stage-only)")
            d = rollout.switch(d, now)
        with self.store.transaction():
            self.store.put_deployment(d)
        self.advance_deployments()
        return {"deployment": self._deployment_view(self._deployment(d.id))}

    @commands.command(StacksRemove)
    def _stacks_rm(self, cmd: StacksRemove) -> Any:
        stack = self.store.get_stack(cmd.name)
        if stack is None:
            raise StoreError(f"unknown stack {cmd.name!r}")
        with self.store.transaction():
            self.store.delete_stack(cmd.name)
            self.recompute()
        self.publish_pending()
        return {"removed": cmd.name}
