"""An image update over a weak link: Tether's stage-then-switch against remove-then-pull.

    .venv/bin/python bench/update_over_weak_link.py                  # 8 MB at 1 Mbit/s and 128 kbit/s, and with cuts
    .venv/bin/python bench/update_over_weak_link.py --full           # also a 50 MB layer (hours at 128 kbit/s)
    .venv/bin/python bench/update_over_weak_link.py --quick          # 1 MB layer, short cuts: about 2 minutes
    .venv/bin/python bench/update_over_weak_link.py --smoke          # 200 KB, no cuts: that it runs (CI)

A real registry (Debian's ``docker-registry``) on loopback, behind a shaped link: a TCP
proxy with a token-bucket rate limit that counts the bytes it carries and can drop the
link (every connection reset, new ones refused) (``tests/support/linkproxy.py``). Both
contestants fetch through it, dockerd included (loopback registries need no TLS).

Per scenario (layer size, link rate, cuts) two runs, each with images of its own (random
layers: nothing is cached), on a stack of one busybox ``httpd`` service published on a
fixed port (``stop_grace_period: 1s``: httpd as process 1 ignores SIGTERM), which a
client polls every 50 ms throughout:

* **tether**: ``tether up`` and a docker-driver ``tether-agent``; v1 deployed, then v2
  deployed with ``--wait`` (``--download-deadline 2h``). With cuts, the agent is also
  killed (SIGKILL) and started again during the download.
* **baseline**: what the agent did before issue 15, replayed with the Docker SDK: the v1
  container removed, then ``docker pull`` of v2 retried with the agent's create backoff
  (1 s doubling, capped at 300 s) until it succeeds, then v2 created. Each failed pull is
  an error the agent reported (``action.failed``, the service ``failed``), which failed
  the deployment at once.

Cuts (``--cuts``): the link drops for ``--cut-seconds`` every ``--cut-every`` seconds from
``--cut-start`` seconds after the update starts, the same schedule for both runs.

Measured: the service's outage during the update (longest, and in total, from the update
to v2 answering), time to converge (to v2 answering), bytes the link carried divided by
the new layer's compressed size, and whether the deployment ended ``succeeded`` without a
failure on the way. Targets (issue 15): outage <= 2 s whatever the size and rate, bytes
<= 1.05 x the layer with the cuts.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import PY, Controller, Proc, Row, child_env, cli, log, report, rnd, wait_until
from support.infra import docker_client, ensure_busybox_image, free_port, remove_tether_containers
from support.linkproxy import LinkProxy
from support.registry import Registry, layer_size, push_image, registry_available

NAME = "update_over_weak_link"
MB = 1_000_000
STACK = """
services:
  web:
    image: {image}
    command: ["sh", "-c", "mkdir -p /www && echo {version} > /www/index.html && exec httpd -f -p 8080 -h /www"]
    ports: ["127.0.0.1:{port}:8080"]
    restart: always
    stop_grace_period: 1s
"""
COMMAND = ["sh", "-c", "mkdir -p /www && echo {version} > /www/index.html && exec httpd -f -p 8080 -h /www"]
BASELINE_LABEL = "io.tether.bench=update-baseline"
POLL_TIMEOUT = 0.25
"""Seconds: a loopback GET of a static page answers in milliseconds."""


@dataclass(frozen=True)
class Scenario:
    name: str
    layer: int  # bytes of random data in the new layer
    rate: float  # bytes/s
    cuts: int = 0
    restart: bool = False


class Poller:
    """GET the published port every 50 ms: (time, body or None).

    Each GET gives up after :data:`POLL_TIMEOUT`: a connection made while the engine starts
    the new container is accepted by Docker's port proxy before the container's network is
    up and waits for TCP's one-second SYN retry; with a 1 s timeout that one request hid
    the new version answering for up to a second."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.samples: list[tuple[float, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=POLL_TIMEOUT) as resp:
                    body: str | None = resp.read().decode().strip()
            except OSError:
                body = None
            self.samples.append((time.monotonic(), body))
            self._stop.wait(0.05)

    def last(self) -> str | None:
        return self.samples[-1][1] if self.samples else None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def outages(self, since: float) -> tuple[float, float]:
        """(longest, total) seconds without an answer after ``since`` until v2 answered."""
        longest = total = 0.0
        start: float | None = None
        prev = since
        for t, body in self.samples:
            if t < since:
                continue
            if body is None and start is None:
                start = prev
            elif body is not None and start is not None:
                longest, total, start = max(longest, t - start), total + (t - start), None
            prev = t
            if body == "v2":
                break
        return longest, total

    def first(self, body: str, since: float) -> float | None:
        return next((t for t, b in self.samples if t >= since and b == body), None)


