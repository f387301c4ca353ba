"""Shared pieces of the benchmarks: processes under test, /proc readings, tables and JSON.

Every benchmark is one command (``.venv/bin/python bench/NAME.py --help``) that prints a
table and writes its results as JSON (``--json PATH``, by default under ``bench/results/``).
Benchmarks measure; they do not assert. Targets from issue 7 are printed beside the
figures and the JSON says ``met: true/false`` for each, so a regression is visible but a
slow machine does not fail CI (``tests/test_bench_smoke.py`` only checks that they run).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MOSQUITTO_BIN = "/usr/sbin/mosquitto"
PY = sys.executable
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # support.infra: the busybox image, free ports
from support.infra import accepts, free_port  # noqa: E402  (one implementation for tests and benchmarks)
from support.infra import wait_until as _wait_until  # noqa: E402

T = TypeVar("T")


def log(message: str) -> None:
    """Progress goes to stderr; the table goes to stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.05, message: str = "") -> T:
    """The tests' polling wait, raising TimeoutError (what the benchmarks catch) on timeout."""
    try:
        return _wait_until(predicate, timeout, interval, message)
    except AssertionError as exc:
        raise TimeoutError(str(exc)) from None


_CLI_DIR = tempfile.mkdtemp(prefix="tether-bench-cli-")
atexit.register(shutil.rmtree, _CLI_DIR, True)
_CLI_CONFIG = str(Path(_CLI_DIR) / "config.json")
"""The CLI configuration of a benchmark's `tether up` and CLI calls: its own, so that neither
writes the user's contexts nor picks up the credentials of another `tether up` on the machine."""


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TETHER_BROKER", None)
    env.setdefault("TETHER_CLI_CONFIG", _CLI_CONFIG)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# --- /proc ----------------------------------------------------------------------------------


def memory(pid: int) -> dict[str, float]:
    """RSS, PSS and USS (private clean + dirty) of ``pid`` in MiB, from /proc/PID/smaps_rollup."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                values[parts[0][:-1]] = int(parts[1])
    uss = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return {
        "rss_mb": round(values.get("Rss", 0) / 1024, 2),
        "pss_mb": round(values.get("Pss", 0) / 1024, 2),
        "uss_mb": round(uss / 1024, 2),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def io_bytes(pid: int) -> dict[str, int]:
    """/proc/PID/io: bytes read from and written to storage."""
    out = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = int(value)
    return out


def peak_rss_mb(pid: int) -> float:
    """The highest RSS ``pid`` has had (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def load_average() -> float:
    """The 1-minute load average now (the machine is shared: every figure is read beside it)."""
    return round(os.getloadavg()[0], 2)


def per_device_ms(cpu_s: float | None, devices: int) -> float | None:
    """CPU seconds spent on ``devices`` devices, as milliseconds per device."""
    return None if cpu_s is None or devices <= 0 else round(1000.0 * cpu_s / devices, 3)


class CpuMeter:
    """CPU use of a process over an interval, as a percentage of one core."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t0 = time.monotonic()
        self.c0 = cpu_seconds(pid)

    def percent(self) -> float:
        return 100.0 * (cpu_seconds(self.pid) - self.c0) / max(time.monotonic() - self.t0, 1e-9)

    def seconds(self) -> float:
        return cpu_seconds(self.pid) - self.c0


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    mosquitto = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([MOSQUITTO_BIN, "-h"], capture_output=True, text=True, timeout=5).stdout
        m = re.search(r"mosquitto version (\S+)", out)
        mosquitto = m.group(1) if m else ""
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": mosquitto,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# --- output ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) of ``values``, nearest-rank; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))
    return ordered[index]


def latency_stats(values: Sequence[float], total: int) -> dict[str, Any]:
    """p50/p99/max of per-device latencies; ``missing`` counts devices that never got there."""
    return {
        "count": len(values),
        "missing": total - len(values),
        "p50_s": rnd(percentile(values, 0.50)),
        "p99_s": rnd(percentile(values, 0.99)),
        "max_s": rnd(max(values) if values else None),
    }


def rnd(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:,.0f}"
        return f"{text}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


@dataclass
class Row:
    """One line of a result table: a figure, its unit and the target it is held to."""

    metric: str
    value: Any
    unit: str = ""
    target: str = ""
    met: bool | None = None

    def cells(self) -> list[str]:
        met = "" if self.met is None else ("met" if self.met else "MISSED")
        return [self.metric, fmt(self.value, self.unit), self.target, met]


def table(title: str, rows: Iterable[Row]) -> str:
    rows = list(rows)
    body = [["metric", "value", "target", ""]] + [r.cells() for r in rows]
    widths = [max(len(r[i]) for r in body) for i in range(4)]
    lines = [title, ""]
    for j, r in enumerate(body):
        lines.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rows_json(rows: Iterable[Row]) -> list[dict[str, Any]]:
    return [
        {"metric": r.metric, "value": r.value, "unit": r.unit.strip(), "target": r.target, "met": r.met}
        for r in rows
    ]


def default_json(name: str, *variant: object) -> Path:
    """bench/results/NAME[-VARIANT...].json, e.g. ``default_json("sim_cpu", 1000)``."""
    return RESULTS / f"{'-'.join([name, *map(str, variant)])}.json"


def source_version() -> str:
    """The commit measured (``+dirty`` with uncommitted changes)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def write_json(path: Path | str | None, name: str, data: dict[str, Any], *variant: object) -> Path:
    target = Path(path) if path else default_json(name, *variant)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source_version(),
        "machine": machine(),
        **data,
    }
    target.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return target


