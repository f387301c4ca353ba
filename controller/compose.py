"""Compose files to :class:`StackSpec`: what Tether supports, and a clear error for the rest.

Pure: text in, a validated spec (or one :class:`ComposeError` naming the service and key)
out. Supported service keys are listed in :data:`SERVICE_KEYS`; every other key is
rejected at deploy time, so nothing is silently ignored on a device. ``env_file`` is
rejected on purpose: the file lives on the operator's machine, not on the device; put the
variables under ``environment``. Relative bind-mount paths are rejected for the same reason.

Variables (``${var:PATH/KEY}``, set with ``tether vars``) may appear in environment values
and in config file templates (top-level ``configs`` with ``content``); they are rendered on
the device. Anywhere else, and for the operator's shell variables (``$VAR``), interpolation
is refused.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shlex
from typing import Any

from pydantic import ValidationError
from tether.protocol import names
from tether.protocol.codec import describe
from tether.protocol.compose_yaml import load_yaml, scalar_text
from tether.protocol.durations import parse_duration
from tether.protocol.errors import ComposeError, StoreError
from tether.protocol.models import (
    MAX_STACK_FILE_BYTES,
    ConfigMount,
    HealthcheckSpec,
    PortSpec,
    ServiceSpec,
    StackFile,
    StackSpec,
    VolumeSpec,
    stack_path_problem,
)
from tether.protocol.variables import check_refs, references

from .placement import Placement
from .selectors import parse_selector

TOP_LEVEL_KEYS = {"services", "volumes", "configs", "version", "name", "x-tether"}
SERVICE_KEYS = {
    "image",
    "command",
    "entrypoint",
    "environment",
    "ports",
    "volumes",
    "restart",
    "network_mode",
    "labels",
    "healthcheck",
    "depends_on",
    "stop_grace_period",
    "configs",
}
CONFIG_MOUNT_KEYS = {
    "source",
    "target",
    "mode",
    "uid",
    "gid",
    "x-tether-change-mode",
    "x-tether-change-signal",
}
_HINTS = {
    "env_file": "env_file is not supported (the file is on your machine, not the device); "
    "put the variables under environment",
    "build": "build is not supported: devices run prebuilt images",
    "networks": "custom networks are not supported: each stack gets one bridge network, "
    "or use network_mode: host",
}


def _argv(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            return tuple(shlex.split(value))
        except ValueError as exc:
            raise ComposeError(f"{where}: {exc}") from exc
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return tuple(str(v) for v in value)
    raise ComposeError(f"{where}: must be a string or a list of strings")


def _scalar(value: Any, where: str) -> str:
    if value is None:
        raise ComposeError(f"{where}: has no value (values from the operator's shell are not supported)")
    if isinstance(value, str | int | float):  # bool too: true/false, numbers as Compose prints them
        return scalar_text(value)
    raise ComposeError(f"{where}: must be a string or a number")


def _mapping(value: Any, where: str) -> dict[str, str]:
    """A Compose map given as a map or as a list of ``KEY=VALUE``."""
    if isinstance(value, dict):
        return {str(k): _scalar(v, f"{where} {k!r}") for k, v in value.items()}
    if isinstance(value, list):
        out = {}
        for item in value:
            if not isinstance(item, str):
                raise ComposeError(f"{where}: list items must be KEY=VALUE strings")
            key, sep, val = item.partition("=")
            if not sep:
                raise ComposeError(
                    f"{where} {key!r}: has no value (values from the operator's shell are not supported)"
                )
            out[key] = val
        return out
    raise ComposeError(f"{where}: must be a map or a list of KEY=VALUE")


def _port(value: Any, where: str) -> PortSpec:
    if isinstance(value, dict):
        unknown = set(value) - {"target", "published", "host_ip", "protocol", "mode", "name"}
        if unknown:
            raise ComposeError(f"{where}: unsupported key {sorted(unknown)[0]!r}")
        published = value.get("published")
        try:
            return PortSpec(
                container=int(value["target"]),
                host=int(published) if published not in (None, "") else None,
                host_ip=value.get("host_ip"),
                protocol=value.get("protocol", "tcp"),
            )
        except (KeyError, ValueError, TypeError, ValidationError) as exc:
            raise ComposeError(f"{where}: invalid port {value!r}") from exc
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise ComposeError(f"{where}: invalid port {value!r}")
    protocol = "tcp"
    if "/" in text:
        text, protocol = text.rsplit("/", 1)
    host_ip = None
    if text.startswith("["):  # [::1]:8080:80
        end = text.find("]")
        host_ip, text = text[1:end], text[end + 2 :]
    parts = text.split(":")
    if "-" in text:
        raise ComposeError(f"{where}: port ranges are not supported ({value!r})")
    try:
        if len(parts) == 1:
            container, host = int(parts[0]), None
        elif len(parts) == 2:
            container, host = int(parts[1]), int(parts[0]) if parts[0] else None
        elif len(parts) == 3 and host_ip is None:
            host_ip = parts[0] or None
            container, host = int(parts[2]), int(parts[1]) if parts[1] else None
        else:
            raise ValueError
        return PortSpec(container=container, host=host, host_ip=host_ip, protocol=protocol)  # type: ignore[arg-type]
    except (ValueError, ValidationError) as exc:
        raise ComposeError(f"{where}: invalid port {value!r}") from exc


def _stack_volume(
    source: str, target: str, read_only: bool, where: str, shipped: dict[str, StackFile]
) -> VolumeSpec:
    """A relative bind mount: a path in the stack's own directory on the device, with the
    digest of what is shipped there (so a service is replaced when its files change)."""
    path = posixpath.normpath(source)
    problem = stack_path_problem(path)
    if problem is not None:
        raise ComposeError(f"{where}: bind mount source {source!r} {problem}")
    under = [f for p, f in sorted(shipped.items()) if path == "." or p == path or p.startswith(path + "/")]
    digest = None
    if under:
        h = hashlib.sha256()
        for f in under:
            h.update(f"{f.path}\0{f.mode:o}\0{f.data}\0".encode())
        digest = h.hexdigest()
    return VolumeSpec(type="stack", source=path, target=target, read_only=read_only, digest=digest)


def _shipped(files: tuple[StackFile, ...]) -> dict[str, StackFile]:
    """The files sent with a deploy, checked: unique, bounded, not a file inside a file."""
    by_path: dict[str, StackFile] = {}
    total = 0
    for f in files:
        if f.path in by_path:
            raise ComposeError(f"shipped file {f.path!r} is sent twice")
        try:
            total += len(f.content())
        except ValueError:
            raise ComposeError(f"shipped file {f.path!r}: data is not base64") from None
        by_path[f.path] = f
    if total > MAX_STACK_FILE_BYTES:
        raise ComposeError(
            f"the files shipped with the stack are larger than {MAX_STACK_FILE_BYTES // 1024} KiB"
        )
    for path in by_path:
        parent = path.rpartition("/")[0]
        while parent:
            if parent in by_path:
                raise ComposeError(f"shipped file {path!r} is inside the shipped file {parent!r}")
            parent = parent.rpartition("/")[0]
    return by_path


def _volume(
    value: Any, where: str, declared: set[str], shipped: dict[str, StackFile] | None = None
) -> VolumeSpec:
    if isinstance(value, dict):
        unknown = set(value) - {"type", "source", "target", "read_only"}
        if unknown:
            raise ComposeError(f"{where}: unsupported key {sorted(unknown)[0]!r}")
        vtype, source, target = value.get("type"), value.get("source"), value.get("target")
        read_only = bool(value.get("read_only", False))
        if vtype not in ("bind", "volume"):
            raise ComposeError(f"{where}: type must be bind or volume")
    elif isinstance(value, str):
        parts = value.split(":")
        if len(parts) == 1:
            raise ComposeError(f"{where}: anonymous volume {value!r} is not supported; give it a name")
        if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
            raise ComposeError(f"{where}: invalid volume {value!r}")
        source, target = parts[0], parts[1]
        read_only = len(parts) == 3 and parts[2] == "ro"
        vtype = "bind" if source.startswith(("/", ".", "~")) else "volume"
    else:
        raise ComposeError(f"{where}: invalid volume {value!r}")
    if not isinstance(source, str) or not source or not isinstance(target, str) or not target.startswith("/"):
        raise ComposeError(f"{where}: a volume needs a source and an absolute target path")
    if vtype == "bind" and (source == "." or source.startswith("./")):
        return _stack_volume(source, target, read_only, where, shipped or {})
    if vtype == "bind" and not source.startswith("/"):
        raise ComposeError(
            f"{where}: bind mount source {source!r} is outside the stack's directory: deploy with the "
            "tether CLI (it maps ../ and ~/ paths into the stack's directory), or give an absolute path"
        )
    if vtype == "volume" and source not in declared:
        raise ComposeError(f"{where}: named volume {source!r} is not declared under top-level volumes")
    return VolumeSpec(type=vtype, source=source, target=target, read_only=read_only)


def _healthcheck(value: Any, where: str) -> HealthcheckSpec | None:
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: must be a map")
    unknown = set(value) - {"test", "interval", "timeout", "retries", "start_period", "disable"}
    if unknown:
        raise ComposeError(f"{where}: unsupported key {sorted(unknown)[0]!r}")
    if value.get("disable"):
        return None
    test = value.get("test")
    if isinstance(test, str):
        argv: tuple[str, ...] = ("CMD-SHELL", test)
    elif isinstance(test, list) and test and all(isinstance(t, str) for t in test):
        if test[0] not in ("CMD", "CMD-SHELL", "NONE"):
            raise ComposeError(f"{where}: test must start with CMD, CMD-SHELL or NONE")
        if test[0] == "NONE":
            return None
        argv = tuple(test)
    else:
        raise ComposeError(f"{where}: test must be a string or a list of strings")
    retries = value.get("retries", 3)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ComposeError(f"{where}: retries must be a non-negative integer")
    return HealthcheckSpec(
        test=argv,
        interval_s=parse_duration(value.get("interval", "30s"), f"{where}.interval"),
        timeout_s=parse_duration(value.get("timeout", "30s"), f"{where}.timeout"),
        retries=retries,
        start_period_s=parse_duration(value.get("start_period", "0s"), f"{where}.start_period"),
    )


def _depends_on(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if isinstance(value, dict):
        for name, opts in value.items():
            condition = (opts or {}).get("condition", "service_started") if isinstance(opts, dict) else None
            if condition != "service_started":
                raise ComposeError(
                    f"{where} {name!r}: only condition service_started is supported, not {condition!r}"
                )
        return tuple(str(k) for k in value)
    raise ComposeError(f"{where}: must be a list of service names")


def _restart(value: Any, where: str) -> str:
    if value is False or value == "no":  # YAML 1.1 reads a bare `no` as false
        return "no"
    if value in ("always", "on-failure", "unless-stopped"):
        return str(value)
    raise ComposeError(f"{where}: must be no, always, on-failure or unless-stopped, not {value!r}")


_VARIABLE_RE = re.compile(r"\$(?:\{|[A-Za-z_])")
_TETHER_VARIABLE_RE = re.compile(r"\$\{var:[^}]*\}")


def _unescape(value: Any, where: str, variables: bool = False) -> Any:
    """Compose's ``$$`` is a literal ``$``. Interpolation of the operator's shell variables
    (``$VAR``, ``${VAR}``) is refused: the device would get values from the wrong machine.
    With ``variables``, Tether's ``${var:PATH/KEY}`` references are kept (and checked)."""
    if isinstance(value, str):
        parts = value.split("$$")
        for index, part in enumerate(parts):
            if variables and index > 0 and part.startswith("{var:"):
                raise ComposeError(
                    f"{where}: $${{var:...}} would be rendered as a reference on the device; "
                    "a literal ${var: cannot be written here"
                )
            if variables:
                try:
                    check_refs(references(part), where)
                except ValueError as exc:
                    raise ComposeError(str(exc)) from exc
                part = _TETHER_VARIABLE_RE.sub("", part)
            if _VARIABLE_RE.search(part):
                hint = "" if variables else " here (${var:PATH/KEY} only in environment values and configs)"
                raise ComposeError(
                    f"{where}: variable interpolation ({part[part.index('$') :][:20]!r}) is not supported{hint}; "
                    "write $$ for a literal $"
                )
        return "$".join(parts)
    if isinstance(value, list):
        return [_unescape(v, where, variables) for v in value]
    if isinstance(value, dict):
        return {k: _unescape(v, f"{where}.{k}", variables) for k, v in value.items()}
    return value


