"""Variables and secrets (``tether vars``), and the values each device's stacks get.

A variable is a set of keys and values at a path (``db``, ``site/berlin``), in one scope:
the fleet, a group, or a device. A stack references one key as ``${var:PATH/KEY}`` in an
environment value or a config file; for a device, the reference resolves to the device's
own variable, else its stack's group's, else the fleet's (:func:`resolve`).

Secrets are encrypted end to end:

* The controller has an X25519 key pair for secrets (:class:`SecretsKey`, the file
  ``{data_dir}/secrets.key``, 0600; every controller of an HA pair needs the same file).
  ``tether vars set --secret`` seals the keys to its public key before they leave the
  operator's machine, so the request on the broker is ciphertext.
* At rest, a secret variable holds only that sealed box (``Variable.sealed``); the database
  never sees a value.
* Each device gets a secret in its desired state sealed to the device's own public key
  (which its agent announces in its facts), so only that device can open it. The sealed box
  is reused while the value and the key stay the same (``VarBinding.digest``, a MAC keyed
  with the secrets key), so an unchanged secret republishes nothing.

:class:`VariableBindings` is the controller's view of the variables (desired states' bindings);
the ``vars.*`` handlers below use it through the :class:`~.context.Context`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey
from tether.protocol import names
from tether.protocol.commands import VarsGet, VarsKey, VarsList, VarsRemove, VarsSet
from tether.protocol.enrollment import new_private_key, open_bytes, public_key_b64, seal_bytes, seal_text
from tether.protocol.errors import PayloadError, StoreError
from tether.protocol.models import StackRef, VarBinding
from tether.protocol.results import (
    PublicKey,
    VariableList,
    VariableRemoved,
    VariableResult,
    VariableSet,
    VariableView,
)
from tether.protocol.secret_files import write_secret_text
from tether.protocol.variables import KEY_RE, PATH_RE, split_ref, stack_references

from .context import Context
from .models import Variable
from .registry import CommandRegistry, Route
from .store import Store

log = logging.getLogger(__name__)
commands = CommandRegistry(tag="variables")
"""The commands handled here (see :mod:`.registry`)."""

KEY_FILE = "secrets.key"
MAX_VALUE_BYTES = 64 * 1024
FLEET = "fleet"


class SecretsKey:
    """The controller's key pair for secrets."""

    def __init__(self, private_key: PrivateKey) -> None:
        self._key = private_key
        self.public_key = public_key_b64(private_key)
        self._mac_key = hashlib.sha256(b"tether vars digest\x00" + bytes(private_key)).digest()

    @classmethod
    def for_store(cls, store: Store, data_dir: Path) -> SecretsKey:
        """The key of ``data_dir`` checked against the store's secrets, made only if the store
        has none (a new key could never open them)."""
        path = Path(data_dir) / KEY_FILE
        if not path.exists() and any(v.secret for v in store.list_variables()):
            raise StoreError(
                f"{path} is missing but this database holds secrets sealed to it: restore the "
                "secrets.key backed up with the database, or copy it from the other controller"
            )
        key = cls.load_or_create(data_dir)
        key.check_store(store, data_dir)
        return key

    @classmethod
    def load_or_create(cls, data_dir: Path) -> SecretsKey:
        """``{data_dir}/secrets.key``, made on first use; a clear error if it is unreadable."""
        path = Path(data_dir) / KEY_FILE
        if path.exists():
            try:
                return cls(PrivateKey(base64.b64decode(path.read_text().strip(), validate=True)))
            except (OSError, ValueError, TypeError) as exc:  # PyNaCl: TypeError for a wrong length
                raise StoreError(f"secrets key {path} is unreadable: {exc}") from exc
        key = new_private_key()
        write_secret_text(path, base64.b64encode(bytes(key)).decode() + "\n")
        log.info(
            "made the secrets key %s (keep it with the database: secrets cannot be read without it)", path
        )
        return cls(key)

    def check_store(self, store: Store, data_dir: Path) -> None:
        """Refuse to start with a key that cannot open the store's secrets (another controller's,
        or a new one after a restore without the old file): say so at once, not per device."""
        stored = next((v for v in store.list_variables() if v.secret and v.sealed), None)
        if stored is None:
            return
        try:
            self.open_items(stored.sealed or "", f"secret {stored.path}")
        except PayloadError as exc:
            raise StoreError(
                f"{Path(data_dir) / KEY_FILE} cannot open the secrets in this database ({exc}): "
                "restore the secrets.key backed up with it, or copy it from the other controller"
            ) from exc

    def seal_items(self, items: Mapping[str, str]) -> str:
        """``items`` sealed to this key (how a secret is kept at rest, and how the CLI sends one)."""
        return seal_bytes(self.public_key, json.dumps(dict(items), sort_keys=True).encode())

    def open_items(self, sealed: str, what: str) -> dict[str, str]:
        """The keys and values in a sealed box to this key; :class:`PayloadError` otherwise."""
        plaintext = open_bytes(self._key, sealed, what)
        try:
            items = json.loads(plaintext)
        except ValueError as exc:
            raise PayloadError(f"{what}: not a JSON object of keys and values") from exc
        if not isinstance(items, dict) or not all(isinstance(v, str) for v in items.values()):
            raise PayloadError(f"{what}: not a JSON object of keys and string values")
        return items

    def digest(self, *parts: str) -> str:
        """A MAC of ``parts``: changes with them, says nothing about them without the key."""
        return hmac.new(self._mac_key, "\x00".join(parts).encode(), hashlib.sha256).hexdigest()[:32]


