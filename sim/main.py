"""``tether-sim``: run a simulated fleet against a broker for a while, then print a summary.

    tether-sim --broker mqtt://127.0.0.1:1883 --devices 1000 --labels site=sim --prefix sim \\
        --duration 120 --start-delay 0.2 --fail-fraction 0

Each device is ``{prefix}-{i:05d}`` with its own MQTT session (client id ``tether-{id}``,
persistent session, its own will) running the agent's real core. Point a controller
(``tether up``) at the same broker and deploy to a group matching the labels.

``--processes N`` splits the fleet into N processes (contiguous ranges of device numbers,
each ``tether-sim`` with its own ``--first-index``, connect rate and concurrency divided
among them) and prints one summary for all: one process holds one socket per device, and
one event loop is one core.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
from tether.protocol import labels as label_rules
from tether.protocol.errors import ConfigError
from tether.protocol.logsafe import log_to_stderr
from tether.protocol.mqtt import parse_broker_url

from .fleet import Fleet, FleetConfig, raise_fd_limit


def _labels(text: tuple[str, ...]) -> dict[str, str]:
    items = [item for chunk in text for item in chunk.split(",") if item.strip()]
    try:
        return label_rules.parse(items)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--labels") from None


def _progress(fleet: Fleet) -> None:
    gens = fleet.generation_counts()
    parts = ", ".join(f"gen {g}: {r['converged']}/{r['devices']}" for g, r in gens.items())
    click.echo(
        f"tether-sim: {fleet.connected()}/{len(fleet.devices)} connected "
        f"({sum(d.connects for d in fleet.devices)} connects); {parts}; "
        f"in {fleet.counters.messages_in} / out {fleet.counters.messages_out} messages",
        err=True,
    )


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"devices:     {summary['devices']} ({summary['failing_devices']} told to fail)",
        f"connected:   {summary['connected']} (connects {summary['connects']}, "
        f"failed attempts {summary['refused_or_failed_connects']}, lost {summary['connections_lost']})",
        f"messages:    {summary['messages_in']} in, {summary['messages_out']} out "
        f"({summary['bytes_in']} / {summary['bytes_out']} bytes)",
        f"reconciles:  {summary['reconciles']} (and {summary['idle_reconciles_skipped']} skipped: nothing to see)",
        f"elapsed:     {summary['elapsed_s']:.1f} s",
        "generations (desired generation held: devices, converged, failed):",
    ]
    for gen, row in summary["generations"].items():
        label = "none" if gen == "-1" else gen
        lines.append(
            f"  {label:>6}: {row['devices']} devices, {row['converged']} converged, {row['failed']} failed"
        )
    return "\n".join(lines)


def merge_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One summary for a fleet run as several processes: counts added, generations merged."""
    total: dict[str, Any] = {}
    generations: dict[str, dict[str, int]] = {}
    for part in parts:
        for key, value in part.items():
            if key == "generations":
                for gen, row in value.items():
                    into = generations.setdefault(gen, {"devices": 0, "converged": 0, "failed": 0})
                    for k, v in row.items():
                        into[k] = into.get(k, 0) + v
            elif key == "elapsed_s":
                total[key] = max(total.get(key, 0.0), value)
            elif isinstance(value, bool):
                total[key] = total.get(key, True) and value
            elif isinstance(value, int | float):
                total[key] = total.get(key, 0) + value
    total["generations"] = dict(sorted(generations.items(), key=lambda kv: int(kv[0])))
    total["processes"] = len(parts)
    return total


