"""Compose files people already have, measured: how many Tether accepts, and with which meaning.

    .venv/bin/python bench/compose_corpus.py CORPUS_DIR [--docker-compose PATH] [--json OUT]

CORPUS_DIR holds one directory per Compose file (gathered by whoever measures; nothing of it
is in this repository), each with the file, whatever lies beside it (``.env``, included or
extended files) and ``SOURCE.json``: ``{"file": "compose.yaml", "iot": 1, "env": {...}}``
(``iot``: an IoT/edge stack; ``env``: variables the project's documentation tells its users
to set). For every entry, on a fresh copy:

* **stand-ins**: an empty file for each ``env_file``, ``configs`` or ``secrets`` file the
  corpus lacks (docker compose needs them as much as Tether does); missing bind mount
  sources stay missing (both create them);
* **the oracle**, when ``--docker-compose`` names a docker compose v2 binary: ``config
  --format json`` with the same environment says whether the file is valid Compose, and
  gives its model; on top of it, what the engine refuses at ``up`` though ``config``
  passes (a mount target that is not absolute, two mounts at one target);
* **Tether**, the path of ``tether stacks deploy --dry-run``: the CLI's resolution
  (cli/compose_files.resolve_files), the ``StacksPlan`` wire model, the controller's
  parse_stack_warnings; once accepted, the device's side: the default ``host_access``
  policy, relative bind mounts placed in a real agent store, and the docker driver's
  container plan of every service;
* **all problems at once**: a file refused only for ``build`` without ``image`` is fixed as
  the one reply says (a prebuilt image named for each service it lists) and deployed again;
* **same meaning**: Tether's stack definition and docker compose's model compared key by
  key (environment, ports, volumes, command, devices, capabilities, user, network mode,
  healthcheck test, limits, logging, networks and aliases, ...).

It prints one line per file (accepted, refused with every problem, invalid for Compose
too) and the totals: accepted / valid Compose, for all files and for the IoT/edge ones.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import traceback
from pathlib import Path
from typing import Any

import yaml
from tether.agent.drivers.docker_spec import plan_container
from tether.agent.policy import HostAccess, refusals
from tether.agent.store import LocalStore
from tether.cli.compose_files import resolve_files
from tether.controller.compose import parse_stack_warnings
from tether.protocol.commands import StacksPlan
from tether.protocol.compose_yaml import dump_yaml
from tether.protocol.errors import TetherError
from tether.protocol.models import StackSpec

BUILD_ONLY = "build without image"


def stand_ins(workdir: Path, fname: str) -> list[str]:
    """Empty files for the env_file / configs / secrets files the corpus lacks."""
    try:
        doc = yaml.safe_load((workdir / fname).read_text())
    except Exception:  # noqa: BLE001 - an unreadable file is for the oracle and Tether to judge
        return []
    if not isinstance(doc, dict):
        return []
    wanted = []
    for body in (doc.get("services") or {}).values():
        if not isinstance(body, dict):
            continue
        env_file = body.get("env_file")
        for e in [env_file] if isinstance(env_file, str | dict) else env_file or []:
            path = e.get("path") if isinstance(e, dict) else e
            if isinstance(path, str):
                wanted.append(path)
    for section in ("configs", "secrets"):
        for body in (doc.get(section) or {}).values():
            if isinstance(body, dict) and isinstance(body.get("file"), str):
                wanted.append(body["file"])
    made = []
    for path in wanted:
        full = (workdir / path).resolve()
        if not full.exists() and full.is_relative_to(workdir.resolve()):
            full.parent.mkdir(parents=True, exist_ok=True)
            full.write_text("")
            made.append(path)
    return made


def engine_problems(model: dict[str, Any]) -> list[str]:
    """What the engine refuses at ``docker compose up`` though ``config`` passes."""
    out = []
    for name, svc in (model.get("services") or {}).items():
        targets = [v["target"].rstrip("/") or "/" for v in svc.get("volumes") or []]
        out += [
            f"{name}: Duplicate mount point: {t}"
            for t in sorted({t for t in targets if targets.count(t) > 1})
        ]
        out += [f"{name}: mount path must be absolute: {t}" for t in targets if not t.startswith("/")]
    return out


def oracle(binary: str, workdir: Path, fname: str, env: dict[str, str]) -> dict[str, Any]:
    r = subprocess.run(
        [binary, "-f", fname, "config", "--format", "json"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if r.returncode != 0:
        lines = [line for line in r.stderr.splitlines() if "level=warning" not in line]
        return {"valid": False, "error": " | ".join(lines)[:400]}
    model = json.loads(r.stdout)
    engine = engine_problems(model)
    if engine:
        return {"valid": False, "error": "docker compose up: " + "; ".join(engine)}
    return {"valid": True, "model": model}


def tether(workdir: Path, fname: str, env: dict[str, str], agent_dir: Path) -> dict[str, Any]:
    """The path of `tether stacks deploy --dry-run`, then the device's side."""
    from pydantic import ValidationError

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(workdir)
    stage = "resolve"
    try:
        resolved = resolve_files([fname])
        text = dump_yaml(resolved.doc)
        shipped = tuple(f.wire() for _, f in sorted(resolved.files.items()))
        stage = "wire"
        cmd = StacksPlan(name="corpus", group="g", compose=text, files=shipped)
        stage = "controller"
        spec, _placement, warnings = parse_stack_warnings(cmd.compose, cmd.files)
        stage = "device"
        refused = refusals(spec, HostAccess())
        sources = {v.source for s in spec.services for v in s.volumes if v.type == "stack"}
        placed = LocalStore(agent_dir).stack_paths("corpus", sources, spec.files) if sources else {}
        for s in spec.services:
            vols = tuple(
                v.model_copy(update={"source": placed[v.source]}) if v.type == "stack" else v
                for v in s.volumes
            )
            plan_container("dev1", "corpus", spec, s.model_copy(update={"volumes": vols}), {})
        return {
            "accepted": not refused,
            "stage": "device" if refused else "ok",
            "errors": refused,
            "warnings": warnings + resolved.warnings,
            "spec": spec,
        }
    except (TetherError, ValidationError, ValueError) as exc:
        problems = getattr(exc, "problems", None) or str(exc).splitlines()
        return {"accepted": False, "stage": stage, "errors": [str(p) for p in problems]}
    except Exception as exc:  # noqa: BLE001 - a crash is a finding too
        return {
            "accepted": False,
            "stage": f"{stage} (crash)",
            "errors": [repr(exc), traceback.format_exc()[-800:]],
        }
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)