def scope_of(group: str | None, device_id: str | None) -> str:
    if group is not None and device_id is not None:
        raise StoreError("a variable is scoped to a group or to a device, not both")
    if group is not None:
        return f"group:{group}"
    if device_id is not None:
        return f"device:{device_id}"
    return FLEET


def resolve(
    variables: Mapping[tuple[str, str], Variable], device_id: str, group: str, ref: str
) -> Variable | None:
    """The variable that gives ``ref`` its value on ``device_id`` for a stack of ``group``:
    the device's own, else the group's, else the fleet's. Pure."""
    path, key = split_ref(ref)
    for scope in (f"device:{device_id}", f"group:{group}", FLEET):
        variable = variables.get((scope, path))
        if variable is not None and key in variable.keys:
            return variable
    return None


def unresolved(
    variables: Mapping[tuple[str, str], Variable], refs: Iterable[str], device_ids: Iterable[str], group: str
) -> dict[str, list[str]]:
    """For each reference without a value on some of ``device_ids``: those devices. Pure."""
    missing: dict[str, list[str]] = {}
    for ref in sorted(refs):
        for device_id in device_ids:
            if resolve(variables, device_id, group, ref) is None:
                missing.setdefault(ref, []).append(device_id)
    return missing


def missing_message(stack: str, missing: dict[str, list[str]]) -> str:
    ref, devices = next(iter(missing.items()))
    path, key = split_ref(ref)
    shown = ", ".join(devices[:5]) + (f" and {len(devices) - 5} more" if len(devices) > 5 else "")
    return (
        f"stack {stack!r}: ${{var:{ref}}} has no value for {shown}; "
        f"set it first (tether vars set {path} {key}=... for the fleet, --group or --device)"
    )