def report(
    name: str,
    title: str,
    rows: list[Row],
    data: dict[str, Any],
    json_path: Path | str | None,
    *variant: object,
) -> Path:
    """Print the table and write the JSON (rows included) to ``json_path``, by default
    bench/results/NAME[-VARIANT...].json."""
    print(table(title, rows), flush=True)
    path = write_json(json_path, name, {**data, "rows": rows_json(rows)}, *variant)
    log(f"results written to {path}")
    return path


# --- processes under test -------------------------------------------------------------------


class Mosquitto:
    """A private mosquitto on 127.0.0.1. :meth:`restart` keeps the port (and, with
    ``persistence``, the retained messages and sessions, as a production broker would)."""

    def __init__(
        self,
        workdir: Path,
        *,
        persistence: bool = False,
        tls: dict[str, str] | None = None,
        max_queued_messages: int = 100_000,
        extra_conf: str = "",
    ) -> None:
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persistence = persistence
        self.tls = tls  # {"cafile":..., "certfile":..., "keyfile":...}
        self.max_queued_messages = max_queued_messages
        self.extra_conf = extra_conf
        """Appended to the configuration (e.g. a bridge: support.infra.region_bridge_conf)."""
        self.port = 0
        self.tls_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "mosquitto.log"
        self.starts = 0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _config(self) -> str:
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.dir}/",
            # >= 3 x the fleet, as docs/scaling.md says (compose/mosquitto.conf: 100,000)
            f"max_queued_messages {self.max_queued_messages}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "user root",
        ]
        if self.tls:
            lines += [
                f"listener {self.tls_port} 127.0.0.1",
                f"cafile {self.tls['cafile']}",
                f"certfile {self.tls['certfile']}",
                f"keyfile {self.tls['keyfile']}",
            ]
        if self.extra_conf:
            lines.append(self.extra_conf)
        return "\n".join(lines) + "\n"

    def start(self) -> Mosquitto:
        if not os.access(MOSQUITTO_BIN, os.X_OK):
            raise RuntimeError(f"{MOSQUITTO_BIN} is not installed (apt-get install mosquitto)")
        for _ in range(5):
            if not self.starts or not self.port:
                self.port = free_port()
                self.tls_port = free_port() if self.tls else 0
            conf = self.dir / "mosquitto.conf"
            conf.write_text(self._config())
            out = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
            self.proc = subprocess.Popen([MOSQUITTO_BIN, "-c", str(conf)], stdout=out, stderr=out)
            out.close()
            self.starts += 1
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.proc.poll() is None and not accepts(self.port):
                time.sleep(0.02)
            if self.proc.poll() is None and accepts(self.port):
                return self
            self.stop()
            self.port = 0
        raise RuntimeError(f"mosquitto did not start:\n{self.log_path.read_text(errors='replace')[-2000:]}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, kill: bool = False) -> float:
        """Stop and start again on the same port; returns when it accepts again (seconds taken)."""
        t0 = time.monotonic()
        self.stop(kill=kill)
        self.start()
        return time.monotonic() - t0

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Proc:
    """A child process whose output is collected (and logged to a file) line by line."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or child_env(),
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with open(self.log_path, "a") as f:
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                f.write(line)
                f.flush()

    def wait_for_line(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        regex = re.compile(pattern)

        def found() -> Any:
            match = next((m for m in map(regex.search, list(self.lines)) if m), None)
            if match is None and self.proc.poll() is not None:
                tail = "\n".join(self.lines[-30:])
                raise RuntimeError(f"{' '.join(self.argv[:4])} exited with {self.proc.returncode}:\n{tail}")
            return match

        return wait_until(found, timeout, message=f"line matching {pattern!r} from {self.argv[:4]}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class Controller(Proc):
    """``tether up`` against ``broker`` (a URL), or with its embedded broker when None; at
    ``tether up``'s default log level (what it logs is part of what it costs)."""

    def __init__(self, data_dir: Path, broker: str | None = None, log_level: str = "info") -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [PY, "-m", "tether.cli.main", "up", "--data-dir", str(data_dir), "--log-level", log_level]
        # The simulated devices and the benchmark's requests do not log in: the embedded
        # broker (which refuses anonymous clients by default) is told to let them.
        argv += ["--broker", broker] if broker else ["--port", "0", "--allow-anonymous"]
        traced = os.environ.get("TETHER_BENCH_TRACEMALLOC")
        if traced:
            # tracemalloc snapshots on request (bench/trace_heap.py); Controller.snapshot.
            argv = [PY, str(REPO / "bench" / "trace_heap.py"), traced, *argv[2:]]
        self.traced = Path(traced) if traced else None
        profile = os.environ.get("TETHER_BENCH_PROFILE_CONTROLLER")
        if profile:
            # py-spy (pip install py-spy; not a project dependency) samples the controller
            # and its embedded broker's process.
            spy = str(BIN / "py-spy") if (BIN / "py-spy").exists() else "py-spy"
            argv = [
                spy,
                "record",
                "--subprocesses",
                "--format",
                "raw",
                "-r",
                "200",
                "-o",
                profile,
                "--",
                *argv,
            ]
        super().__init__(argv, data_dir / "controller.log")
        self.profiled = bool(profile)
        try:
            if broker:
                self.url = broker
            else:
                m = self.wait_for_line(r"embedded broker listening on mqtt://[\d.]+:(\d+)")
                self.url = f"mqtt://127.0.0.1:{int(m.group(1))}"
            self.wait_for_line(r"controller ready")
        except BaseException:
            self.stop()
            raise

    def snapshot(self, label: str, timeout: float = 120.0) -> None:
        """With ``TETHER_BENCH_TRACEMALLOC``: the controller's traced heap written as
        ``LABEL.snap`` in that directory (nothing otherwise); ``arm`` keeps the peak."""
        if self.traced is None:
            return
        if label == "arm":
            (self.traced / "arm").touch()
            return
        if label == "disarm":
            (self.traced / "arm").unlink(missing_ok=True)
            return
        req = self.traced / f"{label}.req"
        req.touch()
        wait_until(lambda: not req.exists(), timeout, interval=0.2, message=f"snapshot {label}")

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.profiled and self.proc.poll() is None:
            child = self.pid
            os.killpg(self.proc.pid, signal.SIGINT)  # py-spy writes its profile once the controller exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
            if child != self.proc.pid:
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda: not Path(f"/proc/{child}").exists(), 15, interval=0.1)
                with contextlib.suppress(OSError):
                    os.kill(child, signal.SIGKILL)
        return super().stop(timeout)

    @property
    def pid(self) -> int:
        """The controller's own pid (under py-spy, the child of py-spy)."""
        if self.profiled:
            with contextlib.suppress(OSError, ValueError, IndexError):
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
                return int(children[0])
        return self.proc.pid

    @property
    def broker_pid(self) -> int | None:
        """The embedded broker's process (a child of the controller), or None with another broker."""
        with contextlib.suppress(OSError):
            task = Path(f"/proc/{self.pid}/task")
            for child in (c for t in task.iterdir() for c in (t / "children").read_text().split()):
                with contextlib.suppress(OSError):
                    if b"tether.broker.child" in Path(f"/proc/{child}/cmdline").read_bytes():
                        return int(child)
        return None

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cli(broker: str, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run the operator CLI (``tether ...``) against ``broker``."""
    return subprocess.run(
        [PY, "-m", "tether.cli.main", *args, "--broker", broker],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )


def request(broker: str, command: Any, timeout: float = 300.0) -> Any:
    """One request to the controller from this process (no CLI start-up in the timing)."""
    from tether.protocol.client import ControllerClient

    with ControllerClient(broker, timeout=timeout) as client:
        return client.request(command)


def compose_stack(services: int = 3, version: int = 1, image: str | None = None) -> str:
    """A Compose file of ``services`` long-running services; ``version`` changes every service.

    Without ``image`` the services are host processes (process driver, or simulated).
    """
    lines = ["services:"]
    for i in range(services):
        lines.append(f"  svc{i}:")
        if image:
            lines.append(f"    image: {image}")
        lines.append(f'    command: ["sh", "-c", "echo v{version}; exec sleep 100000"]')
        lines.append("    restart: always")
        lines.append("    stop_grace_period: 1s")
        lines.append(f"    environment:\n      VERSION: '{version}'")
    return "\n".join(lines) + "\n"