def run_processes(processes: int, devices: int, first_index: int, argv: list[str]) -> dict[str, Any]:
    """Run the fleet as ``processes`` child ``tether-sim`` processes; their merged summary.

    ``argv``: the options every child gets; each is given its range of devices
    (``--devices``, ``--first-index``) and where to write its summary. SIGINT and SIGTERM
    are passed on: every child stops its devices cleanly."""
    base, extra = divmod(devices, processes)
    children: list[tuple[subprocess.Popen[bytes], Path]] = []
    with tempfile.TemporaryDirectory(prefix="tether-sim-") as tmp:
        start = first_index
        for k in range(processes):
            count = base + (1 if k < extra else 0)
            summary_path = Path(tmp) / f"part-{k}.json"
            child_argv = [sys.executable, "-m", "tether.sim", *argv]
            child_argv += ["--devices", str(count), "--first-index", str(start), "--json", str(summary_path)]
            # The child's own summary goes to its file; its progress lines stay on stderr.
            proc = subprocess.Popen(child_argv, stdout=subprocess.DEVNULL)
            children.append((proc, summary_path))
            start += count

        def forward(signum: int, _frame: object) -> None:
            for proc, _ in children:
                if proc.poll() is None:
                    proc.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            codes = [proc.wait() for proc, _ in children]
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        failed = [k for k, code in enumerate(codes) if code != 0]
        if failed:
            raise click.ClickException(
                f"simulator process(es) {', '.join(map(str, failed))} of {processes} exited with an error"
            )
        return merge_summaries([json.loads(path.read_text()) for _, path in children])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--broker", default="mqtt://127.0.0.1:1883", show_default=True, help="Broker URL (mqtt:// only)."
)
@click.option("--devices", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--labels", "labels", multiple=True, help="Labels of every device: k=v[,k=v]; repeatable.")
@click.option("--shard-label", default=None, help="KEY=N: device i also gets label KEY=i%N.")
@click.option(
    "--prefix", default="sim", show_default=True, help="Device ids are PREFIX-00000, PREFIX-00001..."
)
@click.option("--first-index", type=int, default=0, show_default=True, help="Number of the first device.")
@click.option("--duration", type=float, default=120.0, show_default=True, help="Seconds to run, then stop.")
@click.option(
    "--start-delay", type=float, default=0.2, show_default=True, help="Seconds an instance takes to start."
)
@click.option("--fail-fraction", type=click.FloatRange(0, 1), default=0.0, show_default=True)
@click.option("--fail-labels", default=None, help="k=v[,k=v]: devices with these labels fail every create.")
@click.option("--keepalive", type=int, default=60, show_default=True)
@click.option("--reconcile-interval", type=float, default=10.0, show_default=True)
@click.option("--connect-rate", type=float, default=1000.0, show_default=True, help="New devices per second.")
@click.option("--connect-concurrency", type=int, default=200, show_default=True, help="Handshakes in flight.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Split the fleet over this many processes (one socket per device: a process holds "
    "at most the open-file limit).",
)
@click.option(
    "--hash-cache/--no-hash-cache",
    default=True,
    show_default=True,
    help="Decode a stack definition once per distinct payload (pure, saves CPU; see tether.sim.hashcache).",
)
@click.option(
    "--progress", type=float, default=5.0, show_default=True, help="Seconds between progress lines."
)
@click.option("--json", "json_path", default=None, help="Also write the summary as JSON to this file.")
@click.option("--log-level", default="error", type=click.Choice(["debug", "info", "warning", "error"]))
def main(
    broker: str,
    devices: int,
    labels: tuple[str, ...],
    shard_label: str | None,
    prefix: str,
    first_index: int,
    duration: float,
    start_delay: float,
    fail_fraction: float,
    fail_labels: str | None,
    keepalive: int,
    reconcile_interval: float,
    connect_rate: float,
    connect_concurrency: int,
    seed: int,
    processes: int,
    hash_cache: bool,
    progress: float,
    json_path: str | None,
    log_level: str,
) -> None:
    """Simulate a fleet of Tether agents in one process."""
    log_to_stderr(log_level, "%(levelname)s %(name)s: %(message)s")
    try:
        address = parse_broker_url(broker)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--broker") from exc
    if address.tls:
        raise click.BadParameter("the simulator speaks plain MQTT only (mqtt://)", param_hint="--broker")
    shard = None
    if shard_label:
        key, _, n = shard_label.partition("=")
        if not key or not n.isdigit() or int(n) < 1:
            raise click.BadParameter("expected KEY=N", param_hint="--shard-label")
        shard = (key, int(n))
    config = FleetConfig(
        broker=broker,
        devices=devices,
        prefix=prefix,
        first_index=first_index,
        labels=_labels(labels),
        shard_label=shard,
        start_delay=start_delay,
        fail_fraction=fail_fraction,
        fail_labels=_labels((fail_labels,)) if fail_labels else None,
        keepalive=keepalive,
        reconcile_interval=reconcile_interval,
        connect_rate=connect_rate,
        connect_concurrency=connect_concurrency,
        duration=duration,
        seed=seed,
        cache_hashes=hash_cache,
    )
    if processes > 1:
        if processes > devices:
            raise click.BadParameter(f"{processes} processes for {devices} devices", param_hint="--processes")
        argv = ["--broker", broker, "--prefix", prefix, "--duration", str(duration)]
        argv += ["--start-delay", str(start_delay), "--fail-fraction", str(fail_fraction)]
        argv += ["--keepalive", str(keepalive), "--reconcile-interval", str(reconcile_interval)]
        argv += ["--connect-rate", str(connect_rate / processes)]
        argv += ["--connect-concurrency", str(max(1, connect_concurrency // processes))]
        argv += ["--seed", str(seed), "--progress", str(progress), "--log-level", log_level]
        argv += ["--hash-cache" if hash_cache else "--no-hash-cache"]
        for chunk in labels:
            argv += ["--labels", chunk]
        if shard_label:
            argv += ["--shard-label", shard_label]
        if fail_labels:
            argv += ["--fail-labels", fail_labels]
        click.echo(
            f"tether-sim: {devices} devices ({prefix}-...) in {processes} processes against "
            f"{address.url()} for {duration:g} s",
            err=True,
        )
        summary = run_processes(processes, devices, first_index, argv)
    else:
        try:
            raise_fd_limit(devices)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--devices") from None
        summary = run_one(config, progress, duration, address.url())
    click.echo(format_summary(summary))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=2)
    sys.exit(0)


def run_one(config: FleetConfig, progress: float, duration: float, url: str) -> dict[str, Any]:
    """Run the fleet in this process; its summary."""
    fleet = Fleet(config)

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, fleet.stop)
        return await fleet.run(
            on_tick=_progress if progress > 0 else None, tick=progress if progress > 0 else 5.0
        )

    click.echo(
        f"tether-sim: {config.devices} devices ({config.prefix}-...) against {url} for {duration:g} s",
        err=True,
    )
    return asyncio.run(run())


if __name__ == "__main__":  # pragma: no cover
    main()