def _configs(value: Any) -> dict[str, str]:
    """Top-level ``configs``: name to template (``content``, rendered on the device)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ComposeError("top-level configs must be a map")
    out = {}
    for name, body in value.items():
        where = f"config {name!r}"
        if not isinstance(name, str) or not names.CONFIG_NAME.ok(name):
            raise ComposeError(f"{where}: invalid name (letters, digits, '.', '_', '-')")
        if not isinstance(body, dict):
            raise ComposeError(f"{where}: must be a map with content")
        unknown = set(body) - {"content", "name"}
        if unknown:
            key = sorted(unknown)[0]
            hint = {
                "file": "file is not supported (the file is on your machine, not the device); "
                "put the text under content",
                "external": "external configs are not supported; put the text under content",
                "environment": "environment is not supported; put the text under content",
            }.get(key, f"unsupported key {key!r}")
            raise ComposeError(f"{where}: {hint}")
        content = body.get("content")
        if not isinstance(content, str):
            raise ComposeError(f"{where}: content must be a string (the file's text)")
        out[name] = _unescape(content, f"{where}: content", variables=True)
    return out


def _file_mode(value: Any, where: str) -> int:
    """A file mode: an octal string (``"0440"``) or a number (YAML reads ``0440`` as octal)."""
    try:
        mode = int(value, 8) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ComposeError(f"{where}: mode must be an octal file mode such as 0440, not {value!r}") from None
    if isinstance(value, bool) or not 0 <= mode <= 0o777:
        raise ComposeError(f"{where}: mode must be an octal file mode such as 0440, not {value!r}")
    return mode


def _config_mount(value: Any, where: str, configs: dict[str, str]) -> ConfigMount:
    """A service's ``configs`` entry: a name (mounted at ``/NAME``) or the long form."""
    body = {"source": value} if isinstance(value, str) else value
    if not isinstance(body, dict):
        raise ComposeError(f"{where}: each entry must be a config name or a map with source")
    unknown = set(body) - CONFIG_MOUNT_KEYS
    if unknown:
        raise ComposeError(f"{where}: unsupported key {sorted(unknown)[0]!r}")
    source = body.get("source")
    if source not in configs:
        raise ComposeError(f"{where}: config {source!r} is not declared under the top-level configs")
    for key in ("uid", "gid"):
        if key in body:
            raise ComposeError(f"{where}: {key} is not supported (the file belongs to the agent's user)")
    target = body.get("target", f"/{source}")
    if not isinstance(target, str) or not target or "\x00" in target:
        raise ComposeError(f"{where}: target must be a path")
    fields: dict[str, Any] = {"source": source, "target": target}
    if "mode" in body:
        fields["mode"] = _file_mode(body["mode"], f"{where}: {source}")
    if "x-tether-change-mode" in body:
        change = body["x-tether-change-mode"]
        if change not in ("restart", "signal", "noop"):
            raise ComposeError(
                f"{where}: {source}: x-tether-change-mode must be restart, signal or noop, not {change!r}"
            )
        fields["change_mode"] = change
    if "x-tether-change-signal" in body:
        signame = body["x-tether-change-signal"]
        if not isinstance(signame, str) or not names.SIGNAL.ok(signame.upper()):
            raise ComposeError(
                f"{where}: {source}: x-tether-change-signal must be a signal name such as SIGHUP"
            )
        fields["change_signal"] = signame.upper()
    elif fields.get("change_mode") == "signal":
        fields["change_signal"] = "SIGHUP"
    try:
        return ConfigMount.model_validate(fields)
    except ValidationError as exc:
        raise ComposeError(f"{where}: {source}: {describe(exc)}") from exc


