"""Compose files to :class:`StackSpec`: every key that makes sense on one device, all problems at once.

Pure: a loaded document in, a validated spec (or one :class:`ComposeError` listing every
problem, each naming the service and key with a hint) out. Two passes:

1. Structure: :mod:`.compose_schema` (a JSON Schema of the Compose Specification, checked
   with ``jsonschema``): unknown keys and wrong types, worded as ``docker compose`` words them.
2. Meaning: each key of each service is normalised into :class:`ServiceSpec` fields; what a
   device cannot do (``build`` without ``image``, swarm-only or Windows-only keys) is an
   error with a hint. docs/compose.md lists every key and how it is honoured.

Keys that need the operator's machine (``$VAR`` interpolation, ``env_file``, ``include``,
``extends``, relative paths, ``file:`` configs) are resolved before this module by the CLI;
here they are refused with a hint. Variables (``${var:PATH/KEY}``, set with ``tether vars``)
may appear in environment values and in config and secret templates; they are rendered on
the device.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shlex
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from pydantic import ValidationError
from tether.protocol import names
from tether.protocol.codec import describe
from tether.protocol.compose_yaml import load_yaml, scalar_text
from tether.protocol.durations import parse_duration
from tether.protocol.errors import CommandError, ComposeError
from tether.protocol.models import (
    MAX_STACK_FILE_BYTES,
    ConfigMount,
    Dependency,
    DeviceMapping,
    GpuRequest,
    HealthcheckSpec,
    IpamPool,
    LoggingSpec,
    NetworkAttachment,
    NetworkSpec,
    PortSpec,
    ServiceSpec,
    StackFile,
    StackSpec,
    Ulimit,
    VolumeOptions,
    VolumeSpec,
    stack_path_problem,
)
from tether.protocol.variables import check_refs, references

from .compose_schema import SERVICE_PROPERTIES, structural_problems
from .placement import Placement
from .selectors import parse_selector

CONFIG_MOUNT_KEYS = {
    "source",
    "target",
    "mode",
    "uid",
    "gid",
    "x-tether-change-mode",
    "x-tether-change-signal",
}
SECRET_PREFIX = "secret."
"""Secrets travel as configs named ``secret.NAME`` (rendered on the device like configs)."""
MAX_PROBLEMS = 50
"""At most this many problems are listed (a file that wrong needs a look, not a longer list)."""

_P = ParamSpec("_P")
_R = TypeVar("_R")

_DEVICE_HINTS = {
    "build": "devices run prebuilt images: build and push the image, then name it under image",
    "env_file": "env_file is read by the tether CLI; deploy the file with the CLI, or put the variables under environment",
    "extends": "extends is merged by the tether CLI; deploy the file with the CLI",
    "label_file": "put the labels under labels",
    "profiles": "profiles are not supported: deploy the services you want in a stack of their own",
    "volumes_from": "share a named volume instead",
    "external_links": "external links are not supported: join an external network instead",
    "blkio_config": "block IO limits are not supported",
    "cpu_count": "Windows only: use cpus",
    "cpu_percent": "Windows only: use cpus",
    "cpu_rt_period": "real-time CPU scheduling is not supported",
    "cpu_rt_runtime": "real-time CPU scheduling is not supported",
    "credential_spec": "Windows only",
    "isolation": "Windows only",
    "storage_opt": "storage options are not supported",
    "annotations": "annotations are not supported (they need Docker Engine 24); use labels",
    "post_start": "lifecycle hooks are not supported",
    "pre_stop": "lifecycle hooks are not supported: use stop_signal and stop_grace_period",
    "provider": "provider services are not supported",
    "models": "models are not supported",
    "use_api_socket": "use_api_socket is not supported: mount /var/run/docker.sock if the service needs the engine",
    "uts": "uts is not supported",
    "cgroup_parent": "cgroup_parent is not supported",
    "pull_refresh_after": "pull_refresh_after is not supported",
}
_IGNORED_SERVICE_KEYS = {"attach", "develop"}
"""Keys about the operator's ``docker compose`` session (logs attached, file watching)."""
_IGNORED_DEPLOY_KEYS = {"mode", "endpoint_mode", "labels", "placement", "update_config", "rollback_config"}
"""Swarm-only ``deploy`` keys: ``docker compose`` ignores them too."""


class _Problems:
    """Every problem found in a file, each ``WHERE: what (hint)``."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self.warnings: list[str] = []
        self.bad: set[tuple[str | int, ...]] = set()
        """Paths with a structural problem: not also checked for meaning."""

    def add(self, message: str) -> None:
        if message not in self.items:
            self.items.append(message)

    def run(self, where: str, fn: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> _R | None:
        """``fn(*args, **kwargs)``, or None with its ComposeError recorded."""
        try:
            return fn(*args, **kwargs)
        except ComposeError as exc:
            text = str(exc)
            self.add(text if text.startswith(where) else f"{where}: {text}")
            return None

    def raise_if_any(self) -> None:
        if not self.items:
            return
        items = self.items[:MAX_PROBLEMS]
        more = len(self.items) - len(items)
        if len(items) == 1:
            raise ComposeError(items[0], problems=items)
        lines = [f"{len(self.items)} problems in the compose file:"] + [f"  - {i}" for i in items]
        if more:
            lines.append(f"  ... and {more} more")
        raise ComposeError("\n".join(lines), problems=self.items)


def _where(path: tuple[str | int, ...]) -> str:
    """``("services", "web", "ports", 0)`` -> ``service 'web': ports.0``."""
    if len(path) >= 2 and path[0] == "services":
        rest = ".".join(str(p) for p in path[2:])
        return f"service {path[1]!r}" + (f": {rest}" if rest else "")
    if len(path) >= 2 and path[0] in ("volumes", "networks", "configs", "secrets"):
        kind = {"volumes": "volume", "networks": "network", "configs": "config", "secrets": "secret"}[
            str(path[0])
        ]
        rest = ".".join(str(p) for p in path[2:])
        return f"{kind} {path[1]!r}" + (f": {rest}" if rest else "")
    return ".".join(str(p) for p in path) or "compose file"


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


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ComposeError(f"{where}: must be true or false, not {value!r}")


def _int(value: Any, where: str, low: int | None = None, high: int | None = None) -> int:
    try:
        if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
            raise ValueError
        number = int(value)
    except (TypeError, ValueError):
        raise ComposeError(f"{where}: must be an integer, not {value!r}") from None
    if (low is not None and number < low) or (high is not None and number > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ComposeError(f"{where}: must be {span}, not {number}")
    return number


def _float(value: Any, where: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
    except (TypeError, ValueError):
        raise ComposeError(f"{where}: must be a number, not {value!r}") from None
    if number < 0 or number != number:
        raise ComposeError(f"{where}: must not be negative")
    return number


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def _bytes(value: Any, where: str, allow_unlimited: bool = False) -> int:
    """A size as Compose writes it: a number of bytes, or ``512m``, ``1g``, ``64kb``, ``2GiB``."""
    if allow_unlimited and value in (-1, "-1"):
        return -1
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, float) and value >= 0 and not isinstance(value, bool):
        return int(value)
    match = _SIZE_RE.match(value) if isinstance(value, str) else None
    if match is None:
        raise ComposeError(f"{where}: invalid size {value!r} (use e.g. 512m, 1g or a number of bytes)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def _strings(value: Any, where: str) -> tuple[str, ...]:
    """A string or a list of strings (or numbers)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
        return tuple(str(v) for v in value)
    raise ComposeError(f"{where}: must be a string or a list of strings")


