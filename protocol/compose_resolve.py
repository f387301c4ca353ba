"""Resolving the operator's Compose files into the one file a stack is, as docker compose does.

Runs on the operator's machine (the CLI), never on the controller or a device: the values
come from the operator's shell and files. File access goes through :class:`Files` (the CLI
passes the local file system), so everything here is testable and does no other I/O.

What is resolved (docs: README "What is resolved where"):

* **Interpolation** of every value (not keys): ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
  ``${VAR-default}``, ``${VAR:?message}``, ``${VAR?message}``, ``${VAR:+alt}``,
  ``${VAR+alt}`` (defaults and messages interpolated in turn), ``$$`` for a literal ``$``.
  An unset variable is empty, with a warning. Tether's ``${var:PATH/KEY}`` references are
  left as they are (rendered on the device). Values are taken from ``-e KEY=VALUE``, then
  the shell, then the env files (``--env-file``, else ``.env`` beside the first file).
  Values Compose casts (``healthcheck.retries``, ``read_only``, ``ports[].published`` ...)
  are cast after interpolation, as Compose does.
* **Several files** (``-f a.yml -f b.yml``) merged in order with Compose's rules: maps
  merged key by key, ``command``/``entrypoint``/``healthcheck.test`` replaced, ``environment``
  / ``labels`` / ``sysctls`` ... merged by key, ``ports`` / ``volumes`` / ``expose`` ...
  appended with one entry per port / target, ``x-*`` replaced; ``!reset`` and ``!override``.
* ``extends`` (same file or ``file:``), ``include`` (each file a project of its own, with its
  own directory and ``.env``), ``env_file`` inlined into ``environment`` (``environment``
  wins; Compose's env file syntax), ``configs`` ``file:``/``environment:`` inlined as
  ``content``, ``environment`` entries without a value taken from the operator's
  environment (dropped when unset).
* **Relative paths**: bind mount sources ``./x``, ``../x``, ``~/x`` become ``./REL``, REL
  relative to the first file's directory with each leading ``..`` written ``_parent``: a
  path in the stack's own directory on the device. Files and directories found there are
  shipped with the stack (:data:`MAX_SHIPPED_BYTES` in all).

The result is a Compose document whose strings are in Compose's escaped form (a literal
``$`` written ``$$``), dumped with :func:`~tether.protocol.compose_yaml.dump_yaml` for the
controller, which reads it with the same meaning.
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tether.protocol.compose_yaml import MAX_BYTES, Override, Reset, dump_yaml, load_yaml, strip_markers
from tether.protocol.errors import ComposeError
from tether.protocol.models import MAX_STACK_FILE_BYTES, MAX_STACK_FILES, StackFile

MAX_SHIPPED_BYTES = MAX_STACK_FILE_BYTES
"""Files shipped with a stack (bind-mounted files and directories beside the Compose file)."""
MAX_SHIPPED_FILES = MAX_STACK_FILES
PARENT = "_parent"
"""How a leading ``..`` of a relative bind source is written in the stack's directory."""


class Files(Protocol):
    """The operator's files, as the resolver sees them (absolute POSIX paths)."""

    def read(self, path: str) -> bytes | None:
        """The file's bytes, or None if there is no such file."""

    def kind(self, path: str) -> str | None:
        """``"file"``, ``"dir"`` or None (missing)."""

    def walk(self, path: str) -> list[str]:
        """Every regular file under directory ``path``, as paths relative to it."""

    def mode(self, path: str) -> int:
        """Permission bits of a file."""


@dataclass(frozen=True)
class ShippedFile:
    """A file sent with the stack: its place in the stack's directory, content and mode."""

    path: str
    data: bytes
    mode: int = 0o644

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def wire(self) -> StackFile:
        """As sent to the controller (``StacksDeploy.files``)."""
        return StackFile(path=self.path, data=base64.b64encode(self.data).decode(), mode=self.mode)


@dataclass
class Resolved:
    """What the resolver made: the Compose document, the files to ship, the warnings."""

    doc: dict[str, Any]
    files: dict[str, ShippedFile] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# --- interpolation -----------------------------------------------------------------------------

_NAME = re.compile(r"[_A-Za-z][_A-Za-z0-9]*")
_OPS = (":-", ":?", ":+", "-", "?", "+")


