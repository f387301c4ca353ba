"""Remote operations from the CLI: ``tether logs``, ``tether devices restart|facts|top``.

A device has no inbound port: these commands publish a request on the device's
``tether/v1/devices/{id}/requests`` topic and wait for its answer on this CLI's reply topic
(see :mod:`tether.protocol.device_api`). Before asking a device they ask the controller
whether it is online, so that a request to an offline device fails at once with a line
saying since when; a device that is online but does not answer fails after
``--request-timeout`` seconds.

Streams (``logs --follow``, ``devices top --follow``) are leases the device grants for
:data:`LEASE_S` seconds; the CLI renews them while it runs, and cancels the log stream on
Ctrl-C, so a CLI that dies costs the device at most one lease.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import time
from typing import Any

import click
from tether.protocol import codec, topics
from tether.protocol.client import ControllerClient, LogStream, ask, send
from tether.protocol.commands import DevicesShow, DevicesTop
from tether.protocol.device_api import (
    HEARTBEAT_S,
    MAX_TAIL,
    FactsCommand,
    LogsCommand,
    MetricsLiveCommand,
    MetricsSample,
    RestartCommand,
    merge_sample,
)
from tether.protocol.durations import format_duration as _duration
from tether.protocol.durations import parse_duration
from tether.protocol.errors import PayloadError, RequestError, RequestTimeout, TetherError
from tether.protocol.log_follow import LEASE_S, Ended, Failed
from tether.protocol.topics import DeviceTopic

from . import output
from .common import common, send_and_print

LIVE_S = 30.0
"""Seconds of live samples asked for at a time by ``devices top --follow``."""
RESTART_TIMEOUT_S = 120.0


def register(main: click.Group) -> None:
    """Add ``logs`` to ``main`` and ``restart``, ``facts``, ``top`` to its ``devices`` group."""
    main.add_command(logs)
    devices = main.commands["devices"]
    assert isinstance(devices, click.Group)
    for command in (restart, facts, top):
        devices.add_command(command)


# --- talking to a device --------------------------------------------------------------------


def _ago(ts: float | None) -> str:
    if ts is None:
        return ""
    return _duration(max(0.0, time.time() - ts)) + " ago"


def require_online(client: ControllerClient, device_id: str) -> dict[str, Any]:
    """The controller's view of ``device_id``; TetherError naming it unless it is online."""
    topics.check_device_id(device_id)
    device: dict[str, Any] = client.request(DevicesShow(device_id=device_id))["device"]
    if device["status"] == "offline":
        since = device.get("since")
        raise RequestError(
            f"device {device_id} is offline since {output.when(since)} ({_ago(since)})"
            if since
            else f"device {device_id} is offline"
        )
    if device["status"] == "unknown":
        raise RequestError(
            f"device {device_id} has not been heard from since the controller or the broker restarted"
        )
    if device["status"] != "online":
        raise RequestError(f"device {device_id} has never connected")
    return device


# --- logs -----------------------------------------------------------------------------------


def _parse_tail(value: str) -> int | None:
    if value == "all":
        return None
    try:
        tail = int(value)
    except ValueError:
        tail = -1
    if not 0 <= tail <= MAX_TAIL:
        raise TetherError(f"--tail: expected a number of lines from 0 to {MAX_TAIL}, or 'all'; got {value!r}")
    return tail


class _Printer:
    """Prints text per service; with several services, each line prefixed ``service | ``."""

    def __init__(self, prefix: bool, width: int) -> None:
        self.prefix = prefix
        self.width = width
        self.partial: dict[str, str] = {}

    def write(self, service: str, text: str) -> None:
        if not self.prefix:
            click.echo(text, nl=False)
            sys.stdout.flush()
            return
        data = self.partial.pop(service, "") + text
        lines = data.split("\n")
        if lines[-1]:
            self.partial[service] = lines[-1]
        for line in lines[:-1]:
            click.echo(f"{service.ljust(self.width)} | {line}")
        sys.stdout.flush()

    def close(self) -> None:
        for service, rest in self.partial.items():
            click.echo(f"{service.ljust(self.width)} | {rest}")
        self.partial.clear()


