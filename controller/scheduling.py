"""Scheduling, the controller's side: :class:`Scheduler` keeps the fleet view and turns
stored changes into desired states.

It keeps every device as deployment steps see it (:meth:`Scheduler.fleet_view`, in memory,
re-read only where the store wrote), the devices each stack goes to
(:meth:`Scheduler.targets`), where ``replicas`` stacks are placed
(:meth:`Scheduler.update_placements`), and gives every device whose stacks, jobs or bindings
changed the next generation (:meth:`Scheduler.recompute`, in the caller's transaction) with
the pure scheduler (:mod:`.scheduler`). Publishing what it stored is the
:class:`~.publishing.Publisher`'s; the :class:`~.service.Controller` owns both.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping

from tether.protocol.heap import share_field_sets, shared_copy
from tether.protocol.models import ReportedState, StackRef

from .devices import attributes
from .fleet import Seen, StackCounts, desired
from .models import DesiredRecord, Group, Stack, spec_hashes
from .placement import Assignment, Candidate, place
from .registries import RegistryCredentials
from .rollout import Observation
from .scheduler import desired_jobs, desired_stacks, eligible, members
from .selectors import Attributes
from .store import PresenceWritten, Store
from .variables import VariableBindings

log = logging.getLogger(__name__)


class Scheduler:
    """The fleet view, targets, placements and desired states (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Callable[[], float],
        leading: threading.Event,
        variables: VariableBindings,
        registries: RegistryCredentials,
    ) -> None:
        """``leading``: set while the controller leads (a standby has no fleet view of its own);
        ``variables``, ``registries``: what desired states bind (the controller's caches)."""
        self.store = store
        self.clock = clock
        self._leading = leading
        self.variables = variables
        self.registries = registries
        self._fleet: dict[str, Seen] | None = None  # see fleet_view
        self._fleet_version = 0  # changes when a device's attributes may have (see targets)
        self._targeted: dict[str, tuple[Stack, Group, int, list[str]]] = {}  # see targets
        self._observed: dict[str, dict[str, tuple[Seen, Observation]]] = {}  # see observe
        self._views: dict[str, tuple[dict[str, Seen], set[str], dict[str, Observation]]] = {}  # see observe
        self._stale: dict[str, set[str]] = {}  # per view: devices written since it was made
        self._counted: StackCounts | None = None  # see stack_counts
        self._count_stale: set[str] | None = set()  # devices the fleet view changed since (None: any)

    def forget(self) -> None:
        """Read every device again at the next :meth:`fleet_view` (another controller may have
        written them while this one stood by)."""
        self._fleet = None
        self._counted = None  # and the desired records

    def keep_observed(self, stacks: Iterable[str]) -> None:
        """Keep what :meth:`observe` made only for ``stacks`` (those with an active deployment)."""
        self._observed = {name: self._observed.get(name, {}) for name in stacks}
        self._views = {name: view for name, view in self._views.items() if name in self._observed}
        self._stale = {name: self._stale[name] for name in self._views}

    def _pins(self) -> dict[str, dict[str, str]]:
        """Per stack, the devices its latest deployment keeps on the previous version."""
        return {name: d.pins() for name, d in self.store.latest_deployments().items() if d.pins()}

    def _stages(self) -> dict[str, tuple[StackRef, ...]]:
        """Per device, the stack versions it downloads without running them (stage-only deployments)."""
        result: dict[str, list[StackRef]] = {}
        for name, deployment in sorted(self.store.latest_deployments().items()):
            for device_id, spec_hash in deployment.stages().items():
                result.setdefault(device_id, []).append(StackRef(name=name, spec_hash=spec_hash))
        return {d: tuple(refs) for d, refs in result.items()}

    def targets(self, stack: Stack, labels: Mapping[str, Attributes] | None = None) -> list[str]:
        """The devices ``stack`` goes to; ``labels``: every device's attributes (the fleet's if None).

        Kept while the stack, its group and every device's attributes are the same: a step
        asks every second, and matching 10,000 devices' labels each time is fleet-wide work.
        """
        if stack.placement.mode == "replicas":
            return sorted(a.device_id for a in stack.assignment)
        group = self.store.get_group(stack.group)
        if group is None:
            return []
        if labels is None and not self._leading.is_set():  # a standby has no fleet view of its own
            labels = attributes(self.store)
        if labels is not None:
            return eligible(stack, members(group, labels), labels)
        fleet = self.fleet_view()
        hit = self._targeted.get(stack.name)
        if hit is not None and hit[0] is stack and hit[1] is group and hit[2] == self._fleet_version:
            return hit[3]
        labels = {d: seen.attributes for d, seen in fleet.items()}
        targets = eligible(stack, members(group, labels), labels)
        self._targeted[stack.name] = (stack, group, self._fleet_version, targets)
        return targets

    def keep_up(self) -> None:
        """Take what the store wrote since into the kept fleet view, if there is one (after each
        batch of device messages, and at the tick). What the store says of each device written
        (its report, its row) is held until then: without a deployment step asking for the
        view, a registration of 10,000 devices held every one until the next metrics refresh
        (up to 15 s). Not when the store lost track (a rollback): reading every device again is
        left to the next caller that needs the view, as before (a refused request each would
        not cost a re-read)."""
        if self._fleet is not None and self._leading.is_set() and self.store.tracking_writes:
            self.fleet_view()

    def fleet_view(self) -> dict[str, Seen]:
        """Every device as a deployment step sees it: kept in memory, re-read only where written.

        A step looks at every device of the group, every second while devices report; parsing
        every device row each time was most of the controller's work during a deploy to
        10,000 devices. The store says which devices it wrote since the last call (and
        "anything" after a rollback): a new reported state is taken as written, any other
        change is read again.
        """
        written = self.store.devices_written()
        if self._fleet is None or written is None:
            self._fleet = {d.id: Seen.of(d) for d in self.store.list_devices()}
            self._fleet_version += 1
            self._count_stale = None
            return self._fleet
        if self._count_stale is not None and self._counted is not None:
            self._count_stale.update(written)
        for stale in self._stale.values():  # observe's views: these devices are looked at again
            stale.update(written)
        for device_id, change in written.items():
            seen = self._fleet.get(device_id)
            if isinstance(change, ReportedState) and seen is not None:
                self._fleet[device_id] = seen.reporting(change)
                continue
            if isinstance(change, PresenceWritten) and seen is not None:  # a presence: not read again
                seen = seen.present(change.device)
                self._fleet[device_id] = seen if change.reported is None else seen.reporting(change.reported)
                self._fleet_version += 1  # its attributes may have changed: group members too
                continue
            device = self.store.get_device(device_id)
            self._fleet_version += 1  # its attributes may have changed: group members too
            if device is None:
                self._fleet.pop(device_id, None)
            else:
                self._fleet[device_id] = Seen.of(device)
        return self._fleet

    def stack_counts(self) -> dict[str, tuple[int, int]] | None:
        """Per stack, (devices, running) of ``stacks ls``: the devices with a desired record that
        should run it or report it, and those of them that run it (:func:`.fleet.stack_state`);
        None on a standby (it has no fleet view of its own: the caller reads the store).

        Kept up to date, not counted again each call: only the devices the fleet view or a
        desired record written changed since the last call are counted again (the desired
        records are read once, then taken as the store writes them)."""
        if not self._leading.is_set():
            return None
        fleet = self.fleet_view()
        written = self.store.desired_written()
        counted = self._counted
        if counted is None or written is None:
            counted = self._counted = StackCounts(
                {r.device_id: desired(r) for r in self.store.list_desired()}
            )
            stale: set[str] | None = None
        else:
            for device_id, record in written.items():
                if record is None:
                    counted.records.pop(device_id, None)
                else:
                    counted.records[device_id] = desired(record)
            stale = None if self._count_stale is None else self._count_stale | written.keys()
        self._count_stale = set()
        counted.update(fleet, stale)
        return counted.counts

    def observe(
        self, stack: str, device_ids: Iterable[str], fleet: dict[str, Seen]
    ) -> dict[str, Observation]:
        """What each device reports of ``stack``: made again only for devices that changed
        since the last step (a step looks at every device of the group, every second).

        Asked again for the same devices of the same fleet view, the mapping of the last call
        is brought up to date where the fleet view wrote since (not rebuilt device by device:
        a step at 10,000 devices spent 15-20 ms here); it is only valid until the next call."""
        return self.observe_changes(stack, device_ids, fleet)[0]

    def observe_changes(
        self, stack: str, device_ids: Iterable[str], fleet: dict[str, Seen]
    ) -> tuple[dict[str, Observation], set[str] | None]:
        """:meth:`observe`, and the devices whose observation may not be the very object the
        last call gave (None: every device's was made again). What
        :func:`.rollout.step_changed` judges again."""
        ids = device_ids if isinstance(device_ids, set) else set(device_ids)
        view = self._views.get(stack)
        if view is not None and view[0] is fleet and view[1] == ids:
            out = view[2]
            stale, self._stale[stack] = self._stale[stack], set()
            stale &= ids
            out.update(self._observe(stack, stale, fleet))
            return out, stale
        out = self._observe(stack, ids, fleet)
        self._views[stack] = (fleet, ids, out)
        self._stale[stack] = set()
        return out, None

    def _observe(
        self, stack: str, device_ids: Iterable[str], fleet: dict[str, Seen]
    ) -> dict[str, Observation]:
        unknown = Observation(online=False)
        cache = self._observed.setdefault(stack, {})
        out = {}
        for device_id in device_ids:
            seen = fleet.get(device_id)
            if seen is None:
                out[device_id] = unknown
                continue
            hit = cache.get(device_id)
            if hit is not None and hit[0] is seen:
                out[device_id] = hit[1]
            else:
                out[device_id] = observed = seen.observe(stack)
                cache[device_id] = (seen, observed)
        return out

    def recompute(self, device_ids: set[str] | None = None) -> list[DesiredRecord] | None:
        """Give every device whose stacks changed the next generation (in the caller's transaction).

        With ``device_ids`` only those devices are looked at: a device that appears or
        changes labels costs O(groups + stacks), not O(fleet); None is returned. Without,
        every desired record as stored now is returned (by device id, as
        :meth:`.store.Store.list_desired` reads them): what publishing after it would
        otherwise read back, row by row, right after writing it.
        """
        groups = {g.name: g for g in self.store.list_groups()}
        if device_ids is None:
            self.update_placements()
        stacks = self.store.list_stacks()
        stack_groups = {s.name: s.group for s in stacks}
        applied: dict[str, int] = {}  # the generation each device reports having applied
        public_keys: dict[str, str | None] = {}  # secrets are sealed to them
        labels: dict[str, Attributes]
        if device_ids is None:
            fleet = self.fleet_view()  # the devices as stored, kept in memory (not 10,000 rows parsed)
            labels = {d: seen.attributes for d, seen in fleet.items() if not seen.revoked}
            applied = {d: seen.generation for d, seen in fleet.items() if seen.generation >= 0}
            public_keys = {d: seen.public_key for d, seen in fleet.items()}
            existing = {r.device_id: r for r in self.store.list_desired()}
            wanted = desired_stacks(stacks, groups, labels, self._pins())
            jobs = desired_jobs(self.store.list_jobs(), groups, labels)
            stages = self._stages()
            candidates = set(wanted) | set(existing) | set(jobs) | set(stages)
        else:
            labels = {}
            existing = {}
            for device_id in device_ids:
                device = self.store.get_device(device_id)
                if device is not None and device.revoked:
                    continue  # matches no selector (and has left every static group)
                labels[device_id] = device.attributes() if device else Attributes()
                if device is not None and device.reported is not None:
                    applied[device_id] = device.reported.generation
                if device is not None:
                    public_keys[device_id] = device.public_key
                record = self.store.get_desired(device_id)
                if record is not None:
                    existing[device_id] = record
            wanted = {
                d: refs
                for d, refs in desired_stacks(stacks, groups, labels, self._pins()).items()
                if d in device_ids
            }
            jobs = {
                d: j
                for d, j in desired_jobs(self.store.list_jobs(), groups, labels).items()
                if d in device_ids
            }
            stages = self._stages()
            candidates = set(device_ids)
        changed: list[DesiredRecord] = []
        stored: list[DesiredRecord] = []  # every record after this pass, by device id
        # The first record made from each set of parts (the very objects: a group's devices
        # share their stack references, most their empty jobs, variables and registries), by
        # their ids: the others are its copies with their own id and generation, not a model
        # built and walked each (share_field_sets). Half of a deploy's recompute at 10,000.
        shaped: dict[tuple[int, ...], tuple[tuple[object, ...], DesiredRecord]] = {}
        # The references and stages whose definitions are needed (spec_hashes: each tuple once).
        referenced: list[tuple[StackRef, ...]] = []
        for device_id in sorted(candidates):
            refs = wanted.get(device_id, ())
            device_jobs = jobs.get(device_id, ())
            stage = stages.get(device_id, ()) if device_id in labels else ()
            referenced += (refs, stage)
            record = existing.get(device_id)
            if record is None and not refs and not device_jobs and not stage:
                continue
            bindings = self.variables.bindings(
                device_id, refs, stack_groups, public_keys.get(device_id), record.vars if record else ()
            )
            auths = self.registries.auths(
                device_id,
                (*refs, *stage),
                device_jobs,
                stack_groups,
                public_keys.get(device_id),
                record.registries if record else (),
            )
            if (
                record is None
                or record.stacks != refs
                or record.jobs != device_jobs
                or record.vars != bindings
                or record.registries != auths
                or record.stage != stage
            ):
                # Past whatever the device applied, even from a store older than the device's
                # state (a restored backup): a lower generation would be ignored as a duplicate.
                generation = max(record.generation + 1 if record else 1, applied.get(device_id, 0) + 1)
                parts = (refs, device_jobs, bindings, auths, stage)
                alike = shaped.get(tuple(map(id, parts)))
                if alike is not None:  # a copy of a record with these very parts: nothing walked again
                    changed.append(shared_copy(alike[1], {"device_id": device_id, "generation": generation}))
                    stored.append(changed[-1])
                    continue
                # Shared at once (as the store keeps it): each record's own set of field names
                # (720 bytes) was alive until all were stored, 36 MB at 50,000 devices.
                made = share_field_sets(
                    DesiredRecord.model_construct(  # from validated parts: 10,000 validations spared
                        device_id=device_id,
                        generation=generation,
                        stacks=refs,
                        jobs=device_jobs,
                        vars=bindings,
                        registries=auths,
                        stage=stage,
                        published=False,
                    )
                )
                shaped[tuple(map(id, parts))] = (parts, made)  # the parts kept: their ids stay theirs
                changed.append(made)
                stored.append(made)
            else:
                stored.append(record)  # unchanged: as stored
        self.store.put_desired_many(changed)
        known = self.store.definitions()
        for spec_hash in spec_hashes(referenced) - set(known):
            self.store.set_definition(spec_hash, False)
        return stored if device_ids is None else None

    def _next_placements(self, stacks: list[Stack]) -> dict[str, tuple[Assignment, ...]]:
        devices = [d for d in self.store.list_devices() if not d.revoked]
        labels = {d.id: d.attributes() for d in devices}
        load: dict[str, int] = {}
        for record in self.store.list_desired():
            load[record.device_id] = len(record.stacks)
        candidates = {
            d.id: Candidate(
                d.id, d.status == "online", d.since if d.status != "online" else None, load.get(d.id, 0)
            )
            for d in devices
        }
        groups = {g.name: g for g in self.store.list_groups()}
        now = self.clock()
        result = {}
        for stack in stacks:
            group = groups.get(stack.group)
            group_members = eligible(stack, members(group, labels), labels) if group else []
            result[stack.name] = place(stack.placement, group_members, candidates, stack.assignment, now)
        return result

    def placements_changed(self, stacks: list[Stack]) -> bool:
        nxt = self._next_placements(stacks)
        return any(nxt[s.name] != s.assignment for s in stacks)

    def update_placements(self) -> None:
        stacks = [s for s in self.store.list_stacks() if s.placement.mode == "replicas"]
        if not stacks:
            return
        nxt = self._next_placements(stacks)
        for stack in stacks:
            if nxt[stack.name] != stack.assignment:
                log.info(
                    "stack %s placed on %s",
                    stack.name,
                    ", ".join(a.device_id for a in nxt[stack.name]) or "nothing",
                )
                self.store.put_stack(stack.model_copy(update={"assignment": nxt[stack.name]}))
