"""Private image registries (``tether registries``): credentials sealed end to end, like secrets.

* ``tether registries add HOST --username U --password-stdin`` seals the username and
  password to the controller's secrets key (``vars.key``) before they leave the operator's
  machine, so the request on the broker is ciphertext.
* At rest a registry holds only that sealed box (:class:`~.models.Registry`), in one scope:
  the fleet, a group (the devices running that group's stacks) or a device.
* Each device gets, in its desired state, a :class:`~tether.protocol.models.RegistryAuth`
  per registry its images come from (stacks, staged stacks and jobs; never for registries
  it does not use), sealed to the device's own public key. For a host, the device's own
  credentials win, then those of a group whose stack uses the host, then the fleet's. The
  sealed box is reused while a keyed digest of (host, device key, credentials) is
  unchanged, so an unchanged registry republishes nothing.

:class:`RegistryCredentials` is the controller's view of the registries (desired states'
credentials); the ``registries.*`` handlers below use it through the :class:`~.context.Context`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from tether.protocol.commands import RegistriesAdd, RegistriesList, RegistriesRemove
from tether.protocol.enrollment import seal_text
from tether.protocol.errors import PayloadError, StoreError
from tether.protocol.models import JobSpec, RegistryAuth, StackRef
from tether.protocol.names import REGISTRY_HOST, registry_of
from tether.protocol.results import RegistryAdded, RegistryList, RegistryRemoved, RegistryView

from .context import Context
from .models import Registry
from .registry import CommandRegistry, Route
from .store import Store
from .variables import FLEET, SecretsKey, check_scope

MAX_CREDENTIAL_BYTES = 4096

commands = CommandRegistry(tag="registries")
"""The commands handled here (see :mod:`.registry`)."""


def _host(host: str) -> str:
    problem = REGISTRY_HOST.problem(host)
    if problem:
        raise StoreError(problem)
    return host.lower()


class RegistryCredentials:
    """The registries as desired states use them: cached until one changes, credentials opened
    once per version, each definition's registry hosts read once."""

    def __init__(self, store: Store, secrets: SecretsKey | None) -> None:
        self.store = store
        self.secrets = secrets
        self._registries: dict[tuple[str, str], Registry] | None = None
        self._registry_items: dict[tuple[str, str, int], dict[str, str]] = {}
        self._spec_hosts: dict[str, tuple[str, ...]] = {}

    def forget(self) -> None:
        """Read the registries from the store again next time."""
        self._registries = None

    def all(self) -> dict[tuple[str, str], Registry]:
        """Every registry by (scope, host)."""
        if self._registries is None:
            self._registries = {(r.scope, r.host): r for r in self.store.list_registries()}
        return self._registries

    def credentials(self, registry: Registry) -> dict[str, str]:
        """A registry's username and password, opened with the secrets key."""
        key = (registry.scope, registry.host, registry.version)
        items = self._registry_items.get(key)
        if items is None:
            if self.secrets is None:
                raise StoreError(f"registry {registry.host}: this controller has no secrets key")
            try:
                items = self.secrets.open_items(registry.sealed, f"registry {registry.host}")
            except PayloadError as exc:
                raise StoreError(f"{exc} (is secrets.key the one that stored it?)") from exc
            self._registry_items[key] = items
        return items

    def spec_hosts(self, spec_hash: str) -> tuple[str, ...]:
        """The registries a stack definition's images come from (cached: definitions never change)."""
        hosts = self._spec_hosts.get(spec_hash)
        if hosts is None:
            spec = self.store.get_spec(spec_hash)
            images = [s.image for s in spec.services if s.image] if spec is not None else []
            hosts = tuple(sorted({registry_of(i).lower() for i in images}))
            self._spec_hosts[spec_hash] = hosts
        return hosts

    def auths(
        self,
        device_id: str,
        refs: Iterable[StackRef],
        jobs: Iterable[JobSpec],
        stack_groups: Mapping[str, str],
        public_key: str | None,
        previous: tuple[RegistryAuth, ...],
    ) -> tuple[RegistryAuth, ...]:
        """The credentials a device gets: one per registry its images come from that has some."""
        registries = self.all()
        if not registries:
            return ()
        used: dict[str, set[str]] = {}  # host -> groups of the stacks that use it
        for ref in refs:
            for host in self.spec_hosts(ref.spec_hash):
                used.setdefault(host, set()).add(stack_groups.get(ref.name, ""))
        for job in jobs:
            if job.image:
                used.setdefault(registry_of(job.image).lower(), set())
        reuse = {(a.host, a.digest): a.sealed for a in previous if a.sealed is not None}
        auths = []
        for host, groups in sorted(used.items()):
            scopes = [f"device:{device_id}", *(f"group:{g}" for g in sorted(groups) if g), FLEET]
            registry = next((registries[(s, host)] for s in scopes if (s, host) in registries), None)
            if registry is None:
                continue
            if public_key is None:
                error = "the device has not announced its public key yet (it does when it comes online)"
                auths.append(RegistryAuth(host=host, error=error))
                continue
            try:
                items = self.credentials(registry)
            except StoreError as exc:
                auths.append(RegistryAuth(host=host, error=f"cannot be read on the controller: {exc}"))
                continue
            plain = json.dumps({"username": items["username"], "password": items["password"]})
            assert self.secrets is not None  # credentials() needs it
            digest = self.secrets.digest("registry", host, public_key, plain)
            sealed = reuse.get((host, digest))
            if sealed is None:
                try:
                    sealed = seal_text(public_key, plain)
                except PayloadError as exc:
                    auths.append(RegistryAuth(host=host, error=f"device public key: {exc}"))
                    continue
            auths.append(RegistryAuth(host=host, digest=digest, sealed=sealed))
        return tuple(auths)