class VariableBindings:
    """The variables as desired states use them: every variable cached until one changes, a
    secret opened once per version, each definition's references read once."""

    def __init__(self, store: Store, secrets: SecretsKey | None) -> None:
        self.store = store
        self.secrets = secrets
        self._variables: dict[tuple[str, str], Variable] | None = None
        self._secret_items: dict[tuple[str, str, int], dict[str, str]] = {}
        self._spec_refs: dict[str, tuple[str, ...]] = {}

    def forget(self) -> None:
        """Read the variables from the store again next time (they changed, or another
        controller may have changed them)."""
        self._variables = None

    def all(self) -> dict[tuple[str, str], Variable]:
        """Every variable by (scope, path)."""
        if self._variables is None:
            self._variables = {(v.scope, v.path): v for v in self.store.list_variables()}
        return self._variables

    def items(self, variable: Variable) -> dict[str, str]:
        """A variable's keys and values (a secret's opened with the secrets key)."""
        if not variable.secret:
            return dict(variable.items)
        cache_key = (variable.scope, variable.path, variable.version)
        items = self._secret_items.get(cache_key)
        if items is None:
            if self.secrets is None or variable.sealed is None:
                raise StoreError(f"secret {variable.path!r}: this controller has no secrets key")
            try:
                items = self.secrets.open_items(variable.sealed, f"secret {variable.path!r}")
            except PayloadError as exc:
                raise StoreError(f"{exc} (is {KEY_FILE} the one that stored it?)") from exc
            self._secret_items[cache_key] = items
        return items

    def stack_refs(self, spec_hash: str) -> tuple[str, ...]:
        """The variable references of a stack definition (cached: definitions never change)."""
        refs = self._spec_refs.get(spec_hash)
        if refs is None:
            spec = self.store.get_spec(spec_hash)
            refs = tuple(sorted(stack_references(spec))) if spec is not None else ()
            self._spec_refs[spec_hash] = refs
        return refs

    def bindings(
        self,
        device_id: str,
        refs: tuple[StackRef, ...],
        stack_groups: Mapping[str, str],
        public_key: str | None,
        previous: tuple[VarBinding, ...],
    ) -> tuple[VarBinding, ...]:
        """The values a device's stacks get, one binding per (stack, reference)."""
        wanted = [(ref.name, r) for ref in refs for r in self.stack_refs(ref.spec_hash)]
        if not wanted:
            return ()
        variables = self.all()
        reuse = {(b.stack, b.ref, b.digest): b.sealed for b in previous if b.sealed is not None}
        bindings = []
        for stack, ref in wanted:
            group = stack_groups.get(stack, "")
            variable = resolve(variables, device_id, group, ref)
            if variable is None:
                error = f"not set (for device {device_id}, group {group} or the fleet)"
                bindings.append(VarBinding(stack=stack, ref=ref, error=error))
                continue
            try:
                value = self.items(variable)[split_ref(ref)[1]]
            except StoreError as exc:
                bindings.append(
                    VarBinding(stack=stack, ref=ref, error=f"cannot be read on the controller: {exc}")
                )
                continue
            if not variable.secret:
                bindings.append(VarBinding(stack=stack, ref=ref, value=value, digest=self.digest(ref, value)))
                continue
            if public_key is None:
                error = (
                    "secret: the device has not announced its public key yet (it does when it comes online)"
                )
                bindings.append(VarBinding(stack=stack, ref=ref, error=error))
                continue
            digest = self.digest(ref, public_key, value)
            sealed = reuse.get((stack, ref, digest))
            if sealed is None:
                try:
                    sealed = seal_text(public_key, value)
                except PayloadError as exc:
                    bindings.append(
                        VarBinding(stack=stack, ref=ref, error=f"secret: device public key: {exc}")
                    )
                    continue
            bindings.append(VarBinding(stack=stack, ref=ref, digest=digest, sealed=sealed))
        return tuple(bindings)

    def digest(self, *parts: str) -> str:
        """A digest of ``parts``: keyed with the secrets key when there is one."""
        if self.secrets is not None:
            return self.secrets.digest(*parts)
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]  # plain values only

    def check_stack(self, stack: str, refs: Iterable[str], device_ids: list[str], group: str) -> None:
        """Refuse a deployment whose references have no value on a device it targets."""
        missing = unresolved(self.all(), refs, device_ids, group)
        if missing:
            raise StoreError(missing_message(stack, missing))