class _Interpolator:
    """Compose's variable substitution over one string at a time."""

    def __init__(self, lookup: Callable[[str], str | None], warnings: list[str]) -> None:
        self.lookup = lookup
        self.warnings = warnings

    def text(self, value: str, where: str, escape: bool) -> str:
        """``value`` substituted. With ``escape``, literal ``$`` in the result is written
        ``$$`` (Compose's escaped form) and ``${var:...}`` is kept as it is."""
        out: list[str] = []
        i = 0
        n = len(value)
        while i < n:
            j = value.find("$", i)
            if j < 0:
                out.append(_esc(value[i:], escape))
                break
            out.append(_esc(value[i:j], escape))
            nxt = value[j + 1 : j + 2]
            if nxt == "$":
                out.append("$$" if escape else "$")
                i = j + 2
            elif nxt == "{":
                end = _closing(value, j + 2)
                if end < 0:
                    raise ComposeError(f"{where}: invalid interpolation {value[j:][:40]!r}: no closing }}")
                body = value[j + 2 : end]
                if body.startswith("var:") and not body.startswith(("var:-", "var:?", "var:+")):
                    out.append(value[j : end + 1])  # Tether's ${var:PATH/KEY}: rendered on the device
                else:
                    out.append(_esc(self._braced(body, where, value), escape))
                i = end + 1
            else:
                m = _NAME.match(value, j + 1)
                if m is None:
                    raise ComposeError(
                        f"{where}: invalid interpolation {value[j:][:20]!r}: "
                        "$ must be followed by a name or {name} (write $$ for a literal $)"
                    )
                out.append(_esc(self._get(m.group(0)), escape))
                i = m.end()
        return "".join(out)

    def _get(self, name: str) -> str:
        value = self.lookup(name)
        if value is None:
            warning = f'the "{name}" variable is not set: defaulting to a blank string'
            if warning not in self.warnings:
                self.warnings.append(warning)
            return ""
        return value

    def _braced(self, body: str, where: str, whole: str) -> str:
        m = _NAME.match(body)
        if m is None:
            raise ComposeError(f"{where}: invalid interpolation ${{{body}}} in {whole[:60]!r}")
        name, rest = m.group(0), body[m.end() :]
        if not rest:
            return self._get(name)
        op = next((o for o in _OPS if rest.startswith(o)), None)
        if op is None:
            raise ComposeError(f"{where}: invalid interpolation ${{{body}}} in {whole[:60]!r}")
        arg = rest[len(op) :]
        value = self.lookup(name)
        empty = value is None or (op.startswith(":") and value == "")
        if op in (":-", "-"):
            return self.text(arg, where, False) if empty else str(value)
        if op in (":+", "+"):
            return "" if empty else self.text(arg, where, False)
        if empty:  # :? and ?
            message = self.text(arg, where, False) or f"{name} is required"
            raise ComposeError(f"{where}: required variable {name} is missing a value: {message}")
        return str(value)


def _esc(text: str, escape: bool) -> str:
    return text.replace("$", "$$") if escape else text