def _signal(value: Any, where: str) -> str:
    if not isinstance(value, str) or not re.match(r"^(SIG)?[A-Z0-9+-]+\Z", value.upper()):
        raise ComposeError(f"{where}: must be a signal name such as SIGTERM, not {value!r}")
    name = value.upper()
    return name if name.startswith("SIG") else f"SIG{name}"


def _port_numbers(text: str, where: str, value: Any) -> list[int | None]:
    """``80`` -> [80]; ``8000-8002`` -> [8000, 8001, 8002]; ``""`` -> [None]."""
    if not text:
        return [None]
    low, sep, high = text.partition("-")
    try:
        first, last = int(low), int(high) if sep else int(low)
    except ValueError:
        raise ComposeError(f"{where}: invalid port {value!r}") from None
    if not (1 <= first <= last <= 65535) or last - first >= 1024:
        raise ComposeError(f"{where}: invalid port {value!r}")
    return list(range(first, last + 1))


def _ports(value: Any, where: str) -> list[PortSpec]:
    """One entry of ``ports``: several PortSpecs for a range."""
    if isinstance(value, dict):
        published = value.get("published")
        if "target" not in value:
            raise ComposeError(f"{where}: invalid port {value!r} (target is missing)")
        protocol = str(value.get("protocol", "tcp")).lower()
        if protocol not in ("tcp", "udp"):
            raise ComposeError(f"{where}: protocol must be tcp or udp, not {protocol!r}")
        containers = _port_numbers(str(value["target"]), where, value)
        hosts = _port_numbers("" if published in (None, "") else str(published), where, value)
        host_ip = value.get("host_ip")
    else:
        if isinstance(value, int) and not isinstance(value, bool):
            text = str(value)
        elif isinstance(value, str):
            text = value
        else:
            raise ComposeError(f"{where}: invalid port {value!r}")
        protocol = "tcp"
        if "/" in text:
            text, protocol = text.rsplit("/", 1)
            if protocol not in ("tcp", "udp"):
                raise ComposeError(f"{where}: protocol must be tcp or udp, not {protocol!r} ({value!r})")
        host_ip = None
        if text.startswith("["):  # [::1]:8080:80
            end = text.find("]")
            if end < 0:
                raise ComposeError(f"{where}: invalid port {value!r}")
            host_ip, text = text[1:end], text[end + 2 :]
        parts = text.split(":")
        if len(parts) == 1:
            containers, hosts = _port_numbers(parts[0], where, value), [None]
        elif len(parts) == 2:
            containers, hosts = _port_numbers(parts[1], where, value), _port_numbers(parts[0], where, value)
        elif len(parts) == 3 and host_ip is None:
            host_ip = parts[0] or None
            containers, hosts = _port_numbers(parts[2], where, value), _port_numbers(parts[1], where, value)
        else:
            raise ComposeError(f"{where}: invalid port {value!r}")
        if None in containers:
            raise ComposeError(f"{where}: invalid port {value!r}")
    if hosts != [None] and len(hosts) != len(containers):
        raise ComposeError(f"{where}: {value!r}: a host port range must be as long as the container range")
    try:
        return [
            PortSpec(
                container=c,  # type: ignore[arg-type]
                host=hosts[i] if hosts != [None] else None,
                host_ip=host_ip,
                protocol=protocol,  # type: ignore[arg-type]
            )
            for i, c in enumerate(containers)
        ]
    except ValidationError as exc:
        raise ComposeError(f"{where}: invalid port {value!r}") from exc


def _expose(value: Any, where: str) -> list[str]:
    text = str(value)
    port, _, protocol = text.partition("/")
    protocol = protocol or "tcp"
    if protocol not in ("tcp", "udp"):
        raise ComposeError(f"{where}: protocol must be tcp or udp ({value!r})")
    return [f"{p}/{protocol}" for p in _port_numbers(port, where, value)]


_ANONYMOUS = ""