def variable_view(v: Variable, values: bool) -> VariableView:
    """A variable as replies show it (``values``: with a plain variable's items)."""
    return VariableView(
        path=v.path,
        scope=v.scope,
        secret=v.secret,
        keys=list(v.keys),
        version=v.version,
        updated=v.updated,
        items=dict(v.items) if values and not v.secret else None,
    )


def check_scope(store: Store, group: str | None, device_id: str | None) -> str:
    """The scope ``group`` or ``device_id`` names (neither: the fleet); refused if the group is unknown."""
    scope = scope_of(group, device_id)
    if group is not None and store.get_group(group) is None:
        raise StoreError(f"unknown group {group!r}")
    if device_id is not None and not names.DEVICE_ID.ok(device_id):
        raise StoreError(f"invalid device id {device_id!r}")
    return scope


def _check_path(path: str) -> None:
    if not PATH_RE.match(path) or len(path) > 200:
        raise StoreError(
            f"invalid variable path {path!r}: letters, digits, '_', '.', '-', and '/' between parts"
        )


@commands.command(
    VarsKey, role="viewer", http=Route("GET", "/secrets-key", "The public key secrets are sealed to")
)
def vars_key(ctx: Context, cmd: VarsKey) -> PublicKey:
    if ctx.secrets is None:
        raise StoreError("this controller has no secrets key (it is made in tether up's --data-dir)")
    return PublicKey(public_key=ctx.secrets.public_key)


@commands.command(VarsSet, http=Route("PATCH", "/variables/{path:path}", "Set keys of a variable"))
def vars_set(ctx: Context, cmd: VarsSet) -> VariableSet:
    _check_path(cmd.path)
    scope = check_scope(ctx.store, cmd.group, cmd.device_id)
    if cmd.secret:
        if cmd.items or cmd.sealed is None:
            raise StoreError(
                "a secret's keys must be sealed to the controller's key (vars.key), not sent in plain"
            )
        if ctx.secrets is None:
            raise StoreError("this controller has no secrets key (it is made in tether up's --data-dir)")
        try:
            items = ctx.secrets.open_items(cmd.sealed, "vars set: sealed keys")
        except PayloadError as exc:
            raise StoreError(str(exc)) from exc
    else:
        if cmd.sealed is not None:
            raise StoreError("sealed keys are only for a secret (secret: true)")
        items = dict(cmd.items)
    if not items:
        raise StoreError("vars set: give at least one KEY=VALUE")
    for key, value in items.items():
        if not KEY_RE.match(key) or len(key) > 100:
            raise StoreError(f"invalid key {key!r} in {cmd.path}: letters, digits, '_', '.', '-'")
        if len(value.encode()) > MAX_VALUE_BYTES:
            raise StoreError(f"{cmd.path}/{key}: value larger than {MAX_VALUE_BYTES // 1024} KiB")
    existing = ctx.store.get_variable(scope, cmd.path)
    if existing is not None and existing.secret != cmd.secret:
        kind = "a secret" if existing.secret else "not a secret"
        raise StoreError(
            f"variable {cmd.path} ({scope}) is {kind}: set it the same way, or remove it first (tether vars rm)"
        )
    current = ctx.variables.items(existing) if existing else {}
    merged = {**current, **items}
    if existing is not None and merged == current:
        return VariableSet(variable=variable_view(existing, values=True), changed=False)
    now = ctx.clock()
    fields: dict[str, Any] = {
        "scope": scope,
        "path": cmd.path,
        "secret": cmd.secret,
        "keys": tuple(sorted(merged)),
        "version": existing.version + 1 if existing else 1,
        "updated": now,
    }
    variable = Variable(**fields, **_holding(ctx.secrets, cmd.secret, merged))
    _save_variables(ctx, [variable], [])
    return VariableSet(variable=variable_view(variable, values=True), changed=True)