def _closing(value: str, start: int) -> int:
    """Index of the ``}`` closing a ``${`` whose body starts at ``start`` (nested ``${}`` skipped)."""
    depth = 1
    i = start
    while i < len(value):
        if value.startswith("${", i):
            depth += 1
            i += 2
            continue
        if value[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("y", "yes", "true", "on"):
        return True
    if low in ("n", "no", "false", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _int_text(text: str) -> int:
    return int(text.strip(), 10)


def _int_or_text(text: str) -> int | str:
    try:
        return int(text.strip(), 10)
    except ValueError:
        return text


_S = ("services", "*")
CASTS: dict[tuple[str, ...], Callable[[str], Any]] = {
    (*_S, "configs", "[]", "mode"): _int_text,
    (*_S, "secrets", "[]", "mode"): _int_text,
    (*_S, "cpu_count"): _int_text,
    (*_S, "cpu_percent"): float,
    (*_S, "cpu_period"): _int_text,
    (*_S, "cpu_quota"): _int_text,
    (*_S, "cpu_rt_period"): _int_text,
    (*_S, "cpu_rt_runtime"): _int_text,
    (*_S, "cpus"): float,
    (*_S, "cpu_shares"): _int_text,
    (*_S, "init"): _bool,
    (*_S, "deploy", "replicas"): _int_text,
    (*_S, "deploy", "restart_policy", "max_attempts"): _int_text,
    (*_S, "healthcheck", "retries"): _int_text,
    (*_S, "healthcheck", "disable"): _bool,
    (*_S, "mem_limit"): _int_or_text,
    (*_S, "mem_reservation"): _int_or_text,
    (*_S, "memswap_limit"): _int_or_text,
    (*_S, "mem_swappiness"): _int_text,
    (*_S, "oom_kill_disable"): _bool,
    (*_S, "oom_score_adj"): _int_text,
    (*_S, "pids_limit"): _int_text,
    (*_S, "ports", "[]", "target"): _int_text,
    (*_S, "ports", "[]", "published"): _int_or_text,
    (*_S, "privileged"): _bool,
    (*_S, "read_only"): _bool,
    (*_S, "scale"): _int_text,
    (*_S, "shm_size"): _int_or_text,
    (*_S, "stdin_open"): _bool,
    (*_S, "tty"): _bool,
    (*_S, "ulimits", "*"): _int_text,
    (*_S, "ulimits", "*", "hard"): _int_text,
    (*_S, "ulimits", "*", "soft"): _int_text,
    (*_S, "volumes", "[]", "read_only"): _bool,
    (*_S, "volumes", "[]", "volume", "nocopy"): _bool,
    (*_S, "volumes", "[]", "tmpfs", "size"): _int_or_text,
    ("networks", "*", "external"): _bool,
    ("networks", "*", "internal"): _bool,
    ("networks", "*", "attachable"): _bool,
    ("volumes", "*", "external"): _bool,
    ("secrets", "*", "external"): _bool,
    ("configs", "*", "external"): _bool,
}


def _cast_for(path: tuple[str, ...]) -> Callable[[str], Any] | None:
    for pattern, cast in CASTS.items():
        if len(pattern) == len(path) and all(
            p == "*" or p == q or (p == "[]" and q.startswith("["))
            for p, q in zip(pattern, path, strict=True)
        ):
            return cast
    return None


def interpolate(
    doc: Any, lookup: Callable[[str], str | None], warnings: list[str], where: str
) -> tuple[Any, list[str]]:
    """Every string value of ``doc`` substituted (escaped form), cast where Compose casts;
    and the errors found (all of them)."""
    engine = _Interpolator(lookup, warnings)
    errors: list[str] = []

    def walk(value: Any, path: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*path, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*path, f"[{i}]")) for i, v in enumerate(value)]
        if isinstance(value, Override):
            return Override(walk(value.value, path))
        if isinstance(value, str):
            label = f"{where}: {'.'.join(path)}"
            try:
                text = engine.text(value, label, escape=True)
            except ComposeError as exc:
                errors.append(str(exc))
                return value
            cast = _cast_for(path)
            if cast is None:
                return text
            try:
                return cast(text.replace("$$", "$"))
            except ValueError:
                errors.append(f"{label}: {text!r} is not a valid value here")
                return text
        return value

    return walk(doc, ()), errors


# --- env files ---------------------------------------------------------------------------------

_ENV_KEY = re.compile(r"[A-Za-z0-9_.\-]+")
_DQ_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "$": "\\$"}