class Cutter:
    """Drops the link for ``seconds`` every ``every`` seconds, ``count`` times, from ``start`` s on."""

    def __init__(self, link: LinkProxy, count: int, seconds: float, every: float, start: float) -> None:
        self.link, self.count, self.seconds, self.every, self.first = link, count, seconds, every, start
        self._stop = threading.Event()
        self.done = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Cutter:
        self._thread.start()
        return self

    def _run(self) -> None:
        if self._stop.wait(self.first):
            return
        for _ in range(self.count):
            self.link.cut()
            stopped = self._stop.wait(self.seconds)
            self.link.heal()
            self.done += 1
            if stopped or self._stop.wait(max(0.0, self.every - self.seconds)):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.seconds + 5)
        self.link.heal()


def images(docker: Any, registry: Registry, scenario: Scenario, run: str) -> tuple[str, str, int]:
    v1, v2 = f"b{run}/app:v1", f"b{run}/app:v2"
    push_image(docker, registry.host, v1, 50_000)
    push_image(docker, registry.host, v2, scenario.layer)
    return v1, v2, layer_size(registry.host, v2)


def run_tether(
    docker: Any, registry: Registry, scenario: Scenario, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:6]
    v1, v2, size = images(docker, registry, scenario, run)
    port = free_port()
    device = f"bench-upd-{run}"
    with LinkProxy(("127.0.0.1", registry.port), rate=scenario.rate) as link:
        prefix = f"127.0.0.1:{link.port}/"
        controller = Controller(work / f"controller-{run}")
        agents: list[Proc] = []

        def agent() -> Proc:
            argv = [PY, "-m", "tether.agent.main", "--device-id", device, "--data-dir", str(work / device)]
            argv += ["--broker", controller.url, "--driver", "docker", "--label", f"bench={run}"]
            argv += ["--reconcile-interval", "2", "--keepalive", "10"]
            proc = Proc(argv, work / f"{device}.log", env=child_env())
            agents.append(proc)
            return proc

        poller: Poller | None = None
        try:
            agent()
            stack = work / f"web-{run}.yml"
            check = cli(
                controller.url, "groups", "create", "lab", "--select", f"bench={run}", "--trust-device-labels"
            )
            if check.returncode != 0:
                raise RuntimeError(check.stderr)
            wait_until(
                lambda: f'"{device}"' in cli(controller.url, "devices", "ls", "-o", "json").stdout, 30, 0.5
            )
            stack.write_text(STACK.format(image=prefix + v1, version="v1", port=port))
            deploy = ["stacks", "deploy", str(stack), "--name", "web", "--group", "lab", "--wait"]
            deploy += ["--min-healthy-time", "2s"]
            first = cli(controller.url, *deploy, "--timeout", "300", timeout=400)
            if first.returncode != 0:
                raise RuntimeError(f"v1 deploy failed: {first.stdout} {first.stderr}")
            poller = Poller(port)
            wait_until(lambda: poller.last() == "v1", 30, message="v1 answers")
            stack.write_text(STACK.format(image=prefix + v2, version="v2", port=port))
            link.down_bytes = 0
            result: dict[str, Any] = {}
            t0 = time.monotonic()
            waiter = threading.Thread(
                target=lambda: result.update(
                    r=cli(
                        controller.url,
                        *deploy,
                        "--download-deadline",
                        "2h",
                        "--timeout",
                        str(int(args.timeout)),
                        timeout=args.timeout + 60,
                    )
                )
            )
            waiter.start()
            cutter = (
                Cutter(link, scenario.cuts, args.cut_seconds, args.cut_every, args.cut_start).start()
                if scenario.cuts
                else None
            )
            restarted = False
            deadline = t0 + args.timeout
            while poller.last() != "v2" and time.monotonic() < deadline:
                if scenario.restart and not restarted and link.down_bytes > size * 0.5:
                    log(f"  {scenario.name}: killing the agent at {link.down_bytes / size:.0%} of the layer")
                    agents[-1].proc.kill()
                    agents[-1].proc.wait(10)
                    agent()
                    restarted = True
                time.sleep(0.2)
            converged = poller.first("v2", t0)
            waiter.join(args.timeout + 60)
            if cutter is not None:
                cutter.stop()
            longest, total = poller.outages(t0)
            wait = result.get("r")
            return {
                "layer_bytes": size,
                "link_bytes": link.down_bytes,
                "bytes_ratio": rnd(link.down_bytes / size),
                "outage_longest_s": rnd(longest, 2),
                "outage_total_s": rnd(total, 2),
                "converge_s": rnd(converged - t0, 1) if converged else None,
                "cuts": cutter.done if cutter else 0,
                "agent_restarted": restarted,
                "wait_exit": wait.returncode if wait else None,
                "succeeded": bool(wait and wait.returncode == 0 and converged),
                "errors": 0 if wait and wait.returncode == 0 else 1,
                "wait_tail": (wait.stdout + wait.stderr).strip().splitlines()[-3:] if wait else [],
            }
        finally:
            if poller is not None:
                poller.close()
            for proc in reversed(agents):
                proc.stop()
            controller.stop()
            remove_tether_containers(docker, device)
            for ref in (f"127.0.0.1:{link.port}/{v1}", f"127.0.0.1:{link.port}/{v2}"):
                with contextlib.suppress(Exception):
                    docker.images.remove(ref, force=True)


