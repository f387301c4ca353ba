"""The structure of a Compose file, as a JSON Schema (draft 7) checked with ``jsonschema``.

Written for Tether from the Compose Specification (https://github.com/compose-spec/compose-spec),
not copied from its schema file: docs/adr/0005-compose-schema.md says why. It knows every
key the specification defines, so a typo or a value of the wrong type reads as it does in
``docker compose`` (``services.web.ports.0: ...``), all problems at once. Whether Tether
*runs* a key that is structurally valid is decided afterwards, in :mod:`.compose`.

Pure: :func:`structural_problems` takes the loaded document and returns messages.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from jsonschema import Draft7Validator
from jsonschema.exceptions import ValidationError

NAME_KEY = r"^[a-zA-Z0-9._-]+$"
X: dict[str, Any] = {"^x-": {}}

STR: dict[str, Any] = {"type": "string"}
BOOL: dict[str, Any] = {"type": ["boolean", "string"]}
INT: dict[str, Any] = {"type": ["integer", "string"]}
NUM: dict[str, Any] = {"type": ["number", "string"]}
SIZE: dict[str, Any] = {"type": ["string", "integer"]}
LIST_OF_STR: dict[str, Any] = {"type": "array", "items": STR, "uniqueItems": True}
STR_OR_LIST: dict[str, Any] = {"oneOf": [STR, LIST_OF_STR]}
SCALAR: dict[str, Any] = {"type": ["string", "number", "boolean", "null"]}
LIST_OR_DICT: dict[str, Any] = {
    "oneOf": [
        {"type": "object", "patternProperties": {".+": SCALAR}, "additionalProperties": False},
        {"type": "array", "items": STR, "uniqueItems": True},
    ]
}
COMMAND: dict[str, Any] = {
    "oneOf": [{"type": "null"}, STR, {"type": "array", "items": {"type": ["string", "number"]}}]
}
DURATION: dict[str, Any] = {"type": ["string", "number"]}


def obj(props: dict[str, Any], required: tuple[str, ...] = (), extensions: bool = True) -> dict[str, Any]:
    """A map with exactly these keys (and ``x-*`` where the specification allows them)."""
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if extensions:
        out["patternProperties"] = X
    if required:
        out["required"] = list(required)
    return out


def named(item: dict[str, Any]) -> dict[str, Any]:
    """A map from names (letters, digits, ``.``, ``_``, ``-``) to ``item``."""
    return {"type": "object", "patternProperties": {NAME_KEY: item}, "additionalProperties": False}


def nullable(item: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [{"type": "null"}, item]}


BLKIO_LIMIT = obj({"path": STR, "rate": SIZE}, extensions=False)
BLKIO_WEIGHT = obj({"path": STR, "weight": INT}, extensions=False)
DEVICE_REQUEST = obj(
    {
        "capabilities": LIST_OF_STR,
        "count": {"type": ["string", "integer"]},
        "device_ids": LIST_OF_STR,
        "driver": STR,
        "options": LIST_OR_DICT,
    }
)
RESOURCE = obj(
    {
        "cpus": NUM,
        "memory": STR,
        "pids": INT,
        "devices": {"type": "array", "items": DEVICE_REQUEST},
        "generic_resources": {"type": "array"},
    }
)
DEPLOY = nullable(
    obj(
        {
            "mode": STR,
            "endpoint_mode": STR,
            "replicas": INT,
            "labels": LIST_OR_DICT,
            "rollback_config": {"type": "object"},
            "update_config": {"type": "object"},
            "resources": obj({"limits": RESOURCE, "reservations": RESOURCE}),
            "restart_policy": obj({"condition": STR, "delay": STR, "max_attempts": INT, "window": STR}),
            "placement": {"type": "object"},
        }
    )
)
HEALTHCHECK = obj(
    {
        "disable": BOOL,
        "interval": DURATION,
        "retries": NUM,
        "test": {"oneOf": [STR, {"type": "array", "items": STR}]},
        "timeout": DURATION,
        "start_period": DURATION,
        "start_interval": DURATION,
    }
)
CONFIG_OR_SECRET_MOUNT = {
    "type": "array",
    "items": {
        "oneOf": [
            STR,
            obj({"source": STR, "target": STR, "uid": STR, "gid": STR, "mode": NUM}),
        ]
    },
}
PORT_LONG = obj(
    {
        "name": STR,
        "mode": STR,
        "host_ip": STR,
        "target": INT,
        "published": {"type": ["string", "integer"]},
        "protocol": STR,
        "app_protocol": STR,
    }
)
VOLUME_LONG = obj(
    {
        "type": {"type": "string", "enum": ["bind", "volume", "tmpfs", "cluster", "npipe", "image"]},
        "source": STR,
        "target": STR,
        "read_only": BOOL,
        "consistency": STR,
        "bind": obj({"propagation": STR, "create_host_path": BOOL, "recursive": STR, "selinux": STR}),
        "volume": obj({"nocopy": BOOL, "subpath": STR, "labels": LIST_OR_DICT}),
        "tmpfs": obj({"size": SIZE, "mode": NUM}),
        "image": obj({"subpath": STR}),
    },
    required=("type",),
)
ULIMITS = {
    "type": "object",
    "patternProperties": {
        "^[a-z]+$": {
            "oneOf": [INT, obj({"hard": INT, "soft": INT}, required=("soft", "hard"))],
        }
    },
    "additionalProperties": False,
}
DEPENDS_ON = {
    "oneOf": [
        LIST_OF_STR,
        named(nullable(obj({"condition": STR, "restart": BOOL, "required": BOOL}))),
    ]
}
SERVICE_NETWORKS = {
    "oneOf": [
        LIST_OF_STR,
        named(
            nullable(
                obj(
                    {
                        "aliases": LIST_OF_STR,
                        "ipv4_address": STR,
                        "ipv6_address": STR,
                        "link_local_ips": LIST_OF_STR,
                        "mac_address": STR,
                        "driver_opts": {"type": "object"},
                        "priority": {"type": "number"},
                        "gw_priority": {"type": "number"},
                        "interface_name": STR,
                    }
                )
            )
        ),
    ]
}

SERVICE_PROPERTIES: dict[str, Any] = {
    "annotations": LIST_OR_DICT,
    "attach": BOOL,
    "blkio_config": obj(
        {
            "device_read_bps": {"type": "array", "items": BLKIO_LIMIT},
            "device_read_iops": {"type": "array", "items": BLKIO_LIMIT},
            "device_write_bps": {"type": "array", "items": BLKIO_LIMIT},
            "device_write_iops": {"type": "array", "items": BLKIO_LIMIT},
            "weight": INT,
            "weight_device": {"type": "array", "items": BLKIO_WEIGHT},
        },
        extensions=False,
    ),
    "build": {"oneOf": [STR, {"type": "object"}]},
    "cap_add": LIST_OF_STR,
    "cap_drop": LIST_OF_STR,
    "cgroup": {"type": "string", "enum": ["host", "private"]},
    "cgroup_parent": STR,
    "command": COMMAND,
    "configs": CONFIG_OR_SECRET_MOUNT,
    "container_name": STR,
    "cpu_count": INT,
    "cpu_percent": INT,
    "cpu_shares": NUM,
    "cpu_quota": NUM,
    "cpu_period": NUM,
    "cpu_rt_period": NUM,
    "cpu_rt_runtime": NUM,
    "cpus": NUM,
    "cpuset": STR,
    "credential_spec": {"type": "object"},
    "depends_on": DEPENDS_ON,
    "deploy": DEPLOY,
    "develop": nullable({"type": "object"}),
    "device_cgroup_rules": LIST_OF_STR,
    "devices": {
        "type": "array",
        "items": {
            "oneOf": [STR, obj({"source": STR, "target": STR, "permissions": STR}, required=("source",))]
        },
    },
    "dns": STR_OR_LIST,
    "dns_opt": LIST_OF_STR,
    "dns_search": STR_OR_LIST,
    "domainname": STR,
    "entrypoint": COMMAND,
    "env_file": {"oneOf": [STR, {"type": "array"}]},
    "label_file": STR_OR_LIST,
    "environment": LIST_OR_DICT,
    "expose": {"type": "array", "items": {"type": ["string", "number"]}, "uniqueItems": True},
    "extends": {"oneOf": [STR, {"type": "object"}]},
    "external_links": LIST_OF_STR,
    "extra_hosts": {
        "oneOf": [
            {"type": "array", "items": STR, "uniqueItems": True},
            {"type": "object", "patternProperties": {".+": {"oneOf": [STR, LIST_OF_STR]}}},
        ]
    },
    "gpus": {"oneOf": [{"type": "string", "enum": ["all"]}, {"type": "array", "items": DEVICE_REQUEST}]},
    "group_add": {"type": "array", "items": {"type": ["string", "number"]}, "uniqueItems": True},
    "healthcheck": HEALTHCHECK,
    "hostname": STR,
    "image": STR,
    "init": BOOL,
    "ipc": STR,
    "isolation": STR,
    "labels": LIST_OR_DICT,
    "links": LIST_OF_STR,
    "logging": obj({"driver": STR, "options": {"type": "object", "patternProperties": {"^.+$": SCALAR}}}),
    "mac_address": STR,
    "mem_limit": {"type": ["number", "string"]},
    "mem_reservation": {"type": ["string", "integer"]},
    "mem_swappiness": INT,
    "memswap_limit": {"type": ["number", "string"]},
    "models": {"type": ["object", "array"]},
    "network_mode": STR,
    "networks": SERVICE_NETWORKS,
    "oom_kill_disable": BOOL,
    "oom_score_adj": INT,
    "pid": nullable(STR),
    "pids_limit": NUM,
    "platform": STR,
    "ports": {
        "type": "array",
        "items": {"oneOf": [{"type": "number"}, STR, PORT_LONG]},
    },
    "post_start": {"type": "array"},
    "pre_stop": {"type": "array"},
    "privileged": BOOL,
    "profiles": LIST_OF_STR,
    "provider": {"type": "object"},
    "pull_policy": STR,
    "pull_refresh_after": STR,
    "read_only": BOOL,
    "restart": {"type": ["string", "boolean"]},
    "runtime": STR,
    "scale": INT,
    "security_opt": LIST_OF_STR,
    "shm_size": {"type": ["number", "string"]},
    "secrets": CONFIG_OR_SECRET_MOUNT,
    "sysctls": LIST_OR_DICT,
    "stdin_open": BOOL,
    "stop_grace_period": DURATION,
    "stop_signal": STR,
    "storage_opt": {"type": "object"},
    "tmpfs": STR_OR_LIST,
    "tty": BOOL,
    "ulimits": ULIMITS,
    "use_api_socket": {"type": "boolean"},
    "user": STR,
    "uts": STR,
    "userns_mode": STR,
    "volumes": {"type": "array", "items": {"oneOf": [STR, VOLUME_LONG]}, "uniqueItems": True},
    "volumes_from": LIST_OF_STR,
    "working_dir": STR,
}

EXTERNAL = {"oneOf": [BOOL, obj({"name": STR}, extensions=False)]}
IPAM = obj(
    {
        "driver": STR,
        "config": {
            "type": "array",
            "items": obj(
                {"subnet": STR, "ip_range": STR, "gateway": STR, "aux_addresses": {"type": "object"}}
            ),
        },
        "options": {"type": "object", "patternProperties": {"^.+$": STR}},
    }
)
NETWORK = nullable(
    obj(
        {
            "name": STR,
            "driver": STR,
            "driver_opts": {"type": "object", "patternProperties": {"^.+$": {"type": ["string", "number"]}}},
            "ipam": IPAM,
            "external": EXTERNAL,
            "internal": BOOL,
            "enable_ipv4": BOOL,
            "enable_ipv6": BOOL,
            "attachable": BOOL,
            "labels": LIST_OR_DICT,
        }
    )
)
VOLUME = nullable(
    obj(
        {
            "name": STR,
            "driver": STR,
            "driver_opts": {"type": "object", "patternProperties": {"^.+$": {"type": ["string", "number"]}}},
            "external": EXTERNAL,
            "labels": LIST_OR_DICT,
        }
    )
)
CONFIG_OR_SECRET = obj(
    {
        "name": STR,
        "content": STR,
        "environment": STR,
        "file": STR,
        "external": EXTERNAL,
        "labels": LIST_OR_DICT,
        "driver": STR,
        "driver_opts": {"type": "object"},
        "template_driver": STR,
    }
)

SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "properties": {
        "version": SCALAR,
        "name": STR,
        "include": {"type": "array"},
        "services": named(obj(SERVICE_PROPERTIES)),
        "networks": named(NETWORK),
        "volumes": named(VOLUME),
        "secrets": named(CONFIG_OR_SECRET),
        "configs": named(CONFIG_OR_SECRET),
        "models": {"type": "object"},
    },
    "patternProperties": X,
    "additionalProperties": False,
}


@cache
def _validator() -> Draft7Validator:
    # SCHEMA is this module's constant: that it is a valid draft-7 schema is checked by
    # tests/test_compose_keys.py, not at run time (checking it took a controller's first
    # deploy 20 ms, more than validating a Compose file).
    return Draft7Validator(SCHEMA)


_TYPE_WORDS: dict[str, str] = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "array": "a list",
    "object": "a map",
    "null": "empty",
}


def _describe(error: ValidationError) -> tuple[tuple[str | int, ...], str]:
    """One error as Compose words it: (path, ``must be a string or a number``)."""
    path = tuple(error.absolute_path)
    if error.validator == "additionalProperties":
        patterns = error.schema.get("patternProperties", {})
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        extra = [k for k in extra if not any(re.search(p, k) for p in patterns)]
        names = ", ".join(repr(k) for k in extra)
        what = "property" if len(extra) == 1 else "properties"
        return path, f"additional {what} {names} not allowed"
    if error.validator == "type":
        types = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return path, f"must be {' or '.join(_TYPE_WORDS.get(t, str(t)) for t in types)}"
    if error.validator == "oneOf" and error.context:
        # The alternative of the value's own type (a map given as a map) says what is wrong in it.
        by_branch: dict[Any, list[ValidationError]] = {}
        for sub in error.context:
            by_branch.setdefault(sub.schema_path[0], []).append(sub)
        fitting = [
            subs
            for subs in by_branch.values()
            if not any(e.validator == "type" and len(e.relative_path) == 0 for e in subs)
        ]
        if len(fitting) == 1:
            return _describe(min(fitting[0], key=lambda e: len(e.absolute_path)))
        kinds = [_kind(s) for s in error.validator_value]
        kinds = [k for i, k in enumerate(kinds) if k and k not in kinds[:i]]
        if kinds:
            return path, f"must be {' or '.join(kinds)}"
    if error.validator == "enum":
        return path, f"must be one of {', '.join(map(str, error.validator_value))}, not {error.instance!r}"
    if error.validator == "uniqueItems":
        return path, "has duplicate items"
    return path, error.message


def _kind(schema: dict[str, Any]) -> str:
    t = schema.get("type")
    if t is None and "oneOf" in schema:
        return " or ".join(k for k in (_kind(s) for s in schema["oneOf"]) if k)
    if isinstance(t, list):
        return " or ".join(_TYPE_WORDS.get(x, str(x)) for x in t)
    return _TYPE_WORDS.get(t, "") if isinstance(t, str) else ""


def structural_problems(doc: Any) -> list[tuple[tuple[str | int, ...], str]]:
    """Every structural problem of ``doc``: (path, message), in document order."""
    found = []
    for error in _validator().iter_errors(doc):
        found.append(_describe(error))
    found.sort(key=lambda item: [str(p) for p in item[0]])
    return found