def _service(
    name: str,
    body: Any,
    declared: set[str],
    configs: dict[str, str],
    shipped: dict[str, StackFile] | None = None,
) -> ServiceSpec:
    where = f"service {name!r}"
    if isinstance(body, dict):
        body = {k: _unescape(v, f"{where}: {k}", variables=k == "environment") for k, v in body.items()}
    if not isinstance(name, str) or not names.NAME.ok(name):
        raise ComposeError(f"{where}: invalid service name (lower-case letters, digits, '.', '_', '-')")
    if not isinstance(body, dict):
        raise ComposeError(f"{where}: must be a map")
    for key in body:
        if key not in SERVICE_KEYS:
            hint = _HINTS.get(key, f"unsupported key {key!r}")
            raise ComposeError(f"{where}: {hint}" if key in _HINTS else f"{where}: unsupported key {key!r}")
    fields: dict[str, Any] = {"name": name}
    if "image" in body:
        if not isinstance(body["image"], str) or not body["image"].strip():
            raise ComposeError(f"{where}: image must be a non-empty string")
        fields["image"] = body["image"].strip()
    for key in ("command", "entrypoint"):
        if key in body and body[key] is not None:
            fields[key] = _argv(body[key], f"{where}: {key}")
    if not fields.get("image") and not fields.get("command") and not fields.get("entrypoint"):
        raise ComposeError(f"{where}: needs an image (docker driver) or a command (process driver)")
    if "environment" in body and body["environment"] is not None:
        fields["environment"] = _mapping(body["environment"], f"{where}: environment")
    if "labels" in body and body["labels"] is not None:
        labels = _mapping(body["labels"], f"{where}: labels")
        bad = [k for k in labels if k.startswith("io.tether.")]
        if bad:
            raise ComposeError(f"{where}: label {bad[0]!r} is reserved for Tether")
        fields["labels"] = labels
    if "ports" in body and body["ports"] is not None:
        if not isinstance(body["ports"], list):
            raise ComposeError(f"{where}: ports must be a list")
        fields["ports"] = tuple(_port(p, f"{where}: ports") for p in body["ports"])
    if "volumes" in body and body["volumes"] is not None:
        if not isinstance(body["volumes"], list):
            raise ComposeError(f"{where}: volumes must be a list")
        fields["volumes"] = tuple(_volume(v, f"{where}: volumes", declared, shipped) for v in body["volumes"])
    if "restart" in body:
        fields["restart"] = _restart(body["restart"], f"{where}: restart")
    if "network_mode" in body:
        if body["network_mode"] not in ("host", "bridge"):
            raise ComposeError(f"{where}: network_mode must be host or bridge, not {body['network_mode']!r}")
        fields["network_mode"] = body["network_mode"]
        if body["network_mode"] == "host" and body.get("ports"):
            raise ComposeError(f"{where}: ports cannot be published with network_mode: host")
    if "healthcheck" in body and body["healthcheck"] is not None:
        fields["healthcheck"] = _healthcheck(body["healthcheck"], f"{where}: healthcheck")
    if "depends_on" in body and body["depends_on"] is not None:
        fields["depends_on"] = _depends_on(body["depends_on"], f"{where}: depends_on")
    if "stop_grace_period" in body:
        fields["stop_grace_period_s"] = parse_duration(
            body["stop_grace_period"], f"{where}: stop_grace_period"
        )
    if "configs" in body and body["configs"] is not None:
        if not isinstance(body["configs"], list):
            raise ComposeError(f"{where}: configs must be a list")
        mounts = tuple(_config_mount(c, f"{where}: configs", configs) for c in body["configs"])
        targets = [m.target for m in mounts]
        if len(set(targets)) != len(targets):
            raise ComposeError(f"{where}: configs: two configs have the same target")
        fields["configs"] = mounts
    try:
        return ServiceSpec.model_validate(fields)
    except ValidationError as exc:
        raise ComposeError(f"{where}: {describe(exc)}") from exc


