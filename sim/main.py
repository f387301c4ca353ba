"""``tether-sim``: run a simulated fleet against a broker for a while, then print a summary.

    tether-sim --broker mqtt://127.0.0.1:1883 --devices 1000 --labels site=sim --prefix sim \\
        --duration 120 --start-delay 0.2 --fail-fraction 0

Each device is ``{prefix}-{i:05d}`` with its own MQTT session (client id ``tether-{id}``,
persistent session, its own will) running the agent's real core. Point a controller
(``tether up``) at the same broker and deploy to a group matching the labels.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import click
from tether.protocol import labels as label_rules
from tether.protocol.errors import ConfigError
from tether.protocol.logsafe import log_to_stderr
from tether.protocol.mqtt import parse_broker_url

from .fleet import Fleet, FleetConfig


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
        f"tether-sim: {fleet.connected()}/{len(fleet.devices)} connected; {parts}; "
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
    "--hash-cache/--no-hash-cache",
    default=True,
    show_default=True,
    help="Memoise spec hashes (pure, saves CPU; see tether.sim.hashcache).",
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
    fleet = Fleet(config)

    async def run() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, fleet.stop)
        return await fleet.run(
            on_tick=_progress if progress > 0 else None, tick=progress if progress > 0 else 5.0
        )

    click.echo(
        f"tether-sim: {devices} devices ({prefix}-...) against {address.url()} for {duration:g} s", err=True
    )
    summary = asyncio.run(run())
    click.echo(format_summary(summary))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=2)
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
