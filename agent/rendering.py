"""Rendering: each desired stack turned into what this device runs.

Theory of operation
-------------------
``${var:PATH/KEY}`` references in environment values and config templates are replaced
with the desired state's bindings (a secret opened with the device's key;
:mod:`tether.protocol.variables` is the pure part), config files are written under the
data directory, and a changed file queues a signal for ``change_mode: signal`` services
(sent by :meth:`Renderer.send_signals` after the plan is applied). A stack this device will
not run (its host access policy, or keys its driver cannot apply) is refused with one error
naming everything refused. A rendering that fails (a missing value, a tampered secret, a
full disk) leaves the stack as it was rendered last, or, never rendered, not started; the
error goes out once as an event and in every report. Renderings are cached per stack until
its definition or bindings change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from tether.protocol.enrollment import DeviceKey
from tether.protocol.errors import PayloadError
from tether.protocol.heap import Shared
from tether.protocol.models import StackSpec, VarBinding
from tether.protocol.variables import RenderError, render_stack

from .drivers.base import Driver, Observed
from .policy import HostAccess, refusals
from .store import StateStore

__all__ = ["Renderer", "Rendering"]


@dataclass(frozen=True)
class Rendering:
    """A stack as last rendered for this device: ``spec`` is what runs (None: never rendered)."""

    key: tuple[object, ...]
    spec: StackSpec | None
    error: str | None = None


_AS_IS: Shared[str, bool] = Shared(256)
"""Per stack content hash: whether the stack renders as it is (see :func:`_as_is`)."""


def _as_is(spec: StackSpec) -> bool:
    """Whether ``spec`` renders to itself whatever the device: no config files, no variable
    reference in an environment value, no ``stack`` volume (relative bind mounts). A pure
    function of the stack's content, kept per content hash (a fleet's devices, a version's
    every render) in :data:`_AS_IS`."""
    return _AS_IS.get(
        spec.spec_hash(),
        lambda: (
            not spec.configs
            and not any(
                s.configs
                or any(v.type == "stack" for v in s.volumes)
                or any("${var:" in value for value in s.environment.values())
                for s in spec.services
            )
        ),
    )


class Renderer:
    """Renders stacks for one device and keeps what it rendered last (see the module docstring)."""

    def __init__(
        self,
        store: StateStore,
        key: DeviceKey | None,
        host_access: HostAccess,
        driver: Driver,
        event: Callable[..., None],
    ) -> None:
        """``event``: :meth:`~.core.AgentCore.event` (kind, message, level, stack, service)."""
        self.store = store
        self.key = key
        self.host_access = host_access
        self.driver = driver
        self.event = event
        self.renderings: dict[str, Rendering] = {}
        self.signals: set[tuple[str, str, str]] = set()  # (stack, service, signal) to send
        self._versions: Mapping[str, str] = {}

    def render(
        self, specs: dict[str, StackSpec], variables: Sequence[VarBinding], versions: Mapping[str, str]
    ) -> tuple[dict[str, StackSpec], dict[str, str]]:
        """The stacks to run, rendered for this device, and the stacks whose rendering failed
        (name to error). A failed stack runs as last rendered, or is left alone if it never
        was. Renderings are cached per stack until its definition or bindings change."""
        self._versions = versions  # stack -> the version it runs (events name it)
        bindings: dict[str, list[VarBinding]] = {}
        for binding in variables:
            bindings.setdefault(binding.stack, []).append(binding)
        rendered: dict[str, StackSpec] = {}
        errors: dict[str, str] = {}
        for name, spec in specs.items():
            mine = bindings.get(name, [])
            key = (spec.spec_hash(), *((b.ref, b.digest, b.value, b.sealed, b.error) for b in mine))
            previous = self.renderings.get(name)
            if previous is None or previous.key != key:
                refused = self.refusals(spec)
                if refused:
                    self.renderings[name] = self._refuse(name, refused, key, previous)
                else:
                    self.renderings[name] = self._render_stack(name, spec, mine, key, previous)
            current = self.renderings[name]
            if current.spec is not None:
                rendered[name] = current.spec
            if current.error is not None:
                errors[name] = current.error
        if set(self.renderings) - set(specs):
            self.renderings = {n: r for n, r in self.renderings.items() if n in specs}
            self.store.prune_configs(set(self.renderings))
        return rendered, errors

    def refusals(self, spec: StackSpec) -> list[str]:
        """What this device will not run of ``spec``: its host access policy, and keys its driver
        cannot apply (the process driver has no container to put them in)."""
        found = refusals(spec, self.host_access)
        unsupported = getattr(self.driver, "unsupported", None)
        if unsupported is not None:
            found.extend(unsupported(spec))
        return found

    def _refuse(
        self, name: str, refused: list[str], key: tuple[object, ...], previous: Rendering | None
    ) -> Rendering:
        """A stack this device will not run: one error naming everything refused. What ran
        before keeps running; no other stack is touched."""
        message = f"stack {name}: refused on this device: " + "; ".join(refused)
        return self._failed(name, "stack.refused", message, key, previous, "keeps running as before")

    def _failed(
        self,
        name: str,
        kind: str,
        message: str,
        key: tuple[object, ...],
        previous: Rendering | None,
        kept_as: str = "keeps running as rendered before",
    ) -> Rendering:
        """A stack that cannot run as asked: its error event (once while the message is the
        same), and the previous rendering's spec kept in force."""
        if previous is None or previous.error != message:
            kept = kept_as if previous and previous.spec else "is not started"
            self.event(
                kind,
                f"{message} (the stack {kept})",
                level="error",
                stack=name,
                spec_hash=self._versions.get(name),
            )
        return Rendering(key, previous.spec if previous else None, message)

    def _render_stack(
        self,
        name: str,
        spec: StackSpec,
        bindings: list[VarBinding],
        key: tuple[object, ...],
        previous: Rendering | None,
    ) -> Rendering:
        if not bindings and _as_is(spec):
            # Nothing to render, write or place: what render_stack and _place_stack_volumes
            # would return (the spec itself), without their scans (every device, every version).
            return Rendering(key, spec)
        values: dict[str, str] = {}
        problems: list[str] = []
        for b in bindings:
            if b.error is not None:
                problems.append(f"variable {b.ref!r}: {b.error}")
            elif b.sealed is not None:
                if self.key is None:
                    problems.append(f"secret {b.ref!r}: this agent has no key to open secrets")
                    continue
                try:
                    values[b.ref] = self.key.open_text(b.sealed, f"secret {b.ref!r}")
                except PayloadError as exc:
                    problems.append(str(exc))
            elif b.value is not None:
                values[b.ref] = b.value
        try:
            if problems:
                raise RenderError(f"stack {name}: " + "; ".join(problems))
            spec_r, files = render_stack(
                name, spec, values, lambda config: self.store.config_path(name, config)
            )
            spec_r = self._place_stack_volumes(name, spec_r)
        except RenderError as exc:
            message = str(exc)
            # A directory that could not be made ready (a full disk) is tried again next round,
            # as a config file that could not be written (a key that never matches).
            unready = isinstance(exc.__cause__, OSError)
            return self._failed(
                name, "stack.render_failed", message, ("unwritten",) if unready else key, previous
            )
        modes = {m.source: m.mode for s in reversed(spec.services) for m in s.configs}
        try:
            changed = {
                config
                for config, content in files.items()
                if self.store.write_config(name, config, content, modes.get(config, 0o444))
            }
        except OSError as exc:  # a full disk: rendered again next round (a key that never matches)
            message = f"stack {name}: cannot write config file {exc.filename}: {exc.strerror or exc}"
            return self._failed(name, "stack.render_failed", message, ("unwritten",), previous)
        for service in spec_r.services:
            for mount in service.configs:
                if mount.source not in changed or previous is None or previous.spec is None:
                    continue
                if mount.change_mode == "signal":
                    self.signals.add((name, service.name, mount.change_signal))
                action = {
                    "restart": "restarting",
                    "signal": f"sending {mount.change_signal}",
                    "noop": "not restarting",
                }
                self.event(
                    "config.changed",
                    f"config {mount.source} changed: {action[mount.change_mode]} {service.name}",
                    stack=name,
                    service=service.name,
                )
        return Rendering(key, spec_r)

    def _place_stack_volumes(self, name: str, spec: StackSpec) -> StackSpec:
        """Relative bind mounts (``stack`` volumes) pointed at the stack's directory on this
        device, made ready (shipped files written there); raise :class:`RenderError`."""
        sources = {v.source for s in spec.services for v in s.volumes if v.type == "stack"}
        if not sources:
            return spec
        try:
            paths = self.store.stack_paths(name, sources, spec.files)
        except (OSError, ValueError) as exc:
            raise RenderError(f"stack {name}: its directory: {exc}") from exc
        services = []
        for service in spec.services:
            if any(v.type == "stack" for v in service.volumes):
                volumes = tuple(
                    v.model_copy(update={"source": paths[v.source]}) if v.type == "stack" else v
                    for v in service.volumes
                )
                service = service.model_copy(update={"volumes": volumes})
            services.append(service)
        return spec.model_copy(update={"services": tuple(services)})

    def send_signals(self, observed: list[Observed], desired: dict[str, StackSpec]) -> None:
        """Signal the running instances whose config changed (``change_mode: signal``)."""
        signals, self.signals = self.signals, set()
        for stack, service, signame in sorted(signals):
            spec = desired.get(stack)
            svc = spec.service(service) if spec is not None else None
            for inst in observed:
                if (inst.stack, inst.service) != (stack, service) or inst.state != "running":
                    continue
                if svc is None or inst.spec_hash != svc.spec_hash():
                    continue  # replaced in this round: it read the new file when it started
                try:
                    self.driver.signal(inst, signame)
                except Exception as exc:  # noqa: BLE001 - recorded, like every driver failure
                    self.event(
                        "action.failed", f"{signame}: {exc}", level="error", stack=stack, service=service
                    )