def _start_order(services: list[ServiceSpec]) -> list[ServiceSpec]:
    """Dependencies first, otherwise file order; raise on unknown names and cycles."""
    by_name = {s.name: s for s in services}
    for s in services:
        for dep in s.depends_on:
            if dep not in by_name:
                raise ComposeError(f"service {s.name!r}: depends_on names unknown service {dep!r}")
            if dep == s.name:
                raise ComposeError(f"service {s.name!r}: depends on itself")
    ordered: list[ServiceSpec] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(s: ServiceSpec, path: list[str]) -> None:
        if state.get(s.name) == 2:
            return
        if state.get(s.name) == 1:
            cycle = " -> ".join([*path[path.index(s.name) :], s.name])
            raise ComposeError(f"depends_on cycle: {cycle}")
        state[s.name] = 1
        for dep in s.depends_on:
            visit(by_name[dep], [*path, s.name])
        state[s.name] = 2
        ordered.append(s)

    for s in services:
        visit(s, [])
    return ordered


def _placement(value: Any) -> Placement:
    """The ``x-tether`` extension: placement and disconnect policy (controller-side only)."""
    if value is None:
        return Placement()
    if not isinstance(value, dict):
        raise ComposeError("x-tether must be a map")
    unknown = set(value) - {"placement", "replicas", "disconnect"}
    if unknown:
        raise ComposeError(f"x-tether: unsupported key {sorted(unknown)[0]!r}")
    replicas = value.get("replicas")
    placement = value.get("placement")
    constraints: list[str] = []
    if isinstance(placement, dict):
        unknown = set(placement) - {"mode", "constraints"}
        if unknown:
            raise ComposeError(f"x-tether.placement: unsupported key {sorted(unknown)[0]!r}")
        raw = placement.get("constraints") or []
        if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
            raise ComposeError("x-tether.placement.constraints must be a list of strings")
        for c in raw:
            try:
                parse_selector(c)
            except StoreError as exc:
                raise ComposeError(f"x-tether.placement.constraints: {exc}") from exc
        constraints = list(raw)
        placement = placement.get("mode")
    mode = placement or ("replicas" if replicas is not None else "global")
    if mode not in ("global", "replicas"):
        raise ComposeError(f"x-tether.placement must be global or replicas, not {mode!r}")
    fields: dict[str, Any] = {"mode": mode, "constraints": tuple(constraints)}
    if mode == "replicas":
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise ComposeError("x-tether.replicas must be a positive integer")
        fields["replicas"] = replicas
    elif replicas is not None:
        raise ComposeError("x-tether.replicas cannot be combined with placement: global")
    disconnect = value.get("disconnect")
    if disconnect is not None:
        if not isinstance(disconnect, dict):
            raise ComposeError("x-tether.disconnect must be a map")
        unknown = set(disconnect) - {"lost_after", "replace", "reconcile"}
        if unknown:
            raise ComposeError(f"x-tether.disconnect: unsupported key {sorted(unknown)[0]!r}")
        if "lost_after" in disconnect:
            fields["lost_after_s"] = parse_duration(
                disconnect["lost_after"], "x-tether.disconnect.lost_after"
            )
        if "replace" in disconnect:
            if not isinstance(disconnect["replace"], bool):
                raise ComposeError("x-tether.disconnect.replace must be true or false")
            fields["replace"] = disconnect["replace"]
        if "reconcile" in disconnect:
            if disconnect["reconcile"] not in ("keep_original", "keep_replacement", "best_score"):
                raise ComposeError(
                    "x-tether.disconnect.reconcile must be keep_original, keep_replacement or best_score"
                )
            fields["reconcile"] = disconnect["reconcile"]
        if fields.get("replace") and fields.get("lost_after_s") is None:
            raise ComposeError("x-tether.disconnect.replace needs lost_after")
    return Placement.model_validate(fields)