@click.command("logs")
@click.argument("device_id", metavar="DEVICE")
@click.argument("stack")
@click.argument("service", required=False)
@click.option("--tail", "tail_text", default="100", show_default=True, help="Lines from the end, or 'all'.")
@click.option("--since", "since_text", default=None, help="Only output of the last DURATION (10m, 1h30m).")
@click.option("-f", "--follow", is_flag=True, help="Then stream new output until Ctrl-C (or --for).")
@click.option("--for", "for_text", default=None, help="With --follow: stop after DURATION.")
@common
def logs(
    client: ControllerClient,
    fmt: str,
    device_id: str,
    stack: str,
    service: str | None,
    tail_text: str,
    since_text: str | None,
    follow: bool,
    for_text: str | None,
) -> None:
    """Output of the services of STACK (or of SERVICE) on DEVICE, fetched over MQTT."""
    tail = _parse_tail(tail_text)
    since = parse_duration(since_text, "--since") if since_text else None
    if since is not None and since <= 0:
        raise TetherError("--since: expected a duration greater than 0")
    limit = parse_duration(for_text, "--for") if for_text else None
    if limit is not None and not follow:
        raise TetherError("--for goes with --follow")
    require_online(client, device_id)
    command = LogsCommand(
        stack=stack, service=service, tail=tail, since=since, follow=follow, duration=LEASE_S
    )
    if not follow:
        result = ask(client, device_id, command)
        if fmt == "json":
            click.echo(output.to_json(result))
            return
        parts = result["logs"]
        printer = _Printer(len(parts) > 1, max((len(p["service"]) for p in parts), default=0))
        for part in parts:
            text = part["text"]
            printer.write(part["service"], text if not text or text.endswith("\n") else text + "\n")
        printer.close()
        if result.get("truncated"):
            click.echo("tether: output cut to the most recent part (reply size limit)", err=True)
        return
    _follow_logs(client, fmt, device_id, command, limit)


def _follow_logs(
    client: ControllerClient, fmt: str, device_id: str, command: LogsCommand, limit: float | None
) -> None:
    idle = max(3 * HEARTBEAT_S, client.timeout)
    stream = LogStream(client, device_id, command, answer_s=client.timeout, idle_s=idle, limit_s=limit)
    printer = _Printer(False, 0)
    try:
        while True:
            event = stream.next(0.5)
            if isinstance(event, Failed):
                printer.close()
                raise (RequestTimeout if event.timeout else RequestError)(event.message)
            if isinstance(event, Ended):
                printer.close()
                _stream_end(device_id, event.result, event.cancelled)
                return
            if event is None:
                continue
            if event.services is not None:  # the first message: what is followed
                printer.prefix = len(event.services) > 1
                printer.width = max((len(name) for name in event.services), default=0)
            if event.text:
                if fmt == "json":
                    click.echo(json.dumps(event.result, sort_keys=True))
                else:
                    printer.write(event.service, event.text)
    except KeyboardInterrupt:
        # Ctrl-C exits at once: the cancel is a courtesy (the device's lease ends the stream anyway).
        printer.close()
        with contextlib.suppress(KeyboardInterrupt):
            stream.cancel()
        sys.exit(130)


def _stream_end(device_id: str, result: dict[str, Any], cancelled: bool) -> None:
    reason = result.get("end")
    if result.get("dropped"):
        click.echo(f"tether: {result['dropped']} bytes of output were left out (rate limit)", err=True)
    notes = {
        "exited": "every followed instance stopped",
        "stopped": f"the agent on {device_id} is shutting down",
        "duration": "the device ended the stream (lease expired)",
    }
    if reason in notes:
        click.echo(f"tether: log stream ended: {notes[reason]}", err=True)


# --- restart --------------------------------------------------------------------------------


