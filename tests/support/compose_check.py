"""Check Compose files where ``docker compose config`` is unavailable: a structural subset.

:func:`check_compose` interpolates variables as Compose does and checks what a typo or a
moved file breaks: top-level and service keys, an image or a build context (and its
Dockerfile) for every service, named volumes, networks, secrets and configs declared,
bind-mounted files present, ``depends_on`` targets (and a health check where a service
waits for ``service_healthy``), health check shape, restart policies, ports, environment.
It returns a list of problems (empty: valid). It is no full implementation of the
Compose specification; ``docker compose config`` stays the reference where it exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

TOP_LEVEL = {"version", "name", "services", "volumes", "networks", "secrets", "configs", "include"}
SERVICE_KEYS = {
    "annotations", "build", "cap_add", "cap_drop", "cgroup", "cgroup_parent", "command", "configs",
    "container_name", "cpu_count", "cpu_percent", "cpu_shares", "cpus", "cpuset", "depends_on",
    "deploy", "develop", "device_cgroup_rules", "devices", "dns", "dns_opt", "dns_search",
    "domainname", "entrypoint", "env_file", "environment", "expose", "extends", "extra_hosts",
    "group_add", "healthcheck", "hostname", "image", "init", "ipc", "isolation", "labels", "links",
    "logging", "mac_address", "mem_limit", "mem_reservation", "mem_swappiness", "memswap_limit",
    "network_mode", "networks", "oom_kill_disable", "oom_score_adj", "pid", "pids_limit",
    "platform", "ports", "privileged", "profiles", "pull_policy", "read_only", "restart",
    "runtime", "scale", "secrets", "security_opt", "shm_size", "stdin_open", "stop_grace_period",
    "stop_signal", "storage_opt", "sysctls", "tmpfs", "tty", "ulimits", "user", "userns_mode",
    "uts", "volumes", "volumes_from", "working_dir",
}  # fmt: skip
BUILD_KEYS = {
    "context", "dockerfile", "dockerfile_inline", "args", "ssh", "cache_from", "cache_to",
    "additional_contexts", "extra_hosts", "isolation", "privileged", "labels", "no_cache", "pull",
    "network", "shm_size", "target", "secrets", "tags", "ulimits", "platforms",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval", "disable"}
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
DURATION_RE = re.compile(r"^(\d+(\.\d+)?(us|ms|s|m|h))+$")
RESTART_RE = re.compile(r"^(no|always|unless-stopped|on-failure(:\d+)?)$")
PORT_RE = re.compile(
    r"^((\[[0-9a-fA-F:.]+\]|[0-9.]+):)?"  # host ip
    r"((\d+(-\d+)?)?:)?"  # host port (or range), may be empty ("127.0.0.1::80")
    r"\d+(-\d+)?(/(tcp|udp|sctp))?$"
)
NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class InterpolationError(ValueError):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Substitute ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``,
    ``${VAR?err}``, ``${VAR:+alt}``, ``${VAR+alt}`` (nested in defaults too) and ``$$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value
    out: list[str] = []
    i = 0
    while i < len(value):
        char = value[i]
        if char != "$" or i + 1 == len(value):
            out.append(char)
            i += 1
        elif value[i + 1] == "$":
            out.append("$")
            i += 2
        elif value[i + 1] == "{":
            depth, j = 1, i + 2
            while j < len(value) and depth:
                if value.startswith("${", j):
                    depth, j = depth + 1, j + 2
                    continue
                if value[j] == "}":
                    depth -= 1
                j += 1
            if depth:
                raise InterpolationError(f"unterminated ${{ in {value!r}")
            out.append(_expand(value[i + 2 : j - 1], env))
            i = j
        elif m := NAME_RE.match(value, i + 1):
            out.append(env.get(m.group(0), ""))
            i = m.end()
        else:
            raise InterpolationError(f"invalid interpolation in {value!r} (use $$ for a literal $)")
    return "".join(out)


def _expand(expr: str, env: Mapping[str, str]) -> str:
    """One ``${...}`` expression (without the braces)."""
    m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?$", expr, re.S)
    if m is None:
        raise InterpolationError(f"invalid interpolation ${{{expr}}}")
    name, kind, arg = m.group(1), m.group(2) or "", m.group(3) or ""
    if not kind:
        return env.get(name, "")
    present = bool(env.get(name)) if kind.startswith(":") else name in env
    if kind.endswith("-"):
        return env[name] if present else str(interpolate(arg, env))
    if kind.endswith("+"):
        return str(interpolate(arg, env)) if present else ""
    if not present:  # "?" or ":?"
        raise InterpolationError(f"required variable {name} is missing: {interpolate(arg, env)}")
    return env[name]


def _is_mapping(value: Any) -> bool:
    return isinstance(value, dict)


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _names(value: Any) -> list[str]:
    """Names from a list of names or a mapping keyed by name."""
    if isinstance(value, dict):
        return [str(k) for k in value]
    if isinstance(value, list):
        return [v if isinstance(v, str) else str(v.get("source", "")) for v in value]
    return []


def _check_healthcheck(where: str, hc: Any, errors: list[str]) -> None:
    if not _is_mapping(hc):
        errors.append(f"{where}: healthcheck must be a mapping")
        return
    for key in set(hc) - HEALTHCHECK_KEYS:
        errors.append(f"{where}: unknown healthcheck key {key!r}")
    if hc.get("disable") is True:
        return
    test = hc.get("test")
    if isinstance(test, str):
        if not test.strip():
            errors.append(f"{where}: empty healthcheck test")
    elif _str_list(test) and test:
        if test[0] not in ("NONE", "CMD", "CMD-SHELL"):
            errors.append(f"{where}: healthcheck test list must start with CMD, CMD-SHELL or NONE")
        elif test[0] != "NONE" and len(test) < 2:
            errors.append(f"{where}: healthcheck test {test[0]} without a command")
    else:
        errors.append(f"{where}: healthcheck needs a test (a string or a list of strings)")
    for key in ("interval", "timeout", "start_period", "start_interval"):
        if key in hc and not (isinstance(hc[key], str) and DURATION_RE.match(hc[key])):
            errors.append(f"{where}: healthcheck {key} {hc[key]!r} is not a duration like 10s or 1m30s")
    if "retries" in hc and not (isinstance(hc["retries"], int) and hc["retries"] >= 0):
        errors.append(f"{where}: healthcheck retries must be a non-negative integer")


def _check_build(where: str, build: Any, base: Path, errors: list[str]) -> None:
    if isinstance(build, str):
        build = {"context": build}
    if not _is_mapping(build):
        errors.append(f"{where}: build must be a path or a mapping")
        return
    for key in set(build) - BUILD_KEYS:
        errors.append(f"{where}: unknown build key {key!r}")
    context_text = str(build.get("context", "."))
    if re.match(r"^[a-z][a-z0-9+.-]*://", context_text):
        return  # a remote context (git or http): nothing to check here
    context = (base / context_text).resolve()
    if not context.is_dir():
        errors.append(f"{where}: build context {context_text} ({context}) is not a directory")
        return
    if "dockerfile_inline" not in build:
        dockerfile = context / str(build.get("dockerfile", "Dockerfile"))
        if not dockerfile.is_file():
            errors.append(f"{where}: Dockerfile {dockerfile} does not exist")
        elif not re.search(r"^\s*FROM\s", dockerfile.read_text(), re.M | re.I):
            errors.append(f"{where}: {dockerfile} has no FROM instruction")


def _check_volumes(where: str, volumes: Any, declared: set[str], base: Path, errors: list[str]) -> None:
    if not isinstance(volumes, list):
        errors.append(f"{where}: volumes must be a list")
        return
    for item in volumes:
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) == 1:
                continue  # an anonymous volume
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        elif _is_mapping(item):
            source, target = str(item.get("source", "")), str(item.get("target", ""))
            kind = item.get("type", "volume")
        else:
            errors.append(f"{where}: volume entry {item!r} is neither a string nor a mapping")
            continue
        if not target.startswith("/"):
            errors.append(f"{where}: volume {item!r}: the target must be an absolute path")
        if kind == "volume" and source and source not in declared:
            errors.append(f"{where}: named volume {source!r} is not declared under top-level volumes")
        if kind == "bind" and source.startswith(".") and not (base / source).exists():
            errors.append(f"{where}: bind mount source {source} ({(base / source).resolve()}) is missing")


def _check_service(name: str, svc: Any, doc: dict[str, Any], base: Path, errors: list[str]) -> None:
    where = f"service {name}"
    if not _is_mapping(svc):
        errors.append(f"{where}: must be a mapping")
        return
    for key in set(svc) - SERVICE_KEYS:
        if not str(key).startswith("x-"):
            errors.append(f"{where}: unknown key {key!r}")
    if "image" not in svc and "build" not in svc and "extends" not in svc:
        errors.append(f"{where}: needs an image or a build")
    if "image" in svc and not (isinstance(svc["image"], str) and svc["image"].strip()):
        errors.append(f"{where}: image must be a non-empty string")
    if "build" in svc:
        _check_build(where, svc["build"], base, errors)
    for key in ("command", "entrypoint"):
        if key in svc and not (isinstance(svc[key], str) or _str_list(svc[key]) or svc[key] is None):
            errors.append(f"{where}: {key} must be a string or a list of strings")
    if "restart" in svc and not (isinstance(svc["restart"], str) and RESTART_RE.match(svc["restart"])):
        errors.append(
            f"{where}: restart {svc['restart']!r} is not no, always, on-failure[:N] or unless-stopped"
        )
    env = svc.get("environment")
    if env is not None:
        if isinstance(env, list):
            bad = [e for e in env if not isinstance(e, str) or not re.match(r"^[^=\s]+(=.*)?$", e, re.S)]
        elif _is_mapping(env):
            bad = [k for k, v in env.items() if isinstance(v, dict | list)]
        else:
            bad = [env]
        if bad:
            errors.append(f"{where}: invalid environment entries {bad!r}")
    for port in svc.get("ports") or []:
        if isinstance(port, int):
            continue
        if isinstance(port, str):
            if not PORT_RE.match(port):
                errors.append(f"{where}: port {port!r} is not [IP:][HOST:]CONTAINER[/PROTO]")
        elif not (_is_mapping(port) and "target" in port):
            errors.append(f"{where}: port {port!r} needs a target")
    if "healthcheck" in svc:
        _check_healthcheck(where, svc["healthcheck"], errors)
    if "volumes" in svc:
        _check_volumes(where, svc["volumes"], set(doc.get("volumes") or {}), base, errors)
    networks = set(doc.get("networks") or {}) | {"default"}
    if "networks" in svc:
        if not (isinstance(svc["networks"], list | dict)):
            errors.append(f"{where}: networks must be a list or a mapping")
        for net in _names(svc["networks"]):
            if net not in networks:
                errors.append(f"{where}: network {net!r} is not declared under top-level networks")
    if "network_mode" in svc and "networks" in svc:
        errors.append(f"{where}: network_mode and networks exclude each other")
    for kind in ("secrets", "configs"):
        for ref in _names(svc.get(kind)):
            if ref not in (doc.get(kind) or {}):
                errors.append(f"{where}: {kind[:-1]} {ref!r} is not declared under top-level {kind}")
    for env_file in [svc["env_file"]] if isinstance(svc.get("env_file"), str) else svc.get("env_file") or []:
        path = env_file if isinstance(env_file, str) else env_file.get("path", "")
        required = True if isinstance(env_file, str) else env_file.get("required", True)
        if required and not (base / path).is_file():
            errors.append(f"{where}: env_file {path} is missing")
    services = doc.get("services") or {}
    depends = svc.get("depends_on")
    if depends is not None:
        if isinstance(depends, list):
            items: dict[str, Any] = {str(d): {"condition": "service_started"} for d in depends}
        elif _is_mapping(depends):
            items = depends
        else:
            errors.append(f"{where}: depends_on must be a list or a mapping")
            items = {}
        for target, spec in items.items():
            if target not in services:
                errors.append(f"{where}: depends_on names unknown service {target!r}")
                continue
            if target == name:
                errors.append(f"{where}: depends on itself")
            condition = (spec or {}).get("condition", "service_started") if _is_mapping(spec) else None
            if condition not in DEPENDS_CONDITIONS:
                errors.append(f"{where}: depends_on {target}: unknown condition {condition!r}")
            target_hc = (services.get(target) or {}).get("healthcheck")
            if condition == "service_healthy" and (not target_hc or target_hc.get("disable")):
                errors.append(f"{where}: waits for {target} to be healthy, but {target} has no healthcheck")


def check_compose(path: Path, env: Mapping[str, str] | None = None) -> list[str]:
    """Problems in the Compose file at ``path`` (empty if none), after interpolation with ``env``."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        return [f"{path}: invalid YAML: {exc}"]
    if not _is_mapping(raw):
        return [f"{path}: the top level must be a mapping"]
    try:
        doc = interpolate(raw, env or {})
    except InterpolationError as exc:
        return [f"{path}: {exc}"]
    errors: list[str] = []
    for key in set(doc) - TOP_LEVEL:
        if not str(key).startswith("x-"):
            errors.append(f"unknown top-level key {key!r}")
    if "name" in doc and not re.match(r"^[a-z0-9][a-z0-9_-]*$", str(doc["name"])):
        errors.append(f"project name {doc['name']!r}: lowercase letters, digits, '-' and '_' only")
    services = doc.get("services")
    if not _is_mapping(services) or not services:
        errors.append("no services")
        services = {}
    for kind in ("volumes", "networks", "secrets", "configs"):
        section = doc.get(kind)
        if section is not None and not _is_mapping(section):
            errors.append(f"top-level {kind} must be a mapping")
            doc[kind] = {}
        for entry_name, entry in (doc.get(kind) or {}).items():
            if entry is not None and not _is_mapping(entry):
                errors.append(f"{kind[:-1]} {entry_name!r} must be empty or a mapping")
    for name, svc in services.items():
        _check_service(str(name), svc, doc, path.parent, errors)
    used: set[str] = set()
    for svc in services.values():
        for item in (svc or {}).get("volumes") or [] if _is_mapping(svc) else []:
            if isinstance(item, str) and ":" in item:
                used.add(item.split(":")[0])
            elif _is_mapping(item):
                used.add(str(item.get("source", "")))
    for volume in doc.get("volumes") or {}:
        if volume not in used:
            errors.append(f"volume {volume!r} is declared but no service uses it")
    return [f"{path.name}: {e}" for e in errors]


def compose_command() -> list[str] | None:
    """``docker compose`` (the plugin) or ``docker-compose`` v2, whichever answers; None if neither."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for argv in candidates:
        if shutil.which(argv[0]) is None:
            continue
        result = subprocess.run([*argv, "version"], capture_output=True, text=True, check=False)
        if result.returncode == 0 and "version" in result.stdout.lower():
            return argv
    return None