def parse_compose(text: str, files: tuple[StackFile, ...] = ()) -> StackSpec:
    """Parse and validate a Compose file; raise :class:`ComposeError` on the first problem."""
    return parse_stack(text, files)[0]


def parse_stack(text: str, files: tuple[StackFile, ...] = ()) -> tuple[StackSpec, Placement]:
    """Parse a Compose file into the spec devices run and the controller's placement policy.

    ``files`` are shipped with the stack for its relative bind mounts (``./conf``)."""
    shipped = _shipped(files)
    doc = load_yaml(text)  # YAML as Compose reads it, bounded in size, nesting and aliases
    if not isinstance(doc, dict):
        raise ComposeError("compose file must be a map with a 'services' key")
    for key in doc:
        if key not in TOP_LEVEL_KEYS:
            hint = _HINTS.get(key)
            raise ComposeError(f"top-level {hint}" if hint else f"unsupported top-level key {key!r}")
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        raise ComposeError("compose file has no services")
    volumes = doc.get("volumes") or {}
    if not isinstance(volumes, dict):
        raise ComposeError("top-level volumes must be a map")
    for vname, vbody in volumes.items():
        if vbody not in (None, {}):
            raise ComposeError(f"volume {vname!r}: driver options are not supported")
        if not isinstance(vname, str) or not names.NAME.ok(vname):
            raise ComposeError(f"volume {vname!r}: invalid name")
    declared = set(volumes)
    configs = _configs(doc.get("configs"))
    parsed = [_service(name, body, declared, configs, shipped) for name, body in services.items()]
    placement = _placement(doc.get("x-tether"))
    used = {v.source for s in parsed for v in s.volumes if v.type == "stack"}
    for path in shipped:
        if not any(u == "." or path == u or path.startswith(u + "/") for u in used):
            raise ComposeError(f"shipped file {path!r} is not under any relative bind mount of the stack")
    spec = StackSpec(
        services=tuple(_start_order(parsed)),
        volumes=tuple(sorted(declared)),
        configs=configs,
        files=tuple(shipped[p] for p in sorted(shipped)),
    )
    return spec, placement