def run_baseline(
    docker: Any, registry: Registry, scenario: Scenario, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    run = uuid.uuid4().hex[:6]
    v1, v2, size = images(docker, registry, scenario, run)
    port = free_port()
    with LinkProxy(("127.0.0.1", registry.port), rate=scenario.rate) as link:
        prefix = f"127.0.0.1:{link.port}/"
        name = f"tether-bench-baseline-{run}"
        poller: Poller | None = None
        try:
            docker.images.pull(prefix + v1)
            container = docker.containers.run(
                prefix + v1,
                [c.format(version="v1") for c in COMMAND],
                name=name,
                detach=True,
                ports={"8080/tcp": ("127.0.0.1", port)},
                labels=dict([BASELINE_LABEL.split("=")]),
            )
            poller = Poller(port)
            wait_until(lambda: poller.last() == "v1", 30, message="v1 answers")
            link.down_bytes = 0
            t0 = time.monotonic()
            cutter = (
                Cutter(link, scenario.cuts, args.cut_seconds, args.cut_every, args.cut_start).start()
                if scenario.cuts
                else None
            )
            # The agent before issue 15: remove the stale container, then create the new one,
            # whose image is pulled first; a failed create is retried with backoff.
            container.stop(timeout=1)  # the stack's stop_grace_period (busybox httpd ignores SIGTERM)
            container.remove(force=True)
            errors, attempt, reasons = 0, 0, []
            while time.monotonic() < t0 + args.timeout:
                try:
                    docker.images.pull(prefix + v2)
                    break
                except Exception as exc:  # noqa: BLE001 - each one was an action.failed
                    errors += 1
                    reasons.append(str(exc)[:160])
                    time.sleep(min(300.0, 2.0**attempt))
                    attempt += 1
            docker.containers.run(
                prefix + v2,
                [c.format(version="v2") for c in COMMAND],
                name=name,
                detach=True,
                ports={"8080/tcp": ("127.0.0.1", port)},
                labels=dict([BASELINE_LABEL.split("=")]),
            )
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: poller.last() == "v2", 30, message="v2 answers")
            converged = poller.first("v2", t0)
            if cutter is not None:
                cutter.stop()
            longest, total = poller.outages(t0)
            return {
                "layer_bytes": size,
                "link_bytes": link.down_bytes,
                "bytes_ratio": rnd(link.down_bytes / size),
                "outage_longest_s": rnd(longest, 2),
                "outage_total_s": rnd(total, 2),
                "converge_s": rnd(converged - t0, 1) if converged else None,
                "cuts": cutter.done if cutter else 0,
                "agent_restarted": False,
                "errors": errors,
                "succeeded": bool(converged) and errors == 0,
                "error_samples": reasons[:3],
            }
        finally:
            if poller is not None:
                poller.close()
            for c in docker.containers.list(all=True, filters={"label": BASELINE_LABEL}):
                with contextlib.suppress(Exception):
                    c.remove(force=True)
            for ref in (prefix + v1, prefix + v2):
                with contextlib.suppress(Exception):
                    docker.images.remove(ref, force=True)


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    if args.smoke:
        found = [Scenario("smoke", 200_000, 250_000)]
    elif args.quick:
        found = [
            Scenario("1MB@2mbit", MB, 250_000),
            Scenario("1MB@2mbit+cuts+restart", MB, 250_000, cuts=args.cuts, restart=True),
        ]
    else:
        found = [
            Scenario("8MB@1mbit", 8 * MB, 125_000),
            Scenario("8MB@128kbit", 8 * MB, 16_000),
            Scenario("8MB@1mbit+cuts+restart", 8 * MB, 125_000, cuts=args.cuts, restart=True),
        ]
    if args.full:
        found += [Scenario("50MB@1mbit", 50 * MB, 125_000), Scenario("50MB@128kbit", 50 * MB, 16_000)]
    return [s for s in found if not args.only or s.name in args.only.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 MB at 2 Mbit/s, 5 s cuts (a smoke run)")
    parser.add_argument(
        "--smoke", action="store_true", help="one 200 KB update at 2 Mbit/s: checks the bench runs (seconds)"
    )
    parser.add_argument("--full", action="store_true", help="also a 50 MB layer at both rates (hours)")
    parser.add_argument("--only", help="comma-separated scenario names")
    parser.add_argument("--cuts", type=int, default=5, help="link cuts in the cut scenario (default 5)")
    parser.add_argument("--cut-seconds", type=float, default=None, help="length of each cut (default 30 s)")
    parser.add_argument(
        "--cut-every", type=float, default=None, help="a cut starts this often (default 40 s)"
    )
    parser.add_argument("--cut-start", type=float, default=None, help="first cut after (default 10 s)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="per run (seconds)")
    parser.add_argument(
        "--json", help="write results here (default bench/results/update_over_weak_link.json)"
    )
    args = parser.parse_args()
    if args.cut_seconds is None:
        args.cut_seconds = 5.0 if args.quick else 30.0
    if args.cut_every is None:
        args.cut_every = 7.0 if args.quick else 40.0
    if args.cut_start is None:
        args.cut_start = 1.0 if args.quick else 10.0
    reason = registry_available()
    docker = docker_client()
    if reason or docker is None:
        raise SystemExit(f"{NAME}: {reason or 'no Docker engine answers'}")
    ensure_busybox_image(docker)
    results: dict[str, dict[str, Any]] = {}
    rows: list[Row] = []
    with (
        tempfile.TemporaryDirectory(prefix="tether-bench-upd-") as tmp,
        Registry(Path(tmp) / "registry") as registry,
    ):
        work = Path(tmp)
        for scenario in scenarios(args):
            results[scenario.name] = {}
            for contestant, fn in (("tether", run_tether), ("baseline", run_baseline)):
                log(f"{scenario.name}: {contestant}")
                try:
                    results[scenario.name][contestant] = fn(docker, registry, scenario, work, args)
                except (RuntimeError, TimeoutError) as exc:
                    results[scenario.name][contestant] = {"error": str(exc)[:500]}
                log(f"  {results[scenario.name][contestant]}")
            new, old = results[scenario.name]["tether"], results[scenario.name]["baseline"]
            label = scenario.name
            if "error" in new:
                rows.append(Row(f"{label}: tether run failed", new["error"][:60]))
                continue
            rows += [
                Row(
                    f"{label}: longest outage, tether",
                    new["outage_longest_s"],
                    " s",
                    "<= 2 s",
                    new["outage_longest_s"] <= 2.0,
                ),
                Row(f"{label}: longest outage, remove+pull", old.get("outage_longest_s"), " s"),
                Row(
                    f"{label}: bytes / layer, tether",
                    new["bytes_ratio"],
                    "",
                    "<= 1.05" if scenario.cuts else "",
                    new["bytes_ratio"] <= 1.05 if scenario.cuts else None,
                ),
                Row(f"{label}: bytes / layer, remove+pull", old.get("bytes_ratio")),
                Row(f"{label}: converged, tether", new["converge_s"], " s"),
                Row(f"{label}: converged, remove+pull", old.get("converge_s"), " s"),
                Row(
                    f"{label}: succeeded without failure, tether",
                    new["succeeded"],
                    "",
                    "yes",
                    new["succeeded"],
                ),
                Row(f"{label}: errors on the way, remove+pull", old.get("errors")),
            ]
    data = {
        "scenarios": {s.name: vars(s) for s in scenarios(args)},
        "cut_seconds": args.cut_seconds,
        "cut_every": args.cut_every,
        "cut_start": args.cut_start,
        "results": results,
    }
    report(
        NAME,
        "Image update over a weak link (tether: stage, then switch; baseline: remove, then pull)",
        rows,
        data,
        args.json,
    )


if __name__ == "__main__":
    main()