@click.command("restart")
@click.argument("device_id", metavar="DEVICE")
@click.argument("stack")
@click.argument("service", required=False)
@click.option(
    "--timeout",
    type=float,
    default=RESTART_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for the device.",
)
@common
def restart(
    client: ControllerClient, fmt: str, device_id: str, stack: str, service: str | None, timeout: float
) -> None:
    """Replace the instances of STACK (or of SERVICE) on DEVICE with new ones."""
    require_online(client, device_id)
    result = ask(client, device_id, RestartCommand(stack=stack, service=service), timeout=timeout)
    if fmt == "json":
        click.echo(output.to_json(result))
    failed = []
    for svc in result["services"]:
        old = (svc["old"] or "-")[:12]
        new = (svc["new"] or "-")[:12]
        if svc["error"] or not svc["new"]:
            failed.append(f"{stack}/{svc['service']}: {svc['error'] or 'no new instance yet'}")
        if fmt == "table":
            change = f"{old} -> {new}" if old != new else new  # the process driver keeps its ids
            click.echo(f"{stack}/{svc['service']} on {device_id}: restarted ({change})")
    if failed:
        raise TetherError("; ".join(failed))


# --- facts ----------------------------------------------------------------------------------


def add_live_facts(client: ControllerClient, device: dict[str, Any]) -> None:
    """Put the device's facts, asked of it now, in ``device["live_facts"]`` when it is online."""
    device["live_facts"] = None
    if device.get("status") != "online":
        device["facts_note"] = "last known, from the device's presence (it is not online)"
        return
    try:
        device["live_facts"] = ask(client, device["id"], FactsCommand(), timeout=min(client.timeout, 5.0))
        device["facts_note"] = "live"
    except TetherError as exc:
        device["facts_note"] = f"last known, from the device's presence ({exc})"


def _size(value: int | None) -> str:
    if value is None:
        return "?"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"


def echo_host_facts(device: dict[str, Any]) -> None:
    """Print CPU, memory, disk, Docker and addresses: live facts if there are, else presence's."""
    live = device.get("live_facts")
    facts = live or device.get("facts") or {}
    lines = []
    if facts.get("kernel"):
        lines.append(("kernel", facts["kernel"]))
    if facts.get("cpu_count") is not None:
        lines.append(("cpu", f"{facts['cpu_count']} x {facts.get('cpu_model') or '?'}"))
    if facts.get("memory_total") is not None:
        available = facts.get("memory_available")
        lines.append(
            (
                "memory",
                f"{_size(available)} available of {_size(facts['memory_total'])}"
                if available is not None
                else f"{_size(facts['memory_total'])}",
            )
        )
    if facts.get("disk_total") is not None:
        free = facts.get("disk_free")
        where = f" ({facts['disk_path']})" if facts.get("disk_path") else ""
        lines.append(
            (
                "disk",
                f"{_size(free)} free of {_size(facts['disk_total'])}{where}"
                if free is not None
                else f"{_size(facts['disk_total'])}",
            )
        )
    if "docker_version" in facts:
        lines.append(("docker", facts.get("docker_version") or "- (not the docker driver)"))
    if "addresses" in facts:
        addrs = [f"{name} {a}" for name, values in (facts.get("addresses") or {}).items() for a in values]
        lines.append(("addresses", ", ".join(addrs) or "-"))
    if live and live.get("uptime_s") is not None:
        lines.append(("uptime", _duration(live["uptime_s"])))
    if device.get("facts_note"):
        lines.append(("facts", device["facts_note"]))
    for key, value in lines:
        click.echo(f"{key + ':':<11} {output.printable(value)}")


@click.command("facts")
@click.argument("device_id", metavar="DEVICE")
@common
def facts(client: ControllerClient, fmt: str, device_id: str) -> None:
    """Ask DEVICE what it is: OS, CPU, memory, disk, Docker version, addresses."""
    require_online(client, device_id)
    result = ask(client, device_id, FactsCommand())
    if fmt == "json":
        click.echo(output.to_json(result))
        return
    for key in ("hostname", "os", "arch", "agent_version", "driver"):
        click.echo(f"{key + ':':<11} {result.get(key)}")
    echo_host_facts({"live_facts": result})


# --- top ------------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def _used(used: int | None, total: int | None) -> str:
    if used is None or not total:
        return "-"
    return f"{_size(used)}/{_size(total)} ({used * 100 / total:.0f}%)"