def _volume_options(parts: list[str], where: str, value: Any) -> dict[str, Any]:
    """The options of a short-syntax volume (``ro``, ``rw``, ``z``, ``Z``, propagation, ``nocopy``)."""
    fields: dict[str, Any] = {}
    for option in parts:
        if option in ("ro", "rw"):
            fields["read_only"] = option == "ro"
        elif option in ("z", "Z"):
            fields["selinux"] = option
        elif option in ("rprivate", "private", "rshared", "shared", "rslave", "slave"):
            fields["propagation"] = option
        elif option == "nocopy":
            fields["nocopy"] = True
        elif option in ("cached", "delegated", "consistent"):
            pass  # macOS only: no meaning on Linux, as in Compose
        else:
            raise ComposeError(f"{where}: unknown volume option {option!r} in {value!r}")
    return fields


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
    fields: dict[str, Any]
    if isinstance(value, dict):
        vtype = value.get("type")
        source, target = value.get("source"), value.get("target")
        fields = {"type": vtype, "read_only": _bool(value.get("read_only", False), f"{where}.read_only")}
        if vtype in ("npipe", "cluster", "image"):
            raise ComposeError(f"{where}: volume type {vtype!r} is not supported (bind, volume or tmpfs)")
        bind, vol, tmpfs = value.get("bind") or {}, value.get("volume") or {}, value.get("tmpfs") or {}
        if bind and vtype != "bind" or vol and vtype != "volume" or tmpfs and vtype != "tmpfs":
            raise ComposeError(f"{where}: options of another type than {vtype!r}")
        if "propagation" in bind:
            fields.update(_volume_options([str(bind["propagation"])], where, value))
        if "selinux" in bind:
            fields.update(_volume_options([str(bind["selinux"])], where, value))
        if "create_host_path" in bind:
            fields["strict"] = not _bool(bind["create_host_path"], f"{where}.bind.create_host_path")
        if "recursive" in bind and bind["recursive"] not in ("enabled", "readonly"):
            raise ComposeError(f"{where}: bind.recursive {bind['recursive']!r} is not supported")
        if "nocopy" in vol:
            fields["nocopy"] = _bool(vol["nocopy"], f"{where}.volume.nocopy")
        if "subpath" in vol:
            fields["subpath"] = str(vol["subpath"])
        if "size" in tmpfs:
            fields["tmpfs_size"] = _bytes(tmpfs["size"], f"{where}.tmpfs.size")
        if "mode" in tmpfs:  # octal digits, whether YAML read them as a number or a string
            fields["tmpfs_mode"] = _file_mode(str(tmpfs["mode"]), f"{where}.tmpfs.mode", 0o7777)
        if vtype == "tmpfs" or (vtype == "volume" and not source):
            source = _ANONYMOUS
    elif isinstance(value, str):
        parts = value.split(":")
        if len(parts) > 1 and "" in parts:  # ':/data' is most often an unset ${VAR}: Compose refuses it
            raise ComposeError(
                f"{where}: invalid volume {value!r}: empty section between colons "
                "(is a variable in it unset?)"
            )
        options: list[str] = []
        if len(parts) == 1:
            source, target = _ANONYMOUS, parts[0]
        elif len(parts) == 2 and parts[1].startswith("/"):
            source, target = parts[0], parts[1]
        elif len(parts) == 2:  # /target:ro (an anonymous volume with options)
            source, target, options = _ANONYMOUS, parts[0], parts[1].split(",")
        elif len(parts) == 3:
            source, target, options = parts[0], parts[1], parts[2].split(",")
        else:
            raise ComposeError(f"{where}: invalid volume {value!r}")
        vtype = "bind" if source.startswith(("/", ".", "~")) else "volume"
        fields = {"type": vtype, **_volume_options(options, where, value)}
    else:
        raise ComposeError(f"{where}: invalid volume {value!r}")
    if not isinstance(source, str) or not isinstance(target, str) or not target.startswith("/"):
        raise ComposeError(f"{where}: a volume needs an absolute target path ({value!r})")
    if vtype == "bind" and (source == "." or source.startswith("./")):
        if any(fields.get(k) for k in ("propagation", "selinux", "strict", "nocopy")):
            raise ComposeError(f"{where}: a relative bind mount takes no options but ro/rw ({value!r})")
        return _stack_volume(source, target, bool(fields.get("read_only")), where, shipped or {})
    if vtype == "bind" and not source.startswith("/"):
        raise ComposeError(
            f"{where}: bind mount source {source!r} is outside the stack's directory: deploy with the "
            "tether CLI (it maps ../ and ~/ paths into the stack's directory), or give an absolute path"
        )
    if vtype == "volume" and source and source not in declared:
        raise ComposeError(f"{where}: named volume {source!r} is not declared under top-level volumes")
    if vtype != "bind" and any(fields.get(k) for k in ("propagation", "selinux", "strict")):
        raise ComposeError(f"{where}: bind options on a {vtype} mount ({value!r})")
    fields.update(source=source, target=target)
    try:
        return VolumeSpec.model_validate(fields)
    except ValidationError as exc:
        raise ComposeError(f"{where}: {describe(exc)}") from exc


def _healthcheck(value: Any, where: str) -> HealthcheckSpec:
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: must be a map")
    if value.get("disable") is not None and _bool(value["disable"], f"{where}.disable"):
        return HealthcheckSpec(test=("NONE",))  # the image's HEALTHCHECK is turned off, as in Compose
    test = value.get("test")
    argv: tuple[str, ...]
    if test is None:
        argv = ()  # timings only: the image's test runs with them
    elif isinstance(test, str):
        argv = ("CMD-SHELL", test)
    elif isinstance(test, list) and test and all(isinstance(t, str) for t in test):
        if test[0] not in ("CMD", "CMD-SHELL", "NONE"):
            raise ComposeError(f"{where}: test must start with CMD, CMD-SHELL or NONE")
        argv = ("NONE",) if test[0] == "NONE" else tuple(test)
    else:
        raise ComposeError(f"{where}: test must be a string or a list of strings")
    retries = value.get("retries", 3)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ComposeError(f"{where}: retries must be a non-negative integer")
    fields: dict[str, Any] = {
        "test": argv,
        "interval_s": parse_duration(value.get("interval", "30s"), f"{where}.interval"),
        "timeout_s": parse_duration(value.get("timeout", "30s"), f"{where}.timeout"),
        "retries": retries,
        "start_period_s": parse_duration(value.get("start_period", "0s"), f"{where}.start_period"),
    }
    if "start_interval" in value:
        fields["start_interval_s"] = parse_duration(value["start_interval"], f"{where}.start_interval")
    return HealthcheckSpec.model_validate(fields)


def _depends_on(value: Any, where: str) -> tuple[tuple[str, ...], dict[str, Dependency]]:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value), {}
    if isinstance(value, dict):
        special: dict[str, Dependency] = {}
        for name, opts in value.items():
            opts = opts or {}
            condition = opts.get("condition", "service_started")
            if condition not in ("service_started", "service_healthy", "service_completed_successfully"):
                raise ComposeError(
                    f"{where}.{name}.condition: must be service_started, service_healthy or "
                    f"service_completed_successfully, not {condition!r}"
                )
            dep = Dependency(
                condition=condition,
                restart=_bool(opts.get("restart", False), f"{where}.{name}.restart"),
                required=_bool(opts.get("required", True), f"{where}.{name}.required"),
            )
            if dep != Dependency():
                special[str(name)] = dep
        return tuple(str(k) for k in value), special
    raise ComposeError(f"{where}: must be a list of service names or a map")


def _restart(value: Any, where: str) -> str:
    if value is False or value == "no":  # YAML 1.1 reads a bare `no` as false
        return "no"
    if value in ("always", "on-failure", "unless-stopped"):
        return str(value)
    if isinstance(value, str) and re.match(r"^on-failure:\d+\Z", value):
        return "on-failure"  # the count goes to restart_max_attempts
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


