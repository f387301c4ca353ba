"""The process driver: service instances are supervised host processes (no Docker).

A service's ``entrypoint`` + ``command`` is run directly on the host with its
``environment`` added to the agent's, in its own session (so it outlives an agent restart),
stdout and stderr appended to ``{data_dir}/processes/{stack}.{service}.log`` (a new instance,
like a new container, starts a new log; the previous instance's is kept as ``.log.1``). Each
instance is recorded in ``{data_dir}/processes/{stack}.{service}.json`` with its pid and the
kernel's start time of that pid, so a restarted agent re-attaches to processes that still
run and never mistakes a recycled pid for its own. Images, ports, named volumes, absolute
bind mounts and networks do not apply (every process shares the host network, like
``network_mode: host``); relative bind mounts and configs are links in its working directory.

A record that cannot be written (a full disk, a read-only file system) is kept in memory,
used as if written, and written at the next :meth:`ProcessDriver.observe` that can: the
processes stay supervised; only an agent restart before then loses track of them.

Of the other Compose keys, what applies to a process is applied: ``user`` (and ``group_add``;
the agent must run as root to switch), ``working_dir``, ``environment``, ``stop_signal``,
``stop_grace_period``, ``ulimits``, ``healthcheck``, ``restart``, ``depends_on``, ``configs``
and ``secrets``. A stack using a key that only means something for a container is refused on
the device, naming every such key (:meth:`ProcessDriver.unsupported`).
"""

from __future__ import annotations

import codecs
import contextlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tether.agent.store import atomic_write
from tether.protocol.errors import DriverError
from tether.protocol.models import HealthcheckSpec, HealthState, JobSpec, ServiceSpec, StackSpec

from .base import HEALTH_OUTPUT_CHARS, Observed

log = logging.getLogger(__name__)