def _holding(secrets: SecretsKey | None, secret: bool, items: dict[str, str]) -> dict[str, Any]:
    """The fields that keep ``items``: in plain, or only sealed to the secrets key."""
    if not secret:
        return {"items": items, "sealed": None}
    assert secrets is not None
    return {"items": {}, "sealed": secrets.seal_items(items)}


def _existing(store: Store, path: str, group: str | None, device_id: str | None) -> tuple[str, Variable]:
    """The scope and variable a ``get`` or ``rm`` names; a clear error if there is none."""
    _check_path(path)
    scope = check_scope(store, group, device_id)
    variable = store.get_variable(scope, path)
    if variable is None:
        raise StoreError(f"no variable {path} ({scope})")
    return scope, variable


@commands.command(
    VarsGet,
    read_only=True,
    http=Route("GET", "/variables/{path:path}", "A variable's keys (a secret's values are never sent)"),
)
def vars_get(ctx: Context, cmd: VarsGet) -> VariableResult:
    _, variable = _existing(ctx.store, cmd.path, cmd.group, cmd.device_id)
    return VariableResult(variable=variable_view(variable, values=True))


@commands.command(VarsList, read_only=True, http=Route("GET", "/variables", "Every variable"))
def vars_ls(ctx: Context, cmd: VarsList) -> VariableList:
    found = [v for v in ctx.store.list_variables() if v.path.startswith(cmd.prefix)]
    found.sort(key=lambda v: (v.path, v.scope))
    return VariableList(variables=[variable_view(v, values=False) for v in found])


@commands.command(
    VarsRemove, http=Route("DELETE", "/variables/{path:path}", "Remove a variable or some of its keys")
)
def vars_rm(ctx: Context, cmd: VarsRemove) -> VariableRemoved:
    scope, variable = _existing(ctx.store, cmd.path, cmd.group, cmd.device_id)
    unknown = [k for k in cmd.keys if k not in variable.keys]
    if unknown:
        raise StoreError(f"variable {cmd.path} ({scope}) has no key {unknown[0]!r}")
    removed = set(cmd.keys) if cmd.keys else set(variable.keys)
    after = dict(ctx.variables.all())
    rest = {k: v for k, v in ctx.variables.items(variable).items() if k not in removed}
    replacement: Variable | None = None
    if rest:
        fields: dict[str, Any] = {"keys": tuple(sorted(rest)), "version": variable.version + 1}
        fields["updated"] = ctx.clock()
        replacement = variable.model_copy(update={**fields, **_holding(ctx.secrets, variable.secret, rest)})
        after[(scope, cmd.path)] = replacement
    else:
        after.pop((scope, cmd.path), None)
    # Nothing in use may lose its value: each stack's targets must still resolve.
    for stack in ctx.store.list_stacks():
        refs = [r for r in ctx.variables.stack_refs(stack.spec_hash) if split_ref(r)[0] == cmd.path]
        if not refs:
            continue
        missing = unresolved(after, refs, ctx.scheduler.targets(stack), stack.group)
        if missing:
            ref, devices = next(iter(missing.items()))
            raise StoreError(
                f"stack {stack.name!r} uses ${{var:{ref}}} on {', '.join(devices[:5])}: "
                "remove the reference first (or set the value in another scope)"
            )
    _save_variables(ctx, [replacement] if replacement else [], [] if replacement else [(scope, cmd.path)])
    return VariableRemoved(removed=sorted(removed), path=cmd.path, scope=scope)


def _save_variables(ctx: Context, put: list[Variable], delete: list[tuple[str, str]]) -> None:
    """Store the change and give every device whose values change a new generation."""
    with ctx.store.transaction():
        for variable in put:
            ctx.store.put_variable(variable)
        for scope, path in delete:
            ctx.store.delete_variable(scope, path)
        ctx.variables.forget()
        ctx.scheduler.recompute()
    ctx.publisher.publish_pending()