def _templates(value: Any, kind: str, problems: _Problems) -> dict[str, str]:
    """Top-level ``configs`` or ``secrets``: name to template (``content``, rendered on the device)."""
    if not isinstance(value, dict):
        return {}
    out = {}
    for name, body in value.items():
        where = f"{kind} {name!r}"
        if not isinstance(name, str) or not names.CONFIG_NAME.ok(name):
            problems.add(f"{where}: invalid name (letters, digits, '.', '_', '-')")
            continue
        if kind == "config" and name.startswith(SECRET_PREFIX):
            problems.add(f"{where}: config names starting with {SECRET_PREFIX!r} are reserved for secrets")
            continue
        if not isinstance(body, dict):
            problems.add(f"{where}: must be a map with content")
            continue
        unknown = set(body) - {"content", "name", "labels"} - {k for k in body if k.startswith("x-")}
        if unknown:
            key = sorted(unknown)[0]
            hint = {
                "file": "file is not supported (the file is on your machine, not the device); "
                "put the text under content, or deploy with the tether CLI, which reads the file",
                "external": f"external {kind}s are not supported; put the text under content",
                "environment": "environment is not supported; put the text under content",
            }.get(key, f"unsupported key {key!r}")
            problems.add(f"{where}: {hint}")
            continue
        content = body.get("content")
        if not isinstance(content, str):
            problems.add(f"{where}: content must be a string (the file's text)")
            continue
        text = problems.run(where, _unescape, content, f"{where}: content", variables=True)
        if text is not None:
            out[name if kind == "config" else SECRET_PREFIX + name] = text
    return out


def _file_mode(value: Any, where: str, high: int = 0o777) -> int:
    """A file mode: an octal string (``"0440"``) or a number (YAML reads ``0440`` as octal)."""
    try:
        mode = int(value, 8) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ComposeError(f"{where}: mode must be an octal file mode such as 0440, not {value!r}") from None
    if isinstance(value, bool) or not 0 <= mode <= high:
        raise ComposeError(f"{where}: mode must be an octal file mode such as 0440, not {value!r}")
    return mode


def _config_mount(value: Any, where: str, configs: dict[str, str], kind: str = "config") -> ConfigMount:
    """A service's ``configs`` (or ``secrets``) entry: a name or the long form. A config is
    mounted at ``/NAME`` by default, a secret at ``/run/secrets/NAME``."""
    body = {"source": value} if isinstance(value, str) else value
    if not isinstance(body, dict):
        raise ComposeError(f"{where}: each entry must be a {kind} name or a map with source")
    unknown = set(body) - CONFIG_MOUNT_KEYS
    if unknown:
        raise ComposeError(f"{where}: unsupported key {sorted(unknown)[0]!r}")
    source = body.get("source")
    stored = source if kind == "config" else f"{SECRET_PREFIX}{source}"
    if stored not in configs:
        raise ComposeError(f"{where}: {kind} {source!r} is not declared under the top-level {kind}s")
    for key in ("uid", "gid"):
        if key in body:
            raise ComposeError(f"{where}: {key} is not supported (the file belongs to the agent's user)")
    default = f"/{source}" if kind == "config" else f"/run/secrets/{source}"
    target = body.get("target", default)
    if kind == "secret" and isinstance(target, str) and not target.startswith("/"):
        target = f"/run/secrets/{target}"
    if not isinstance(target, str) or not target or "\x00" in target:
        raise ComposeError(f"{where}: target must be a path")
    fields: dict[str, Any] = {"source": stored, "target": target}
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


def _device(value: Any, where: str) -> DeviceMapping:
    if isinstance(value, dict):
        source, target = value.get("source"), value.get("target") or value.get("source")
        permissions = value.get("permissions", "rwm")
    elif isinstance(value, str):
        parts = value.split(":")
        if len(parts) > 3:
            raise ComposeError(f"{where}: invalid device {value!r} (HOST[:CONTAINER[:PERMISSIONS]])")
        source = parts[0]
        target = parts[1] if len(parts) > 1 else source
        permissions = parts[2] if len(parts) > 2 else "rwm"
        if len(parts) == 2 and re.match(r"^[rwm]{1,3}\Z", parts[1]):
            target, permissions = source, parts[1]
    else:
        raise ComposeError(f"{where}: invalid device {value!r}")
    if not isinstance(source, str) or not source.startswith("/"):
        if isinstance(source, str) and "=" in source:  # CDI names (vendor.com/class=name)
            raise ComposeError(f"{where}: CDI devices ({source!r}) are not supported; give the /dev path")
        raise ComposeError(f"{where}: device {value!r} must be an absolute path on the device")
    try:
        return DeviceMapping(source=source, target=target, permissions=permissions)
    except ValidationError as exc:
        raise ComposeError(f"{where}: invalid device {value!r}: {describe(exc)}") from exc


def _gpu(value: Any, where: str) -> GpuRequest:
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: must be a map")
    count = value.get("count")
    if count == "all":
        count = -1
    elif count is not None:
        count = _int(count, f"{where}.count", 0)
    ids = tuple(str(i) for i in value.get("device_ids") or ())
    if count is not None and ids:
        raise ComposeError(f"{where}: count and device_ids cannot be used together")
    caps = tuple(str(c) for c in value.get("capabilities") or ())
    if not caps:
        raise ComposeError(f"{where}: capabilities are required (for example [gpu])")
    return GpuRequest(
        driver=value.get("driver"),
        count=count if count is not None or ids else -1,
        device_ids=ids,
        capabilities=caps,
        options=_mapping(value.get("options") or {}, f"{where}.options"),
    )


def _extra_hosts(value: Any, where: str) -> tuple[str, ...]:
    out = []
    if isinstance(value, dict):
        for host, address in value.items():
            for a in address if isinstance(address, list) else [address]:
                out.append(f"{host}:{a}")
    elif isinstance(value, list):
        for item in value:
            if not isinstance(item, str):
                raise ComposeError(f"{where}: entries must be HOST:ADDRESS or HOST=ADDRESS")
            host, sep, address = item.partition("=")
            if not sep:
                host, sep, address = item.partition(":")
            if not sep or not host or not address:
                raise ComposeError(f"{where}: invalid entry {item!r} (HOST:ADDRESS or HOST=ADDRESS)")
            out.append(f"{host}:{address.strip('[]')}")
    else:
        raise ComposeError(f"{where}: must be a list or a map")
    return tuple(out)


def _ulimits(value: Any, where: str) -> tuple[Ulimit, ...]:
    out = []
    for name, limit in sorted(value.items()):
        if isinstance(limit, dict):
            soft, hard = (
                _int(limit.get("soft"), f"{where}.{name}.soft"),
                _int(limit.get("hard"), f"{where}.{name}.hard"),
            )
        else:
            soft = hard = _int(limit, f"{where}.{name}")
        if soft > hard and hard != -1:
            raise ComposeError(f"{where}.{name}: soft limit {soft} is above the hard limit {hard}")
        out.append(Ulimit(name=name, soft=soft, hard=hard))
    return tuple(out)


def _tmpfs(value: Any, where: str) -> dict[str, str]:
    out = {}
    for item in _strings(value, where):
        target, _, options = item.partition(":")
        if not target.startswith("/"):
            raise ComposeError(f"{where}: {item!r}: the target must be an absolute path")
        out[target] = options
    return out