def registry_view(r: Registry) -> RegistryView:
    """A registry as replies show it (never its credentials)."""
    return RegistryView(host=r.host, scope=r.scope, version=r.version, updated=r.updated)


@commands.command(
    RegistriesAdd, role="admin", http=Route("POST", "/registries", "Add a registry's credentials", status=201)
)
def registries_add(ctx: Context, cmd: RegistriesAdd) -> RegistryAdded:
    host = _host(cmd.host)
    scope = check_scope(ctx.store, cmd.group, cmd.device_id)
    if ctx.secrets is None:
        raise StoreError("this controller has no secrets key (it is made in tether up's --data-dir)")
    try:
        items = ctx.secrets.open_items(cmd.sealed, "registries add: sealed credentials")
    except PayloadError as exc:
        raise StoreError(str(exc)) from exc
    problems = []
    if set(items) != {"username", "password"}:
        problems.append("the sealed credentials must hold exactly a username and a password")
    for name in ("username", "password"):
        value = items.get(name, "")
        if not value:
            problems.append(f"the {name} is empty")
        elif len(value.encode()) > MAX_CREDENTIAL_BYTES:
            problems.append(f"the {name} is longer than {MAX_CREDENTIAL_BYTES} bytes")
    if "\n" in items.get("username", "") or ":" in items.get("username", ""):
        problems.append("the username must not contain ':' or a line break")
    if problems:
        raise StoreError(f"registries add {host}: " + "; ".join(problems))
    existing = ctx.store.get_registry(scope, host)
    if existing is not None and ctx.registries.credentials(existing) == items:
        return RegistryAdded(registry=registry_view(existing), changed=False)
    registry = Registry(
        scope=scope,
        host=host,
        sealed=ctx.secrets.seal_items(items),
        version=existing.version + 1 if existing else 1,
        updated=ctx.clock(),
    )
    _save_registries(ctx, put=registry)
    return RegistryAdded(registry=registry_view(registry), changed=True)


@commands.command(
    RegistriesList, role="viewer", http=Route("GET", "/registries", "Private registries' credentials")
)
def registries_ls(ctx: Context, cmd: RegistriesList) -> RegistryList:
    found = sorted(ctx.store.list_registries(), key=lambda r: (r.host, r.scope))
    return RegistryList(registries=[registry_view(r) for r in found])


@commands.command(
    RegistriesRemove,
    role="admin",
    http=Route("DELETE", "/registries/{host}", "Remove a registry's credentials"),
)
def registries_rm(ctx: Context, cmd: RegistriesRemove) -> RegistryRemoved:
    host = _host(cmd.host)
    scope = check_scope(ctx.store, cmd.group, cmd.device_id)
    if ctx.store.get_registry(scope, host) is None:
        raise StoreError(f"no registry {host} ({scope})")
    _save_registries(ctx, delete=(scope, host))
    return RegistryRemoved(host=host, scope=scope)


def _save_registries(
    ctx: Context, put: Registry | None = None, delete: tuple[str, str] | None = None
) -> None:
    """Store the change and give every device whose credentials change a new generation."""
    with ctx.store.transaction():
        if put is not None:
            ctx.store.put_registry(put)
        if delete is not None:
            ctx.store.delete_registry(*delete)
        ctx.registries.forget()
        ctx.scheduler.recompute()
    ctx.publisher.publish_pending()