def parse_env_file(
    text: str, lookup: Callable[[str], str | None], name: str, warnings: list[str]
) -> dict[str, str]:
    """An env file in Compose's syntax: ``KEY=VALUE`` lines, ``#`` comments, ``export``
    prefixes, single quotes literal, double quotes with ``\\n``/``\\t``/``\\"`` escapes,
    unquoted and double-quoted values interpolated (from ``lookup``, then the keys above), a
    bare ``KEY`` taken from ``lookup`` (dropped when unset)."""
    out: dict[str, str] = {}

    def find(key: str) -> str | None:
        value = lookup(key)
        return value if value is not None else out.get(key)

    engine = _Interpolator(find, warnings)
    i, n, line = 0, len(text), 1
    while i < n:
        ch = text[i]
        if ch in " \t\r\f\v":
            i += 1
            continue
        if ch == "\n":
            line += 1
            i += 1
            continue
        if ch == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        where = f"{name}: line {line}"
        if text.startswith("export", i) and i + 6 < n and text[i + 6] in " \t":
            i += 6
            while i < n and text[i] in " \t":
                i += 1
        m = _ENV_KEY.match(text, i)
        if m is None:
            raise ComposeError(f"{where}: expected KEY=VALUE, found {text[i : i + 20].splitlines()[0]!r}")
        key = m.group(0)
        i = m.end()
        while i < n and text[i] in " \t":
            i += 1
        if i >= n or text[i] in "\n#":
            value = lookup(key)
            if value is not None:
                out[key] = value
            continue
        if text[i] != "=":
            raise ComposeError(f"{where}: expected '=' after {key!r}")
        i += 1
        while i < n and text[i] in " \t":
            i += 1
        quote = text[i] if i < n and text[i] in "'\"" else ""
        if quote:
            j = i + 1
            chars: list[str] = []
            while j < n and text[j] != quote:
                if text[j] == "\\" and j + 1 < n:
                    nxt = text[j + 1]
                    if quote == '"' and nxt in _DQ_ESCAPES:
                        chars.append(_DQ_ESCAPES[nxt])
                        j += 2
                        continue
                    if nxt == quote:
                        chars.append(quote)
                        j += 2
                        continue
                if text[j] == "\n":
                    line += 1
                chars.append(text[j])
                j += 1
            if j >= n:
                raise ComposeError(f"{where}: {key}: unterminated quoted value")
            raw = "".join(chars)
            value_text = raw if quote == "'" else engine.text(raw.replace("\\$", "$$"), where, escape=False)
            i = j + 1
            end = text.find("\n", i)
            trailing = text[i : n if end < 0 else end].strip()
            if trailing and not trailing.startswith("#"):
                raise ComposeError(f"{where}: {key}: unexpected {trailing[:20]!r} after the closing quote")
            i = n if end < 0 else end
        else:
            end = text.find("\n", i)
            raw = text[i : n if end < 0 else end]
            comment = re.search(r"\s#", raw)
            if comment:
                raw = raw[: comment.start()]
            value_text = engine.text(raw.rstrip(), where, escape=False)
            i = n if end < 0 else end
        out[key] = value_text
    return out


# --- merging -----------------------------------------------------------------------------------

_OVERRIDE = {("command",), ("entrypoint",), ("healthcheck", "test")}
_BY_KEY = {
    ("environment",),
    ("labels",),
    ("sysctls",),
    ("annotations",),
    ("extra_hosts",),
    ("deploy", "labels"),
    ("build", "args"),
}
_AS_MAP = {("depends_on",), ("networks",)}


def _kv_map(value: Any, sep: str = "=") -> dict[str, Any]:
    """``environment``-like values (a map, or a list of ``K=V``) as a map."""
    if isinstance(value, dict):
        return dict(value)
    out: dict[str, Any] = {}
    for item in value if isinstance(value, list) else []:
        key, found, rest = str(item).partition(sep)
        out[key] = rest if found else None
    return out


