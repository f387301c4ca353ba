"""Variables in stacks: ``${var:PATH/KEY}`` references, found and rendered (pure).

A stack's environment values and config file templates may reference variables set with
``tether vars set``. The controller finds the references of each stack
(:func:`stack_references`) and puts a :class:`~.models.VarBinding` per reference into the
desired state of each device that runs it; the device renders the stack
(:func:`render_stack`) just before it reconciles, so a secret is decrypted only there.

Rendering is all or nothing per stack: a reference without a value raises
:class:`RenderError` naming it, and the device keeps running what it runs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping

from . import names
from .errors import TetherError
from .models import ServiceSpec, StackSpec

REFERENCE_RE = re.compile(r"\$\{var:([^}]*)\}")
PATH_RE = names.VAR_PATH.regex
KEY_RE = names.VAR_KEY.regex
REF_RE = names.VAR_REF.regex


class RenderError(TetherError):
    """A stack cannot be rendered: a reference has no value on this device."""


def references(text: str) -> list[str]:
    """The ``PATH/KEY`` references in ``text``, in order (malformed ones included, to be refused)."""
    return REFERENCE_RE.findall(text)


def split_ref(ref: str) -> tuple[str, str]:
    """``"db/main/password"`` -> ``("db/main", "password")``."""
    path, _, key = ref.rpartition("/")
    return path, key


def stack_references(spec: StackSpec) -> set[str]:
    """Every reference of the stack: in environment values and in config templates."""
    found: set[str] = set()
    for service in spec.services:
        for value in service.environment.values():
            found.update(references(value))
    for template in spec.configs.values():
        found.update(references(template))
    return found


def render_text(text: str, values: Mapping[str, str], where: str) -> str:
    """``text`` with every reference replaced by its value; :class:`RenderError` if one has none."""

    def value(match: re.Match[str]) -> str:
        ref = match.group(1)
        if ref not in values:
            raise RenderError(f"{where}: variable {ref!r} has no value on this device")
        return values[ref]

    return REFERENCE_RE.sub(value, text)


def digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def render_stack(
    name: str, spec: StackSpec, values: Mapping[str, str], config_path: Callable[[str], str]
) -> tuple[StackSpec, dict[str, bytes]]:
    """The stack as the device runs it, and its config files' contents by config name.

    Environment values are rendered in place, so a changed value changes the service's
    hash and the service is replaced. A config mounted with ``change_mode: restart`` gets
    its content's digest into the mount, with the same effect; with ``signal`` or ``noop``
    it does not, and the agent acts on the changed file itself. ``config_path`` names the
    file a config is rendered to on the device (bind-mounted into the service).
    """
    files = {
        config: render_text(template, values, f"stack {name}: config {config}").encode()
        for config, template in spec.configs.items()
    }
    services: list[ServiceSpec] = []
    for service in spec.services:
        update: dict[str, object] = {}
        if any("${var:" in v for v in service.environment.values()):
            update["environment"] = {
                k: render_text(v, values, f"stack {name}: service {service.name}: environment {k}")
                for k, v in service.environment.items()
            }
        if service.configs:
            update["configs"] = tuple(
                mount.model_copy(
                    update={
                        "host_path": config_path(mount.source),
                        "digest": digest(files[mount.source]) if mount.change_mode == "restart" else None,
                    }
                )
                for mount in service.configs
            )
        services.append(service.model_copy(update=update) if update else service)
    if all(a is b for a, b in zip(services, spec.services, strict=True)):
        return spec, files  # nothing to render: the same object (its hashes stay computed)
    return spec.model_copy(update={"services": tuple(services)}), files


def check_refs(refs: Iterable[str], where: str) -> None:
    """Raise :class:`ValueError` naming the first malformed reference."""
    for ref in refs:
        if not REF_RE.match(ref):
            raise ValueError(
                f"{where}: ${{var:{ref}}} is not a valid reference: write ${{var:PATH/KEY}} "
                "(letters, digits, '_', '.', '-', and '/' between parts)"
            )