_SIGTERM = signal.SIGTERM
_SETRLIMIT_EXEC = (
    "import json, os, resource, sys\n"
    "for which, soft, hard in json.loads(sys.argv[1]):\n"
    "    resource.setrlimit(which, (soft, hard))\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)
"""Run by the service's own process: its ``ulimits``, then ``exec`` of its command (same pid)."""

FOLLOW_POLL_S = 0.25
"""How often a followed log file is checked for growth."""
TAIL_WINDOW = 4 * 1024 * 1024
"""Most bytes read back from the end of a log file to find its last lines."""


def _proc_start_ticks(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except OSError:
        return None
    # Field 22; the command name (field 2) may contain spaces, so split after its ')'.
    fields = data[data.rfind(")") + 2 :].split()
    try:
        if fields[0] == "Z":
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


CONTAINER_ONLY = (
    "container_name",
    "hostname",
    "domainname",
    "networks",
    "links",
    "expose",
    "privileged",
    "read_only",
    "init",
    "tty",
    "stdin_open",
    "cap_add",
    "cap_drop",
    "security_opt",
    "devices",
    "device_cgroup_rules",
    "tmpfs",
    "dns",
    "dns_search",
    "dns_opt",
    "extra_hosts",
    "sysctls",
    "shm_size",
    "platform",
    "pid",
    "ipc",
    "userns_mode",
    "cgroup",
    "runtime",
    "mac_address",
    "mem_limit",
    "mem_reservation",
    "memswap_limit",
    "mem_swappiness",
    "oom_kill_disable",
    "oom_score_adj",
    "cpus",
    "cpu_shares",
    "cpu_period",
    "cpu_quota",
    "cpuset",
    "pids_limit",
    "gpus",
    "logging",
)
"""ServiceSpec fields that only a container runtime can apply."""


class ProcessDriver:
    """Runs services as host processes, supervised by the agent."""

    def unsupported(self, spec: StackSpec) -> list[str]:
        """The keys of ``spec`` a host process cannot honour, each naming service and key."""
        out = []
        for service in spec.services:
            keys = [k for k in CONTAINER_ONLY if getattr(service, k)]
            keys += [
                f"ulimits.{u.name}"
                for u in service.ulimits
                if not hasattr(resource, f"RLIMIT_{u.name.upper()}")
            ]
            keys += [f"volumes {v.target}" for v in service.volumes if v.type != "bind" and not v.source]
            if service.network_mode not in ("bridge", "host"):
                keys.append(f"network_mode: {service.network_mode}")
            if keys:
                out.append(
                    f"service {service.name!r}: {', '.join(keys)}: not for a host process (process driver); "
                    "run the stack on a docker device"
                )
        return out

    name = "process"

    def __init__(self, device_id: str, data_dir: Path) -> None:
        self.device_id = device_id
        self.dir = Path(data_dir) / "processes"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._checks: dict[str, HealthChecker] = {}
        self._unsaved: dict[Path, dict[str, Any]] = {}  # records whose write failed
        self._deleted: set[Path] = set()  # records removed whose file could not be deleted

    def _record_path(self, stack: str, service: str) -> Path:
        return self.dir / f"{stack}.{service}.json"

    def _paths(self) -> list[Path]:
        """Every record: on disk, or waiting in memory to be written."""
        return sorted({*self.dir.glob("*.json"), *list(self._unsaved)} - set(self._deleted))

    def _read(self, path: Path) -> dict[str, Any] | None:
        unsaved = self._unsaved.get(path)
        if unsaved is not None:
            return dict(unsaved)
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def _save(self, path: Path, rec: dict[str, Any]) -> bool:
        """Write a record; if that fails, keep it in memory (written later). False if it failed."""
        self._deleted.discard(path)
        try:
            atomic_write(path, json.dumps(rec).encode())
        except OSError as exc:
            if path not in self._unsaved:
                log.error("cannot write %s: %s: keeping it in memory", path, exc.strerror or exc)
            self._unsaved[path] = rec
            return False
        self._unsaved.pop(path, None)
        return True

    def observe(self) -> list[Observed]:
        for path, unsaved in list(self._unsaved.items()):
            if not self._save(path, unsaved):
                break
        for path in list(self._deleted):
            self._delete(path)
        result = []
        for path in self._paths():
            rec = self._read(path)
            if rec is None or rec.get("device") != self.device_id:
                continue
            pid = int(rec.get("pid", 0))
            exit_code = rec.get("exit_code")
            # No start time recorded: the process had already exited when it was launched.
            ticks = rec.get("start_ticks")
            alive = pid > 0 and ticks is not None and _proc_start_ticks(pid) == ticks
            child = self._children.get(pid)
            if child is not None:
                code = child.poll()
                if code is not None:
                    alive = False
                    exit_code = code if code >= 0 else 128 - code
                    self._children.pop(pid, None)
            if not alive and rec.get("state") == "running":
                rec["state"] = "exited"
                rec["exit_code"] = exit_code
                self._save(path, rec)
            health = self._health(path.stem, rec, alive)
            checker = self._checks.get(path.stem)
            result.append(
                Observed(
                    id=path.stem,
                    stack=rec["stack"],
                    service=rec["service"],
                    spec_hash=rec["spec_hash"],
                    state="running" if alive else "exited",
                    exit_code=None if alive else rec.get("exit_code"),
                    health=health,
                    stop_grace=rec.get("stop_grace"),
                    health_output=checker.output if checker is not None and health == "unhealthy" else None,
                )
            )
        return result

    def _health(self, key: str, rec: dict[str, Any], alive: bool) -> HealthState | None:
        """The healthcheck status of a running instance (checks run on their own thread)."""
        spec = rec.get("healthcheck")
        checker = self._checks.get(key)
        if not alive or not spec:
            if checker is not None:
                checker.stop()
                del self._checks[key]
            return None
        if checker is None or checker.pid != rec.get("pid"):
            if checker is not None:
                checker.stop()
            checker = HealthChecker(
                HealthcheckSpec.model_validate(spec),
                int(rec["pid"]),
                self.dir.parent / "work" / rec["stack"] / rec["service"],
            )
            self._checks[key] = checker
            checker.start()
        return checker.status

    def _launch(self, stack: str, service: ServiceSpec, new_log: bool = False) -> None:
        argv = list(service.entrypoint or ()) + list(service.command or ())
        if not argv:
            raise DriverError(f"service {service.name}: the process driver needs a command or entrypoint")
        env = dict(os.environ)
        env.update(service.environment)
        log_path = self.dir / f"{stack}.{service.name}.log"
        workdir = self.dir.parent / "work" / stack / service.name
        workdir.mkdir(parents=True, exist_ok=True)
        user: dict[str, Any] = {}
        if service.user:
            name, _, group = service.user.partition(":")
            user["user"] = int(name) if name.isdigit() else name
            if group:
                user["group"] = int(group) if group.isdigit() else group
        if service.group_add:
            user["extra_groups"] = [int(g) if g.isdigit() else g for g in service.group_add]
        limits = [
            (getattr(resource, f"RLIMIT_{u.name.upper()}"), u.soft, u.hard)
            for u in service.ulimits
            if hasattr(resource, f"RLIMIT_{u.name.upper()}")
        ]
        if limits:  # set by the process itself before it becomes the command (no preexec_fn:
            # unsafe in a threaded agent; prlimit from outside needs CAP_SYS_RESOURCE once it switched user)
            argv = [sys.executable, "-c", _SETRLIMIT_EXEC, json.dumps(limits), *argv]
        links = [(m.target, m.host_path, f"config {m.source}") for m in service.configs]
        # Relative bind mounts (the stack's directory) apply to a process too; other volumes do not.
        links += [(v.target, v.source, f"volume {v.source}") for v in service.volumes if v.type == "stack"]
        for target, host_path, what in links:
            # No container filesystem: a target is a path under the working directory
            # (``/etc/app.conf`` -> ``./etc/app.conf``), a link to the file on the device.
            if host_path is None or not host_path.startswith("/"):
                raise DriverError(f"service {service.name}: {what} was not rendered")
            link = Path(os.path.abspath(workdir / target.lstrip("/")))  # no symlinks followed
            if Path(os.path.abspath(workdir)) not in link.parents:
                raise DriverError(
                    f"service {service.name}: {what}: target {target!r} leaves the work directory"
                )
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(host_path)
        if new_log:  # the last log lines of a failing new version are its own, not its predecessor's
            with contextlib.suppress(OSError):
                os.replace(log_path, log_path.with_name(log_path.name + ".1"))
        try:
            output = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:  # a read-only file system: run it anyway, without its log
            log.error(
                "cannot open %s: %s: %s/%s runs without a log", log_path, exc.strerror, stack, service.name
            )
            output = os.open(os.devnull, os.O_WRONLY)
        try:
            with open(output, "ab") as out:
                child = subprocess.Popen(
                    argv,
                    env=env,
                    cwd=service.working_dir or workdir,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    **user,
                )
        except (OSError, KeyError, ValueError, subprocess.SubprocessError) as exc:
            raise DriverError(f"start {stack}/{service.name}: {exc}") from exc
        self._children[child.pid] = child
        record = {
            "device": self.device_id,
            "stack": stack,
            "service": service.name,
            "spec_hash": service.spec_hash(),
            "pid": child.pid,
            "start_ticks": _proc_start_ticks(child.pid),
            "state": "running",
            "exit_code": None,
            "started_at": time.time(),
            "stop_grace": service.stop_grace_period_s,
            "stop_signal": service.stop_signal or "SIGTERM",
            "healthcheck": service.healthcheck.model_dump(mode="json") if service.healthcheck else None,
        }
        self._save(self._record_path(stack, service.name), record)

    def create(self, stack: str, stack_spec: StackSpec, service: ServiceSpec) -> None:
        self._launch(stack, service, new_log=True)

    def start(self, instance: Observed, service: ServiceSpec) -> None:
        self._launch(instance.stack, service)

    def signal(self, instance: Observed, signame: str) -> None:
        rec = self._read(self.dir / f"{instance.id}.json")
        pid = int(rec.get("pid", 0)) if rec else 0
        if pid <= 0 or rec is None or _proc_start_ticks(pid) != rec.get("start_ticks"):
            raise DriverError(f"signal {instance.stack}/{instance.service}: not running")
        try:
            os.kill(pid, getattr(signal, signame))
        except (AttributeError, ProcessLookupError) as exc:
            raise DriverError(f"signal {instance.stack}/{instance.service}: {signame}: {exc}") from exc

    def remove(self, instance: Observed, grace: float) -> None:
        path = self.dir / f"{instance.id}.json"
        rec = self._read(path)
        if rec is not None:
            pid = int(rec.get("pid", 0))
            ticks = rec.get("start_ticks")
            if pid > 0 and ticks is not None and _proc_start_ticks(pid) == ticks:
                self._terminate(
                    pid, grace, getattr(signal, rec.get("stop_signal") or "SIGTERM", signal.SIGTERM)
                )
            elif (child := self._children.pop(pid, None)) is not None:
                child.poll()  # reap it
        self._unsaved.pop(path, None)
        self._delete(path)

    def _delete(self, path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:  # read-only: gone as far as we are concerned, deleted later
            if path not in self._deleted:
                log.error("cannot delete %s: %s", path, exc.strerror or exc)
            self._deleted.add(path)
        else:
            self._deleted.discard(path)

    def _terminate(self, pid: int, grace: float, stop_signal: int = _SIGTERM) -> None:
        try:
            os.killpg(pid, stop_signal)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        child = self._children.pop(pid, None)
        while time.monotonic() < deadline:
            if child is not None:
                if child.poll() is not None:
                    return
            elif _proc_start_ticks(pid) is None:
                return
            time.sleep(0.05)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if child is not None:
            child.wait(timeout=5)

    def logs(self, instance: Observed, tail: int) -> str:
        path = self.dir / f"{instance.id}.log"
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                lines = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-tail:])

    def log_stream(
        self, instance: Observed, tail: int | None, since: float | None, follow: bool, stop: threading.Event
    ) -> Iterator[str]:
        if since is not None:
            raise DriverError(
                "the process driver does not timestamp output, so 'since' is not available (use tail)"
            )
        path = self.dir / f"{instance.id}.log"
        try:
            f = open(path, "rb")  # noqa: SIM115 - held open while following
        except FileNotFoundError:
            if not follow:
                return
            f = None
        except OSError as exc:
            raise DriverError(f"logs of {instance.stack}/{instance.service}: {exc}") from exc
        try:
            pos = 0
            if f is not None:
                end = f.seek(0, os.SEEK_END)
                start = max(0, end - TAIL_WINDOW)
                f.seek(start)
                data = f.read(end - start)
                pos = end
                if start > 0:
                    data = data[data.find(b"\n") + 1 :]  # drop the partial first line
                if tail is not None:
                    lines = data.splitlines(keepends=True)
                    data = b"".join(lines[-tail:]) if tail > 0 else b""
                if data:
                    yield data.decode(errors="replace")
            if not follow:
                return
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            while not stop.wait(FOLLOW_POLL_S):
                if f is None:
                    try:
                        f = open(path, "rb")  # noqa: SIM115
                    except FileNotFoundError:
                        continue
                size = os.fstat(f.fileno()).st_size
                if size < pos:
                    pos = 0  # truncated
                if size == pos:
                    continue
                f.seek(pos)
                data = f.read(size - pos)
                pos += len(data)
                text = decoder.decode(data)
                if text:
                    yield text
        finally:
            if f is not None:
                f.close()

    def usage(self) -> dict[str, tuple[float | None, int | None]]:
        # Read-only: records are read, never rewritten, and each service counts every
        # process of its session (it is started as a session leader), children included.
        sessions: dict[int, str] = {}
        for path in self._paths():
            rec = self._read(path)
            if rec is None or rec.get("device") != self.device_id or rec.get("state") != "running":
                continue
            pid = int(rec.get("pid", 0))
            ticks = rec.get("start_ticks")
            if pid > 0 and ticks is not None and _proc_start_ticks(pid) == ticks:
                sessions[pid] = f"{rec['stack']}/{rec['service']}"
        if not sessions:
            return {}
        hz = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
        totals = {key: [0, 0] for key in sessions.values()}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    data = f.read().decode(errors="replace")
            except OSError:
                continue
            fields = data[data.rfind(")") + 2 :].split()
            try:
                key = sessions.get(int(fields[3]))
                if key is not None:
                    totals[key][0] += int(fields[11]) + int(fields[12])
                    totals[key][1] += int(fields[21]) * page
            except (IndexError, ValueError):
                continue
        return {key: (cpu / hz, mem) for key, (cpu, mem) in totals.items()}

    def run_job(self, job: JobSpec) -> tuple[int | None, str, bool]:
        """Run a job's command on the host; (exit code, output, timed out)."""
        from tether.agent.jobs import run_host_command

        return run_host_command(job)

    def prune(self, stacks: set[str]) -> None:
        return None

    def close(self) -> None:
        for checker in self._checks.values():
            checker.stop()
        self._checks.clear()


class HealthChecker:
    """Runs a Compose healthcheck against a host process, like Docker does for a container.

    ``starting`` until the first success (failures during ``start_period`` do not count),
    ``healthy`` after a success, ``unhealthy`` after ``retries`` consecutive failures.
    ``CMD`` runs the command directly; ``CMD-SHELL`` through ``/bin/sh -c``.
    """

    def __init__(self, spec: HealthcheckSpec, pid: int, cwd: Path) -> None:
        self.spec = spec
        self.pid = pid
        self.cwd = cwd
        self.status: HealthState = "starting"
        self.output: str | None = None
        """What the last failing check printed (its end), or why it could not run."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"health-{pid}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _argv(self) -> list[str]:
        kind, *rest = self.spec.test
        return ["/bin/sh", "-c", " ".join(rest)] if kind == "CMD-SHELL" else list(rest)

    def _run(self) -> None:
        started = time.monotonic()
        failures = 0
        delay = 0.0  # the first check runs at once
        while not self._stop.wait(delay):
            delay = self.spec.interval_s
            try:
                done = subprocess.run(
                    self._argv(), cwd=self.cwd, capture_output=True, timeout=self.spec.timeout_s, check=False
                )
                ok = done.returncode == 0
                output = (done.stdout + done.stderr).decode(errors="replace").strip()
                output = output or f"exit code {done.returncode}"
            except subprocess.TimeoutExpired:
                ok, output = False, f"timed out after {self.spec.timeout_s:g}s"
            except OSError as exc:
                ok, output = False, f"cannot run the check: {exc}"
            if not ok:
                self.output = output[-HEALTH_OUTPUT_CHARS:]
            if ok:
                failures = 0
                self.status = "healthy"
                continue
            if self.status == "starting" and time.monotonic() - started < self.spec.start_period_s:
                continue
            failures += 1
            if failures >= max(1, self.spec.retries):
                self.status = "unhealthy"