def _name_map(value: Any, default: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        return dict(value)
    return {str(v): dict(default) for v in value} if isinstance(value, list) else {}


def _port_key(entry: Any) -> str:
    if isinstance(entry, dict):
        ip = entry.get("host_ip", "0.0.0.0")
        return f"{ip}:{entry.get('published', '')}:{entry.get('target')}/{entry.get('protocol', 'tcp')}"
    return str(entry)


def _mount_target(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("target", entry.get("source", "")))
    parts = str(entry).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _config_target(default: str) -> Callable[[Any], str]:
    def key(entry: Any) -> str:
        if isinstance(entry, dict):
            return str(entry.get("target") or f"{default}/{entry.get('source')}")
        return f"{default}/{entry}"

    return key


_UNIQUE: dict[tuple[str, ...], Callable[[Any], str]] = {
    ("ports",): _port_key,
    ("volumes",): _mount_target,
    ("devices",): _mount_target,
    ("configs",): _config_target(""),
    ("secrets",): _config_target("/run/secrets"),
    ("expose",): str,
    ("dns",): str,
    ("dns_search",): str,
    ("dns_opt",): str,
    ("cap_add",): str,
    ("cap_drop",): str,
    ("tmpfs",): str,
    ("profiles",): str,
    ("links",): str,
    ("security_opt",): str,
    ("group_add",): str,
    ("env_file",): lambda e: str(e.get("path") if isinstance(e, dict) else e),
}


def _unique(items: list[Any], key: Callable[[Any], str]) -> list[Any]:
    """One entry per key, a later entry replacing the earlier in its place (Compose's rule)."""
    out: list[Any] = []
    index: dict[str, int] = {}
    for item in items:
        k = key(item)
        if k in index:
            out[index[k]] = item
        else:
            index[k] = len(out)
            out.append(item)
    return out


def merge(base: Any, over: Any, path: tuple[str, ...] = ()) -> Any:
    """``over`` laid on ``base`` with Compose's merge rules (``path`` below a service's keys
    starts after ``services.NAME``; at the top it is ``()``)."""
    if isinstance(over, Reset):
        return Reset()
    if isinstance(over, Override):
        return over.value
    if base is None or isinstance(base, Reset):
        return over
    service = path[2:] if len(path) >= 2 and path[0] == "services" else None
    if service is not None:
        if service in _OVERRIDE:
            return over
        if service in _BY_KEY:
            sep = ":" if service == ("extra_hosts",) and not _has_eq(base, over) else "="
            return {**_kv_map(base, sep), **_kv_map(over, sep)}
        if service in _AS_MAP:
            default = {"condition": "service_started"} if service == ("depends_on",) else {}
            base, over = _name_map(base, default), _name_map(over, default)
        logging = service == ("logging",) and isinstance(base, dict) and isinstance(over, dict)
        if logging and "driver" in base and "driver" in over and base["driver"] != over["driver"]:
            return over  # another driver: its options replace, not merge
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            if key in out and not str(key).startswith("x-"):
                out[key] = merge(out[key], value, (*path, str(key)))
            else:
                out[key] = strip_markers(value)  # nothing before it to reset or override
        return {k: v for k, v in out.items() if not isinstance(v, Reset)}
    if isinstance(base, list) and isinstance(over, list):
        items = [v for v in base + over if not isinstance(v, Reset)]
        key = _UNIQUE.get(service) if service is not None else None
        return _unique(items, key) if key is not None else items
    if isinstance(base, dict | list) and isinstance(over, str) and service in _UNIQUE:
        return merge(base, [over], path)  # env_file: a string is a one-item list
    return over


def _has_eq(*values: Any) -> bool:
    return any(isinstance(v, list) and any("=" in str(i) for i in v) for v in values)


# --- the resolver ------------------------------------------------------------------------------


@dataclass
class _Project:
    """One Compose project being loaded: its directory and interpolation environment."""

    directory: str
    env: Mapping[str, str]


class Resolver:
    """Loads, interpolates, extends, includes and merges a stack's Compose files."""

    def __init__(self, files: Files, home: str = "") -> None:
        self.fs = files
        self.home = home
        self.warnings: list[str] = []
        self.errors: list[str] = []
        self.root = ""  # the stack's project directory: relative paths are relative to it

    # --- environment ---

    def project_env(
        self,
        directory: str,
        shell: Mapping[str, str],
        env_files: list[str] | None = None,
        overrides: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Interpolation values: ``overrides`` (``-e``), then ``shell``, then the env files
        (``env_files``, else ``.env`` in ``directory`` when there is one)."""
        paths = env_files if env_files else [posixpath.join(directory, ".env")]
        found: dict[str, str] = {}
        for path in paths:
            data = self.fs.read(path)
            if data is None:
                if env_files:
                    raise ComposeError(f"env file {path} not found")
                continue
            merged = {**found, **shell}
            found.update(parse_env_file(_text(data, path), merged.get, path, self.warnings))
        return {**found, **shell, **(overrides or {})}

    # --- files ---

    def _load(self, path: str, project: _Project, base: str) -> dict[str, Any]:
        """One file read and interpolated, its relative paths made absolute against ``base``
        (the project's directory for its files, as Compose does; the file's own for extends)."""
        data = self.fs.read(path)
        if data is None:
            raise ComposeError(f"{path}: no such file")
        doc = load_yaml(_text(data, path), path, markers=True)
        if doc is None:
            return {}
        if not isinstance(doc, dict):
            raise ComposeError(f"{path}: a Compose file must be a map (with a 'services' key)")
        substituted, errors = interpolate(doc, project.env.get, self.warnings, path)
        if errors:
            raise ComposeError("\n".join(errors))
        result: dict[str, Any] = substituted  # a map stays a map
        self._paths(result, base, path)
        return result

    def _paths(self, doc: dict[str, Any], base: str, where: str) -> None:
        """Relative paths of ``doc`` (read from a file in ``base``) made absolute on the
        operator's machine; bind sources are turned into stack paths later."""
        services = doc.get("services")
        for body in services.values() if isinstance(services, dict) else ():
            if not isinstance(body, dict):
                continue
            if isinstance(body.get("volumes"), list):
                body["volumes"] = [self._volume_path(v, base) for v in body["volumes"]]
            env_file = body.get("env_file")
            if isinstance(env_file, str | dict):
                env_file = [env_file]
            if isinstance(env_file, list):
                body["env_file"] = [self._env_file_entry(e, base, where) for e in env_file]
            extends = body.get("extends")
            if isinstance(extends, dict) and isinstance(extends.get("file"), str):
                extends["file"] = self._abs(extends["file"], base)
        for section in ("configs", "secrets"):
            top = doc.get(section)
            for body in top.values() if isinstance(top, dict) else ():
                if isinstance(body, dict) and isinstance(body.get("file"), str):
                    body["file"] = self._abs(body["file"], base)

    def _abs(self, path: str, base: str) -> str:
        if path == "~" or path.startswith("~/"):
            return posixpath.normpath(self.home + path[1:])
        return posixpath.normpath(posixpath.join(base, path))

    def _volume_path(self, entry: Any, base: str) -> Any:
        if isinstance(entry, str):
            source, sep, rest = entry.partition(":")
            if sep and source.startswith((".", "~")):
                return f"\x00{self._abs(source, base)}:{rest}"  # marked until the stack path is known
            return entry
        if isinstance(entry, dict) and entry.get("type", "bind") == "bind":
            long_source = entry.get("source")
            if isinstance(long_source, str) and long_source.startswith((".", "~")):
                return {**entry, "source": f"\x00{self._abs(long_source, base)}"}
        return entry

    def _env_file_entry(self, entry: Any, base: str, where: str) -> dict[str, Any]:
        if isinstance(entry, str):
            return {"path": self._abs(entry, base), "required": True}
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            return {**entry, "path": self._abs(entry["path"], base)}
        raise ComposeError(f"{where}: env_file entries must be paths or maps with path")

    # --- extends ---

    def _extends(
        self, doc: dict[str, Any], path: str, project: _Project, chain: tuple[str, ...] = ()
    ) -> None:
        services = doc.get("services")
        if not isinstance(services, dict):
            return
        done: set[str] = set()
        for name in list(services):
            self._extend_one(services, name, path, project, chain, done)

    def _extend_one(
        self,
        services: dict[str, Any],
        name: str,
        path: str,
        project: _Project,
        chain: tuple[str, ...],
        done: set[str],
    ) -> None:
        body = services.get(name)
        if name in done or not isinstance(body, dict) or "extends" not in body:
            return
        ref = f"{name} in {path}"
        if ref in chain:
            raise ComposeError("extends cycle: " + " -> ".join([*chain, ref]))
        extends = body["extends"]
        if isinstance(extends, str):
            extends = {"service": extends}
        if not isinstance(extends, dict) or not isinstance(extends.get("service"), str):
            raise ComposeError(f"{path}: service {name!r}: extends needs a service name")
        target = extends["service"]
        other = extends.get("file")
        if other:
            other_doc = self._load(other, project, posixpath.dirname(other))
            self._extends(other_doc, other, project, (*chain, ref))
            base_services = other_doc.get("services") or {}
            where = other
        else:
            self._extend_one(services, target, path, project, (*chain, ref), done)
            base_services = services
            where = path
        base = base_services.get(target) if isinstance(base_services, dict) else None
        if not isinstance(base, dict):
            raise ComposeError(
                f"{path}: service {name!r} extends {target!r}, which is not a service in {where}"
            )
        base = {k: v for k, v in base.items() if k != "extends"}
        own = {k: v for k, v in body.items() if k != "extends"}
        services[name] = merge({"services": {name: base}}, {"services": {name: own}})["services"][name]
        done.add(name)

    # --- include ---

    def _include(
        self, doc: dict[str, Any], path: str, project: _Project, chain: tuple[str, ...]
    ) -> dict[str, Any]:
        entries = doc.pop("include", None)
        if entries is None:
            return doc
        if not isinstance(entries, list):
            raise ComposeError(f"{path}: include must be a list")
        base = posixpath.dirname(path)
        for entry in entries:
            spec = {"path": entry} if isinstance(entry, str) else entry
            if not isinstance(spec, dict) or not isinstance(spec.get("path"), str | list):
                raise ComposeError(f"{path}: include entries must be paths or maps with path")
            paths = spec["path"] if isinstance(spec["path"], list) else [spec["path"]]
            paths = [self._abs(str(p), base) for p in paths]
            directory = self._abs(str(spec.get("project_directory") or posixpath.dirname(paths[0])), base)
            env_files = spec.get("env_file")
            env_list = [
                self._abs(str(e), base)
                for e in ([env_files] if isinstance(env_files, str) else env_files or [])
            ]
            own = self.project_env(directory, {}, env_list or None)
            sub = _Project(directory, {**own, **project.env})  # the including project's values win
            included = self._project(paths, sub, chain)
            for section, items in included.items():
                if section not in ("services", "volumes", "networks", "configs", "secrets"):
                    continue
                mine = doc.setdefault(section, {})
                if not isinstance(items, dict) or not isinstance(mine, dict):
                    continue
                for key, value in items.items():
                    if key in mine and mine[key] != value:
                        raise ComposeError(
                            f"{path}: {section[:-1]} {key!r} is also defined by the included {paths[0]}"
                        )
                    mine[key] = value
        return doc

    def _project(self, paths: list[str], project: _Project, chain: tuple[str, ...] = ()) -> dict[str, Any]:
        """Files of one project loaded and merged in order."""
        merged: dict[str, Any] = {}
        for path in paths:
            if path in chain:
                raise ComposeError("include cycle: " + " -> ".join([*chain, path]))
            doc = self._load(path, project, project.directory)
            self._extends(doc, path, project)
            doc = self._include(doc, path, project, (*chain, path))
            merged = merge(merged, doc)
        return merged

    # --- the whole stack ---

    def resolve(self, paths: list[str], env: Mapping[str, str], profiles: tuple[str, ...] = ()) -> Resolved:
        """Resolve the stack made of ``paths`` (absolute, merged in order)."""
        self.root = posixpath.dirname(paths[0])
        if not profiles and env.get("COMPOSE_PROFILES"):  # as docker compose reads it (.env too)
            profiles = tuple(p.strip() for p in env["COMPOSE_PROFILES"].split(",") if p.strip())
        doc = strip_markers(self._project(paths, _Project(self.root, env)))
        services = doc.get("services")
        if isinstance(services, dict):
            for name in list(services):
                body = services[name]
                wanted = body.get("profiles") if isinstance(body, dict) else None
                if wanted and not set(map(str, wanted)) & set(profiles):
                    del services[name]
                    continue
                if isinstance(body, dict):
                    body.pop("profiles", None)
                    self._environment(name, body, env)
        self._inline_configs(doc, env)
        files = self._stack_paths(doc)
        if self.errors:
            raise ComposeError("\n".join(self.errors))
        if len(dump_yaml(doc).encode()) > MAX_BYTES:
            raise ComposeError(f"the resolved Compose file is larger than {MAX_BYTES // 1024} KiB")
        return Resolved(doc, files, self.warnings)

    def _environment(self, name: str, body: dict[str, Any], env: Mapping[str, str]) -> None:
        """``env_file`` inlined under ``environment`` (which wins); values without one looked up."""
        merged: dict[str, Any] = {}
        entries = body.pop("env_file", None) or []
        for entry in entries if isinstance(entries, list) else [entries]:
            path = entry.get("path") if isinstance(entry, dict) else None
            if not isinstance(path, str):
                continue
            data = self.fs.read(path)
            if data is None:
                if entry.get("required", True) is not False:
                    self.errors.append(f"service {name!r}: env_file {path} not found")
                continue
            try:
                if entry.get("format") == "raw":  # Compose's raw format: KEY=VALUE lines taken as they are
                    values = _raw_env(_text(data, path))
                else:
                    values = parse_env_file(_text(data, path), env.get, path, self.warnings)
            except ComposeError as exc:
                self.errors.append(f"service {name!r}: {exc}")
                continue
            merged.update({k: _esc(v, True) for k, v in values.items()})
        if "environment" in body or merged:
            own = _kv_map(body.get("environment") or {})
            for key, value in own.items():
                if value is None:
                    found = env.get(key)
                    if found is None:
                        merged.pop(key, None)
                        continue
                    value = _esc(found, True)
                merged[key] = value
            body["environment"] = merged

    def _inline_configs(self, doc: dict[str, Any], env: Mapping[str, str]) -> None:
        for section, kind in (("configs", "config"), ("secrets", "secret")):  # secrets are files too
            top = doc.get(section)
            for cname, body in top.items() if isinstance(top, dict) else ():
                if not isinstance(body, dict):
                    continue
                if isinstance(body.get("file"), str):
                    path = body.pop("file")
                    data = self.fs.read(path)
                    if data is None:
                        self.errors.append(f"{kind} {cname!r}: file {path} not found")
                        continue
                    body["content"] = _esc(_text(data, path), True)
                elif isinstance(body.get("environment"), str):
                    var = body.pop("environment")
                    value = env.get(var)
                    if value is None:
                        self.errors.append(f"{kind} {cname!r}: environment variable {var} is not set")
                        continue
                    body["content"] = _esc(value, True)

    def _stack_path(self, source: str) -> str:
        rel = posixpath.relpath(source, self.root)
        parts = rel.split("/")
        up = 0
        while up < len(parts) and parts[up] == "..":
            up += 1
        mapped = [PARENT] * up + parts[up:]
        return "./" + "/".join(p for p in mapped if p != ".") if rel != "." else "."

    def _stack_paths(self, doc: dict[str, Any]) -> dict[str, ShippedFile]:
        """Marked bind sources turned into stack paths; what exists beside the files shipped."""
        shipped: dict[str, ShippedFile] = {}
        sources: dict[str, str] = {}
        services = doc.get("services")
        for body in services.values() if isinstance(services, dict) else ():
            volumes = body.get("volumes") if isinstance(body, dict) else None
            if not isinstance(volumes, list):
                continue
            for i, entry in enumerate(volumes):
                if isinstance(entry, str) and entry.startswith("\x00"):
                    source, _, rest = entry[1:].partition(":")
                    stack = self._stack_path(source)
                    volumes[i] = f"{stack}:{rest}"
                elif isinstance(entry, dict) and str(entry.get("source", "")).startswith("\x00"):
                    source = entry["source"][1:]
                    stack = self._stack_path(source)
                    volumes[i] = {**entry, "source": stack}
                else:
                    continue
                sources[stack] = source
        total = 0
        for stack, source in sorted(sources.items()):
            kind = self.fs.kind(source)
            if kind is None:
                continue  # created empty on the device, as docker creates a missing source
            names = [""] if kind == "file" else self.fs.walk(source)
            base = stack[2:] if stack != "." else ""
            for name in names:
                full = posixpath.join(source, name) if name else source
                path = posixpath.join(base, name) if name else base
                if path in shipped:
                    continue
                data = self.fs.read(full)
                if data is None:
                    continue
                total += len(data)
                if total > MAX_SHIPPED_BYTES or len(shipped) >= MAX_SHIPPED_FILES:
                    raise ComposeError(
                        f"bind mount {stack}: the files shipped with the stack are larger than "
                        f"{MAX_SHIPPED_BYTES // 1024} KiB or more than {MAX_SHIPPED_FILES} files; "
                        "mount a smaller file or directory, or put large data on the device "
                        "(an absolute path or a named volume)"
                    )
                shipped[path] = ShippedFile(path, data, self.fs.mode(full) & 0o777)
        return shipped


def _raw_env(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value
    return out


def _text(data: bytes, path: str) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise ComposeError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