def _target(path: str) -> str:
    return path.rstrip("/") or "/"


def compare(model: dict[str, Any], spec: StackSpec) -> list[str]:
    """Where Tether's definition and docker compose's model differ in meaning."""
    diffs: list[str] = []
    services = model.get("services", {})
    for s in spec.services:
        c = services.get(s.name)
        if c is None:
            diffs.append(f"{s.name}: not in docker compose's model")
            continue

        def check(key: str, theirs: Any, ours: Any, name: str = s.name) -> None:
            if theirs != ours:
                diffs.append(f"{name}.{key}: compose {theirs!r} / tether {ours!r}")

        check(
            "environment",
            {k: v for k, v in (c.get("environment") or {}).items() if v is not None},
            s.environment,
        )
        if c.get("network_mode") != "host":  # the engine discards published ports on the host network
            check(
                "ports",
                sorted(
                    (
                        p.get("host_ip") or "",
                        str(p.get("published") or ""),
                        int(p["target"]),
                        p.get("protocol") or "tcp",
                    )
                    for p in c.get("ports") or []
                ),
                sorted((p.host_ip or "", str(p.host or ""), p.container, p.protocol) for p in s.ports),
            )
        check(
            "volumes",
            sorted(
                (_target(v["target"]), v["type"], bool(v.get("read_only"))) for v in c.get("volumes") or []
            ),
            sorted(
                (_target(v.target), "bind" if v.type == "stack" else v.type, v.read_only) for v in s.volumes
            ),
        )
        check("command", c.get("command"), list(s.command) if s.command is not None else None)
        check("entrypoint", c.get("entrypoint"), list(s.entrypoint) if s.entrypoint is not None else None)
        check(
            "devices",
            sorted(
                (d["source"], d.get("target") or d["source"], d.get("permissions") or "rwm")
                for d in c.get("devices") or []
            ),
            sorted((d.source, d.target, d.permissions) for d in s.devices),
        )
        # capability names are case-insensitive for the engine ('all' is ALL)
        check("cap_add", sorted(x.upper() for x in c.get("cap_add") or []), sorted(s.cap_add))
        check("cap_drop", sorted(x.upper() for x in c.get("cap_drop") or []), sorted(s.cap_drop))
        check("privileged", bool(c.get("privileged")), s.privileged)
        check(
            "network_mode", c.get("network_mode") or "", "" if s.network_mode == "bridge" else s.network_mode
        )
        check("user", c.get("user"), s.user)
        check("read_only", bool(c.get("read_only")), s.read_only)
        check("tty", bool(c.get("tty")), s.tty)
        check("security_opt", sorted(c.get("security_opt") or []), sorted(s.security_opt))
        check("sysctls", {k: str(v) for k, v in (c.get("sysctls") or {}).items()}, s.sysctls)
        check("group_add", [str(g) for g in c.get("group_add") or []], list(s.group_add))
        check("dns", c.get("dns") or [], list(s.dns))
        check(
            "extra_hosts",
            sorted(h.replace("=", ":", 1) for h in c.get("extra_hosts") or []),
            sorted(s.extra_hosts),
        )
        check("shm_size", int(c["shm_size"]) if c.get("shm_size") else None, s.shm_size)
        check("stop_signal", c.get("stop_signal"), s.stop_signal)
        check("hostname", c.get("hostname"), s.hostname)
        restart = c.get("restart") or "no"
        check(
            "restart",
            "always" if restart == "unless-stopped" else restart,
            "always" if s.restart == "unless-stopped" else s.restart,
        )
        hc = c.get("healthcheck")
        if hc and not hc.get("disable"):
            check("healthcheck.test", hc.get("test"), list(s.healthcheck.test) if s.healthcheck else None)
        limits = ((c.get("deploy") or {}).get("resources") or {}).get("limits") or {}
        if limits.get("memory") or c.get("mem_limit"):
            check("memory limit", int(limits.get("memory") or c.get("mem_limit")), s.mem_limit)
        if c.get("logging"):
            lg = c["logging"]
            check(
                "logging",
                (lg.get("driver"), lg.get("options") or {}),
                (s.logging.driver, s.logging.options) if s.logging else None,
            )
        nets = c.get("networks")
        if nets and s.network_mode == "bridge":
            check("networks", sorted(nets), sorted(s.networks) if s.networks else ["default"])
            aliases = sorted(a for n in nets.values() if n for a in n.get("aliases") or [])
            ours = sorted(a for n in s.networks.values() for a in n.aliases)
            if not set(aliases) <= set(ours):
                check("aliases", aliases, ours)
    return diffs