def _top_row(device_id: str, presence: str, sample: dict[str, Any] | None) -> tuple[Any, ...]:
    s = sample or {}
    containers = s.get("containers")
    return (
        device_id,
        presence,
        _percent(s.get("cpu")),
        _used(s.get("mem"), s.get("mem_total")),
        _used(s.get("disk"), s.get("disk_total")),
        "-" if containers is None else len(containers),
        _ago(s.get("at")) if sample else "no sample yet",
    )


def _containers_table(sample: dict[str, Any] | None) -> str:
    rows = [
        (key, _percent(cpu), _size(mem) if mem is not None else "-")
        for key, (cpu, mem) in sorted(((sample or {}).get("containers") or {}).items())
    ]
    return output.table(["STACK/SERVICE", "CPU", "MEMORY"], rows)


TOP_HEADERS = ["DEVICE", "PRESENCE", "CPU", "MEMORY", "DISK", "INSTANCES", "SAMPLE"]


@click.command("top")
@click.argument("device_id", metavar="[DEVICE]", required=False)
@click.option("-f", "--follow", is_flag=True, help="Ask DEVICE for a sample every second until Ctrl-C.")
@click.option("--for", "for_text", default=None, help="With --follow: stop after DURATION.")
@common
def top(
    client: ControllerClient, fmt: str, device_id: str | None, follow: bool, for_text: str | None
) -> None:
    """Latest CPU, memory and disk of devices (and of each service instance of DEVICE)."""
    limit = parse_duration(for_text, "--for") if for_text else None
    if follow:
        if device_id is None:
            raise TetherError("--follow needs a DEVICE: live samples are asked of one device")
        _follow_top(client, fmt, device_id, limit)
        return
    if limit is not None:
        raise TetherError("--for goes with --follow")
    top = DevicesTop(device_ids=(device_id,) if device_id else ())
    send_and_print(client, fmt, top, lambda devices: _top_text(devices, device_id), key="devices")


def _top_text(devices: list[dict[str, Any]], device_id: str | None) -> list[str]:
    rows = [_top_row(d["id"], output.presence(d), d["sample"]) for d in devices]
    lines = [output.table(TOP_HEADERS, rows)]
    if device_id is not None and devices and (devices[0]["sample"] or {}).get("containers"):
        lines += ["", _containers_table(devices[0]["sample"])]
    return lines


def _follow_top(client: ControllerClient, fmt: str, device_id: str, limit: float | None) -> None:
    require_online(client, device_id)
    topic = topics.device(device_id, DeviceTopic.METRICS)
    client.watch(topic)
    ask(client, device_id, MetricsLiveCommand(duration=LIVE_S))
    started = time.monotonic()
    renew_at = started + LIVE_S / 3
    latest: dict[str, Any] | None = None
    idle = max(5.0, client.timeout)
    last_seen = time.monotonic()
    try:
        while limit is None or time.monotonic() - started < limit:
            if time.monotonic() >= renew_at:
                send(client, device_id, MetricsLiveCommand(duration=LIVE_S))  # its reply is not awaited
                renew_at = time.monotonic() + LIVE_S / 3
            try:
                _topic, payload = client.watched.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() - last_seen > idle:
                    raise RequestTimeout(
                        f"device {device_id} stopped sending samples (nothing for {idle:g}s)"
                    ) from None
                continue
            last_seen = time.monotonic()
            try:
                sample = codec.decode(payload, MetricsSample)
            except PayloadError:
                continue
            latest = merge_sample(latest, sample, time.time())
            if not sample.full:
                continue  # a periodic partial sample: the next live (full) one shows it
            if fmt == "json":
                click.echo(json.dumps(latest, sort_keys=True))
                continue
            row = _top_row(device_id, "online", latest)
            instances = " ".join(
                f"{key} {_percent(cpu)} {_size(mem) if mem is not None else '-'}"
                for key, (cpu, mem) in sorted((latest.get("containers") or {}).items())
            )
            click.echo(
                f"{output.when(latest['at'])[11:]}  cpu {row[2]}  mem {row[3]}  disk {row[4]}"
                + (f"  | {instances}" if instances else "")
            )
    except KeyboardInterrupt:
        sys.exit(130)