def _logging(value: Any, where: str) -> LoggingSpec:
    options = value.get("options") or {}
    driver = value.get("driver")
    return LoggingSpec(
        driver=str(driver) if driver else None,  # none given: the engine's default driver, as in Compose
        options={str(k): _scalar(v, f"{where}.options.{k}") for k, v in options.items()},
    )


def _service_ref(value: str, where: str, kind: str) -> str:
    """``host`` and the like as they are; ``service:NAME`` checked later against the stack."""
    if value.startswith("container:"):
        raise ComposeError(
            f"{where}: {kind} {value!r} joins a container Tether does not manage; "
            "use service:NAME for a service of this stack"
        )
    return value


def _network_mode(value: Any, where: str) -> str:
    if value in ("host", "bridge", "none", "default"):
        return "bridge" if value == "default" else str(value)
    if isinstance(value, str) and value.startswith("service:"):
        return value
    if isinstance(value, str) and value.startswith("container:"):
        _service_ref(value, where, "network_mode")
    raise ComposeError(
        f"{where}: must be bridge, host, none or service:NAME, not {value!r} "
        "(for a network of your own, use networks)"
    )


def _service_networks(
    value: Any, where: str, declared: dict[str, NetworkSpec]
) -> dict[str, NetworkAttachment]:
    items = {name: None for name in value} if isinstance(value, list) else dict(value)
    out = {}
    for name, opts in items.items():
        if name != "default" and name not in declared:
            raise ComposeError(f"{where}: network {name!r} is not declared under the top-level networks")
        opts = opts or {}
        fields: dict[str, Any] = {}
        if opts.get("aliases"):
            fields["aliases"] = tuple(str(a) for a in opts["aliases"])
        for key in ("ipv4_address", "ipv6_address", "mac_address"):
            if opts.get(key):
                fields[key] = str(opts[key])
        if opts.get("priority"):
            fields["priority"] = _int(opts["priority"], f"{where}.{name}.priority")
        for key in ("link_local_ips", "driver_opts", "interface_name", "gw_priority"):
            if opts.get(key):
                raise ComposeError(f"{where}.{name}: {key} is not supported")
        out[str(name)] = NetworkAttachment.model_validate(fields)
    return out


def _links(value: Any, where: str) -> dict[str, str]:
    out = {}
    for item in value:
        service, _, alias = str(item).partition(":")
        out[service] = alias or service
    return out


def _deploy(value: Any, where: str, fields: dict[str, Any], problems: _Problems) -> None:
    """``deploy``: resources and restart policy are honoured; swarm-only keys are ignored as
    ``docker compose`` ignores them; more than one replica is refused (use ``x-tether``)."""
    if not value:
        return
    replicas = value.get("replicas")
    if replicas is not None and _int(replicas, f"{where}.replicas", 0) > 1:
        raise ComposeError(
            f"{where}.replicas: a device runs one instance of each service; "
            "to run the stack on several devices use x-tether: {replicas: N}"
        )
    resources = value.get("resources") or {}
    limits = resources.get("limits") or {}
    reservations = resources.get("reservations") or {}
    if "cpus" in limits:
        fields.setdefault("cpus", _float(limits["cpus"], f"{where}.resources.limits.cpus"))
    if "memory" in limits:
        fields.setdefault("mem_limit", _bytes(limits["memory"], f"{where}.resources.limits.memory"))
    if "pids" in limits:
        fields.setdefault("pids_limit", _int(limits["pids"], f"{where}.resources.limits.pids", -1))
    if "memory" in reservations:
        fields.setdefault(
            "mem_reservation", _bytes(reservations["memory"], f"{where}.resources.reservations.memory")
        )
    if reservations.get("generic_resources"):
        raise ComposeError(f"{where}.resources.reservations.generic_resources: swarm only; not supported")
    devices = reservations.get("devices") or []
    fields["gpus"] = tuple(fields.get("gpus", ())) + tuple(
        _gpu(d, f"{where}.resources.reservations.devices.{i}") for i, d in enumerate(devices)
    )
    policy = value.get("restart_policy")
    if policy:
        condition = policy.get("condition", "any")
        mapped = {"none": "no", "on-failure": "on-failure", "any": "always"}.get(condition)
        if mapped is None:
            raise ComposeError(
                f"{where}.restart_policy.condition: must be none, on-failure or any, not {condition!r}"
            )
        fields["restart"] = mapped
        if "max_attempts" in policy:
            fields["restart_max_attempts"] = _int(
                policy["max_attempts"], f"{where}.restart_policy.max_attempts", 0
            )
        for key in ("delay", "window"):
            if key in policy:
                parse_duration(policy[key], f"{where}.restart_policy.{key}")
                problems.warnings.append(
                    f"{where}.restart_policy.{key}: the agent's own backoff (1 s doubling to 5 min) applies"
                )


def _simple(convert: Callable[[Any, str], Any], field: str | None = None) -> Callable[..., None]:
    def handler(value: Any, where: str, fields: dict[str, Any], key: str) -> None:
        if value is not None:
            fields[field or key] = convert(value, where)

    return handler


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str | int) or isinstance(value, bool) or value == "":
        raise ComposeError(f"{where}: must be a non-empty string")
    return str(value)


def _abs_path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ComposeError(f"{where}: must be an absolute path, not {value!r}")
    return value


def _name_like(pattern: str, what: str) -> Callable[[Any, str], str]:
    def convert(value: Any, where: str) -> str:
        if not isinstance(value, str) or not re.match(pattern, value):
            raise ComposeError(f"{where}: {value!r} is not a valid {what}")
        return value

    return convert


def _upper_strings(value: Any, where: str) -> tuple[str, ...]:
    return tuple(s.upper() for s in _strings(value, where))


def _mode_ref(kind: str, allowed: tuple[str, ...]) -> Callable[[Any, str], str]:
    def convert(value: Any, where: str) -> str:
        if isinstance(value, str) and (value in allowed or value.startswith("service:")):
            return value
        if isinstance(value, str):
            _service_ref(value, where, kind)
        raise ComposeError(f"{where}: must be {', '.join(allowed)} or service:NAME, not {value!r}")

    return convert