def measure(entry: Path, work: Path, compose_binary: str | None) -> dict[str, Any]:
    meta = json.loads((entry / "SOURCE.json").read_text())
    fname = meta["file"]
    workdir = work / entry.name / "project"
    shutil.copytree(entry, workdir)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work / "home"), **meta.get("env", {})}
    made = stand_ins(workdir, fname)
    o = oracle(compose_binary, workdir, fname, env) if compose_binary else {"valid": True, "model": None}
    t = tether(workdir, fname, env, work / entry.name / "agent")
    diffs = compare(o["model"], t["spec"]) if o.get("model") and t.get("spec") is not None else []
    if not o["valid"]:
        cls = "invalid for Compose too" if not t["accepted"] else "ACCEPTED BUT INVALID FOR COMPOSE"
    elif t["accepted"]:
        cls = "accepted"
    elif t["errors"] and all(BUILD_ONLY in e for e in t["errors"]):
        cls = "refused by design (build only)"
    else:
        cls = "refused"
    second = None
    if cls == "refused by design (build only)":
        doc = yaml.safe_load((workdir / fname).read_text())
        for svc in re.findall(rf"service '([^']+)': build: {BUILD_ONLY}", "\n".join(t["errors"])):
            doc["services"][svc]["image"] = f"registry.example/{svc}:1"
        (workdir / fname).write_text(yaml.safe_dump(doc, sort_keys=False))
        again = tether(workdir, fname, env, work / entry.name / "agent2")
        second = {"accepted": again["accepted"], "errors": again["errors"]}
    return {
        "name": entry.name,
        "iot": bool(meta.get("iot")),
        "class": cls,
        "stage": t["stage"],
        "errors": t["errors"],
        "warnings": t.get("warnings", []),
        "compose_error": o.get("error"),
        "stand_ins": made,
        "diffs": diffs,
        "second_round": second,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path, help="a directory of NAME/{compose file, SOURCE.json}")
    ap.add_argument("--docker-compose", help="a docker compose v2 binary: the oracle (none: Tether alone)")
    ap.add_argument("--only", nargs="*", help="these entries only")
    ap.add_argument("--json", type=Path, help="write every result here")
    args = ap.parse_args()
    entries = sorted(p for p in args.corpus.iterdir() if (p / "SOURCE.json").is_file())
    if args.only:
        entries = [e for e in entries if e.name in args.only]
    with tempfile.TemporaryDirectory(prefix="compose-corpus-") as tmp:
        rows = [measure(entry, Path(tmp), args.docker_compose) for entry in entries]
    for r in rows:
        print(f"{r['class']:<34} {'IoT' if r['iot'] else '   '} {r['name']}")
        if r["compose_error"]:
            print(f"      compose: {r['compose_error'][:300]}")
        if r["class"] != "accepted":
            for e in r["errors"]:
                print(f"      - [{r['stage']}] {e[:300]}")
        for w in r["warnings"]:
            if "variable is not set" not in w:
                print(f"      warning: {w[:300]}")
        for d in r["diffs"]:
            print(f"      differs: {d[:300]}")
    valid = [r for r in rows if not r["class"].startswith("invalid")]
    accepted = [r for r in valid if r["class"] == "accepted"]
    design = [r for r in valid if r["class"].startswith("refused by design")]
    iot = [r for r in valid if r["iot"]]
    print()
    print(
        f"files: {len(rows)} ({sum(r['iot'] for r in rows)} IoT/edge); valid Compose: {len(valid)} ({len(iot)} IoT/edge)"
    )
    print(f"accepted: {len(accepted)}/{len(valid)}; IoT/edge: {sum(r['iot'] for r in accepted)}/{len(iot)}")
    print(
        f"accepted or refused only for build without image: {len(accepted) + len(design)}/{len(valid)}; "
        f"IoT/edge: {sum(r['iot'] for r in accepted + design)}/{len(iot)}"
    )
    print(
        f"accepted with the same meaning on every compared key: {sum(not r['diffs'] for r in accepted)}/{len(accepted)}"
    )
    if design:
        print(
            f"refused for build only, then fixed as the one reply says: accepted on the second deploy "
            f"{sum(bool(r['second_round'] and r['second_round']['accepted']) for r in design)}/{len(design)}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