_SIMPLE: dict[str, Callable[..., None]] = {
    "container_name": _simple(_name_like(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}\Z", "container name")),
    # '_' as Docker takes it (hostname iobroker_1 runs under docker compose)
    "hostname": _simple(_name_like(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,252}\Z", "host name")),
    "domainname": _simple(_name_like(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,252}\Z", "domain name")),
    "user": _simple(_str),
    "working_dir": _simple(_abs_path),
    "platform": _simple(_name_like(r"^[a-z0-9]+(/[a-z0-9]+){0,2}\Z", "platform (os/arch[/variant])")),
    "runtime": _simple(_name_like(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}\Z", "runtime name")),
    "userns_mode": _simple(_name_like(r"^host\Z", "userns_mode (only host)")),
    "cgroup": _simple(_str),
    "mac_address": _simple(_name_like(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}\Z", "MAC address")),
    "cpuset": _simple(_name_like(r"^[0-9,-]+\Z", "CPU set (such as 0-3 or 0,1)")),
    "privileged": _simple(_bool),
    "read_only": _simple(_bool),
    "init": _simple(_bool),
    "tty": _simple(_bool),
    "stdin_open": _simple(_bool),
    "oom_kill_disable": _simple(_bool),
    "cap_add": _simple(_upper_strings),
    "cap_drop": _simple(_upper_strings),
    "security_opt": _simple(_strings),
    "device_cgroup_rules": _simple(_strings),
    "group_add": _simple(_strings),
    "dns": _simple(_strings),
    "dns_search": _simple(_strings),
    "dns_opt": _simple(_strings),
    "extra_hosts": _simple(_extra_hosts),
    "sysctls": _simple(_mapping),
    "shm_size": _simple(_bytes),
    "mem_limit": _simple(_bytes),
    "mem_reservation": _simple(_bytes),
    "memswap_limit": _simple(lambda v, w: _bytes(v, w, allow_unlimited=True)),
    "mem_swappiness": _simple(lambda v, w: _int(v, w, 0, 100)),
    "oom_score_adj": _simple(lambda v, w: _int(v, w, -1000, 1000)),
    "pids_limit": _simple(lambda v, w: _int(v, w, -1)),
    "cpu_shares": _simple(lambda v, w: _int(v, w, 0)),
    "cpu_period": _simple(lambda v, w: _int(v, w, 0)),
    "cpu_quota": _simple(lambda v, w: _int(v, w, -1)),
    "cpus": _simple(_float),
    "stop_signal": _simple(_signal),
    "pid": _simple(_mode_ref("pid", ("host",))),
    "ipc": _simple(_mode_ref("ipc", ("host", "private", "shareable", "none"))),
    "ulimits": _simple(_ulimits),
    "devices": _simple(lambda v, w: tuple(_device(d, f"{w}.{i}") for i, d in enumerate(v))),
    "tmpfs": _simple(_tmpfs),
    "logging": _simple(_logging),
    "links": _simple(_links),
    "expose": _simple(lambda v, w: tuple(e for i, x in enumerate(v) for e in _expose(x, f"{w}.{i}"))),
    "gpus": _simple(
        lambda v, w: (
            (GpuRequest(count=-1, capabilities=("gpu",)),)
            if v == "all"
            else tuple(_gpu(g, f"{w}.{i}") for i, g in enumerate(v))
        )
    ),
}


class _Context:
    def __init__(
        self,
        volumes: set[str],
        networks: dict[str, NetworkSpec],
        configs: dict[str, str],
        shipped: dict[str, StackFile],
    ) -> None:
        self.volumes = volumes
        self.networks = networks
        self.configs = configs
        self.shipped = shipped


def _service(name: str, body: Any, ctx: _Context, problems: _Problems) -> ServiceSpec | None:
    where = f"service {name!r}"
    if not isinstance(name, str) or not names.NAME.ok(name):
        problems.add(
            f"{where}: invalid service name for a device (lower-case letters, digits, '.', '_', '-')"
        )
        return None
    if not isinstance(body, dict):
        problems.add(f"{where}: must be a map")
        return None
    before = len(problems.items)
    clean: dict[str, Any] = {}
    for key, value in body.items():
        if key.startswith("x-") or key not in SERVICE_PROPERTIES or ("services", name, key) in problems.bad:
            continue  # an unknown key is a structural problem, already reported
        got = problems.run(
            f"{where}: {key}", _unescape, value, f"{where}: {key}", variables=key == "environment"
        )
        if got is not None or value is None:
            clean[key] = got
    fields: dict[str, Any] = {"name": name}
    image = clean.get("image")
    if "image" in clean:
        if not isinstance(image, str) or not image.strip():
            problems.add(f"{where}: image: must be a non-empty string")
        else:
            fields["image"] = image.strip()
    for key, value in clean.items():
        kw = f"{where}: {key}"
        if key in _IGNORED_SERVICE_KEYS or key == "image":
            continue
        if key == "build":
            if fields.get("image"):
                problems.warnings.append(
                    f"{where}: build is ignored: devices run the prebuilt image {fields['image']!r} "
                    "(build and push it first)"
                )
            else:
                problems.add(f"{kw}: build without image: {_DEVICE_HINTS['build']}")
            continue
        if key in _DEVICE_HINTS:
            problems.add(f"{kw}: {_DEVICE_HINTS[key]}")
            continue
        handler = _SIMPLE.get(key)
        if handler is not None:
            problems.run(kw, handler, value, kw, fields, key)
            continue
        problems.run(kw, _service_key, key, value, kw, fields, ctx, problems, body)
    if len(problems.items) > before:
        return None
    if fields.get("network_mode") == "host" and fields.get("ports"):
        # The engine discards published ports of a container on the host's network (with a
        # warning), so docker compose runs such a file: the same here, said once.
        problems.warnings.append(
            f"{where}: ports are ignored with network_mode: host (the service listens on the "
            "device's own ports; Docker discards them too)"
        )
        fields["ports"] = ()
    if not fields.get("image") and not fields.get("command") and not fields.get("entrypoint"):
        problems.add(f"{where}: needs an image (docker driver) or a command (process driver)")
        return None
    try:
        return ServiceSpec.model_validate(fields)
    except ValidationError as exc:
        problems.add(f"{where}: {describe(exc)}")
        return None


def _service_key(
    key: str,
    value: Any,
    where: str,
    fields: dict[str, Any],
    ctx: _Context,
    problems: _Problems,
    body: dict[str, Any],
) -> None:
    """The keys that need more than a conversion."""
    if value is None and key not in ("restart", "pid"):
        return
    if key in ("command", "entrypoint"):
        fields[key] = _argv(value, where)
    elif key == "environment":
        fields["environment"] = _mapping(value, where)
    elif key == "labels":
        labels = _mapping(value, where)
        bad = [k for k in labels if k.startswith("io.tether.")]
        if bad:
            raise ComposeError(f"{where}: label {bad[0]!r} is reserved for Tether")
        fields["labels"] = labels
    elif key == "ports":
        ports: list[PortSpec] = []
        for i, p in enumerate(value):
            ports.extend(problems.run(f"{where}.{i}", _ports, p, f"{where}.{i}") or ())
        fields["ports"] = tuple(ports)
    elif key == "volumes":
        # As docker compose: a later volume at the same target replaces the earlier one, in its
        # place (said in a warning); targets equal only once cleaned ('/x/', '/x') are an error.
        by_target: dict[str, tuple[int, VolumeSpec]] = {}
        for i, item in enumerate(value):
            v = problems.run(f"{where}.{i}", _volume, item, f"{where}.{i}", ctx.volumes, ctx.shipped)
            if v is None:
                continue
            if v.target in by_target:
                problems.warnings.append(
                    f"{where}.{i} replaces {key}.{by_target[v.target][0]}: both are mounted at "
                    f"{v.target!r}; the last one is used, as docker compose does"
                )
            by_target[v.target] = (i, v)
        fields["volumes"] = tuple(v for _, v in by_target.values())
        cleaned = [posixpath.normpath(t) for t in by_target]
        dupes = sorted({t for t in cleaned if cleaned.count(t) > 1})
        if dupes:
            raise ComposeError(f"{where}: two volumes have the same target {dupes[0]!r}")
    elif key == "restart":
        fields["restart"] = _restart(value, where)
        if isinstance(value, str) and value.startswith("on-failure:"):
            fields["restart_max_attempts"] = int(value.partition(":")[2])
    elif key == "network_mode":
        mode = _network_mode(value, where)
        fields["network_mode"] = mode
        if mode not in ("bridge", "host") and body.get("ports"):
            raise ComposeError(f"{where}: ports cannot be published with network_mode: {mode}")
        if mode != "bridge" and body.get("networks"):
            raise ComposeError(f"{where}: networks cannot be combined with network_mode: {mode}")
    elif key == "networks":
        fields["networks"] = _service_networks(value, where, ctx.networks)
    elif key == "healthcheck":
        fields["healthcheck"] = _healthcheck(value, where)
    elif key == "depends_on":
        fields["depends_on"], fields["dependencies"] = _depends_on(value, where)
    elif key == "stop_grace_period":
        fields["stop_grace_period_s"] = parse_duration(value, where)
    elif key in ("configs", "secrets"):
        kind = key[:-1]
        mounts = tuple(
            m
            for i, c in enumerate(value)
            if (m := problems.run(f"{where}.{i}", _config_mount, c, f"{where}.{i}", ctx.configs, kind))
        )
        targets = [m.target for m in (*fields.get("configs", ()), *mounts)]
        if len(set(targets)) != len(targets):
            raise ComposeError(f"{where}: two configs or secrets have the same target")
        fields["configs"] = (*fields.get("configs", ()), *mounts)
    elif key == "deploy":
        _deploy(value, where, fields, problems)
    elif key == "scale":
        if _int(value, where, 0) > 1:
            raise ComposeError(
                f"{where}: a device runs one instance of each service (use x-tether: {{replicas: N}})"
            )
    elif key == "pull_policy":
        if value not in ("missing", "if_not_present"):
            problems.warnings.append(f"{where}: {value!r}: devices pull an image only when it is missing")
    else:
        raise ComposeError(f"{where}: unsupported key {key!r}")


def _check_references(services: list[ServiceSpec], problems: _Problems) -> None:
    """What names other services: they must be in the stack; container names must be unique."""
    names = {s.name for s in services}
    aliases: dict[str, str] = {}
    for s in services:
        where = f"service {s.name!r}"
        for key in ("network_mode", "pid", "ipc"):
            value = getattr(s, key)
            if isinstance(value, str) and value.startswith("service:"):
                other = value.partition(":")[2]
                if other not in names:
                    problems.add(f"{where}: {key}: {value!r} names unknown service {other!r}")
                elif other == s.name:
                    problems.add(f"{where}: {key}: a service cannot share its own namespace")
        for other in s.links:
            if other not in names:
                problems.add(f"{where}: links: unknown service {other!r}")
        if s.container_name:
            if s.container_name in names and s.container_name != s.name:
                problems.add(f"{where}: container_name {s.container_name!r} is the name of another service")
            elif s.container_name in aliases:
                problems.add(
                    f"{where}: container_name {s.container_name!r} is also used by service {aliases[s.container_name]!r}"
                )
            aliases[s.container_name] = s.name
        for dep, d in s.dependencies.items():
            target = next((x for x in services if x.name == dep), None)
            if target is None or d.condition != "service_healthy":
                continue
            check = target.healthcheck
            if (check is not None and check.test == ("NONE",)) or (check is None and not target.image):
                problems.add(
                    f"{where}: depends_on: {dep!r} can never be healthy (it has no healthcheck); "
                    "give it one or use condition service_started"
                )


def _start_order(services: list[ServiceSpec], problems: _Problems) -> list[ServiceSpec]:
    """Dependencies first (``depends_on``, ``network_mode``/``pid``/``ipc: service:X``, ``links``),
    otherwise file order; unknown names and cycles are problems."""
    by_name = {s.name: s for s in services}

    def needs(s: ServiceSpec) -> list[str]:
        out = list(s.depends_on)
        for key in ("network_mode", "pid", "ipc"):
            value = getattr(s, key)
            if isinstance(value, str) and value.startswith("service:"):
                out.append(value.partition(":")[2])
        out.extend(s.links)
        return [n for n in dict.fromkeys(out) if n in by_name and n != s.name]

    for s in services:
        for dep in s.depends_on:
            if dep not in by_name:
                problems.add(f"service {s.name!r}: depends_on names unknown service {dep!r}")
            if dep == s.name:
                problems.add(f"service {s.name!r}: depends on itself")
    ordered: list[ServiceSpec] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(s: ServiceSpec, path: list[str]) -> None:
        if state.get(s.name) == 2:
            return
        if state.get(s.name) == 1:
            cycle = " -> ".join([*path[path.index(s.name) :], s.name])
            problems.add(f"depends_on cycle: {cycle}")
            return
        state[s.name] = 1
        for dep in needs(s):
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
            except CommandError as exc:
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


def _external(value: Any, name: Any, where: str) -> tuple[bool, str | None]:
    """``external: true`` / ``external: {name: X}`` (the old form): (external, name)."""
    if isinstance(value, dict):
        return True, value.get("name") or name
    return (_bool(value, f"{where}.external") if value is not None else False), name


_RESOURCE_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}\Z")


def _networks(value: Any, problems: _Problems) -> dict[str, NetworkSpec]:
    out: dict[str, NetworkSpec] = {}
    for name, body in (value or {}).items():
        where = f"network {name!r}"
        if ("networks", name) in problems.bad:
            continue
        if not _RESOURCE_NAME.match(name):
            problems.add(f"{where}: invalid name (letters, digits, '.', '_', '-'; at most 64)")
            continue

        def build(name: str = name, body: Any = body, where: str = where) -> NetworkSpec:
            body = _unescape(body or {}, where)
            external, real = _external(body.get("external"), body.get("name"), where)
            ipam = body.get("ipam") or {}
            if body.get("enable_ipv4") is not None and not _bool(body["enable_ipv4"], f"{where}.enable_ipv4"):
                raise ComposeError(f"{where}: enable_ipv4: false is not supported")
            spec = NetworkSpec(
                name=real,
                external=external,
                driver=body.get("driver"),
                driver_opts={str(k): str(v) for k, v in (body.get("driver_opts") or {}).items()},
                internal=_bool(body.get("internal", False), f"{where}.internal"),
                attachable=_bool(body.get("attachable", False), f"{where}.attachable"),
                enable_ipv6=_bool(body.get("enable_ipv6", False), f"{where}.enable_ipv6"),
                ipam_driver=ipam.get("driver"),
                ipam_config=tuple(
                    IpamPool(
                        subnet=p.get("subnet"),
                        ip_range=p.get("ip_range"),
                        gateway=p.get("gateway"),
                        aux_addresses={str(k): str(v) for k, v in (p.get("aux_addresses") or {}).items()},
                    )
                    for p in ipam.get("config") or ()
                ),
                ipam_options={str(k): str(v) for k, v in (ipam.get("options") or {}).items()},
                labels=_mapping(body.get("labels") or {}, f"{where}.labels"),
            )
            if external and name == "default":
                raise ComposeError(f"{where}: the stack's default network cannot be external; name your own")
            if external and (spec.driver or spec.driver_opts or spec.ipam_config):
                raise ComposeError(f"{where}: an external network takes no driver or ipam options")
            return spec

        spec = problems.run(where, build)
        if spec is not None:
            out[name] = spec
    return out


def _volumes(value: Any, problems: _Problems) -> tuple[set[str], dict[str, VolumeOptions]]:
    names: set[str] = set()
    options: dict[str, VolumeOptions] = {}
    for name, body in (value or {}).items():
        where = f"volume {name!r}"
        if ("volumes", name) in problems.bad:
            continue
        if not _RESOURCE_NAME.match(name):
            problems.add(f"{where}: invalid name (letters, digits, '.', '_', '-'; at most 64)")
            continue

        def build(body: Any = body, where: str = where) -> VolumeOptions:
            body = _unescape(body or {}, where)
            external, real = _external(body.get("external"), body.get("name"), where)
            spec = VolumeOptions(
                name=real,
                external=external,
                driver=body.get("driver"),
                driver_opts={str(k): str(v) for k, v in (body.get("driver_opts") or {}).items()},
                labels=_mapping(body.get("labels") or {}, f"{where}.labels"),
            )
            if external and (spec.driver or spec.driver_opts):
                raise ComposeError(f"{where}: an external volume takes no driver options")
            return spec

        spec = problems.run(where, build)
        if spec is None:
            continue
        names.add(name)
        if spec != VolumeOptions():
            options[name] = spec
    return names, options


def parse_compose(text: str, files: tuple[StackFile, ...] = ()) -> StackSpec:
    """Parse and validate a Compose file; raise :class:`ComposeError` listing every problem."""
    return parse_stack(text, files)[0]


def parse_stack(text: str, files: tuple[StackFile, ...] = ()) -> tuple[StackSpec, Placement]:
    """Parse a Compose file into the spec devices run and the controller's placement policy.

    ``files`` are shipped with the stack for its relative bind mounts (``./conf``)."""
    spec, placement, _warnings = parse_stack_warnings(text, files)
    return spec, placement


def load_compose(text: str) -> Any:
    """The document of a Compose file's text: YAML as Compose reads it, bounded in size,
    nesting and aliases (protocol/compose_yaml.py)."""
    return load_yaml(text)


def parse_stack_warnings(
    text: str, files: tuple[StackFile, ...] = ()
) -> tuple[StackSpec, Placement, list[str]]:
    """:func:`parse_stack`, and the warnings (keys accepted but without effect on a device)."""
    shipped = _shipped(files)
    return parse_document(load_compose(text), shipped)


def parse_document(
    doc: Any, shipped: dict[str, StackFile] | None = None
) -> tuple[StackSpec, Placement, list[str]]:
    """A loaded (and resolved) Compose document to (spec, placement, warnings); every problem
    is collected and raised at once as one :class:`ComposeError`. ``shipped``: the files sent
    with the stack for its relative bind mounts, by path."""
    shipped = shipped or {}
    if not isinstance(doc, dict):
        raise ComposeError("compose file must be a map with a 'services' key")
    problems = _Problems()
    for path, message in structural_problems(doc):
        problems.bad.update(path[:i] for i in range(1, len(path) + 1))
        problems.add(f"{_where(path)}: {message}")
    if "include" in doc:
        problems.add("include: included files are merged by the tether CLI; deploy the file with the CLI")
    if "models" in doc:
        problems.add(f"models: {_DEVICE_HINTS['models']}")
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        problems.add("compose file has no services")
        problems.raise_if_any()
        raise AssertionError  # unreachable: no services is a problem
    volumes, volume_options = _volumes(
        doc.get("volumes") if isinstance(doc.get("volumes"), dict) else {}, problems
    )
    networks = _networks(doc.get("networks") if isinstance(doc.get("networks"), dict) else {}, problems)
    configs = _templates(doc.get("configs"), "config", problems)
    configs.update(_templates(doc.get("secrets"), "secret", problems))
    ctx = _Context(volumes, networks, configs, shipped)
    parsed = [s for name, body in services.items() if (s := _service(name, body, ctx, problems)) is not None]
    placement = problems.run("x-tether", _placement, doc.get("x-tether"))
    if len(parsed) == len(services):
        _check_references(parsed, problems)
        ordered = _start_order(parsed, problems)
        used = {v.source for s in parsed for v in s.volumes if v.type == "stack"}
        for shipped_path in shipped:
            if not any(u == "." or shipped_path == u or shipped_path.startswith(u + "/") for u in used):
                problems.add(
                    f"shipped file {shipped_path!r} is not under any relative bind mount of the stack"
                )
    problems.raise_if_any()
    assert placement is not None  # a refused x-tether was raised just above
    spec = StackSpec(
        services=tuple(ordered),
        volumes=tuple(sorted(volumes)),
        configs=configs,
        files=tuple(shipped[p] for p in sorted(shipped)),
        networks={k: v for k, v in networks.items()},
        volume_options=volume_options,
    )
    return spec, placement, problems.warnings
