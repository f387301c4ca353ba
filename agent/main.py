"""``tether-agent``: the device agent's command line."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click
from tether.protocol import __version__
from tether.protocol.errors import ConfigError, DriverError
from tether.protocol.logsafe import log_to_stderr
from tether.protocol.secret_files import private_dir

from .config import AgentConfig, load_config, parse_labels
from .drivers.base import Driver


def make_driver(config: AgentConfig) -> Driver:
    """The runtime driver the configuration asks for."""
    if config.driver == "docker":
        from .drivers.docker import DockerDriver

        return DockerDriver(config.device_id)
    from .drivers.process import ProcessDriver

    return ProcessDriver(config.device_id, config.data_dir)


def set_hold(config: AgentConfig, on: bool) -> None:
    """Create or remove the hold file that a running agent checks before applying updates."""
    from .runner import HOLD_FILE

    path = config.data_dir / HOLD_FILE
    private_dir(config.data_dir)
    if on:
        path.touch()
        click.echo(f"tether-agent: updates held on {config.device_id} ({path}); release with --release")
    else:
        path.unlink(missing_ok=True)
        click.echo(f"tether-agent: updates released on {config.device_id}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--broker", "brokers", multiple=True, help="Broker URL (mqtt://host:port); repeat for fallbacks."
)
@click.option("--device-id", help="This device's id (default: the host name).")
@click.option("--label", "labels", multiple=True, help="A device label key=value; repeatable.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where the agent keeps its state.")
@click.option("--driver", type=click.Choice(["docker", "process"]), help="Runtime driver (default docker).")
@click.option("--config", "config_file", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--keepalive", type=int, help="MQTT keepalive in seconds (default 60).")
@click.option("--reconcile-interval", type=float, help="Seconds between reconciles (default 10).")
@click.option("--labels-command", help="Shell command printing key=value lines: dynamic labels.")
@click.option("--labels-interval", type=float, help="Seconds between runs of --labels-command (default 300).")
@click.option(
    "--metrics-interval",
    type=float,
    help="Seconds between metric samples (default 300, or 2 keepalives if longer; 0: off).",
)
@click.option(
    "--metrics-full-interval", type=float, help="Seconds between full metric samples (default 900)."
)
@click.option(
    "--metrics-threshold",
    type=float,
    help="Send a metric when it moved more than this, % points (default 5).",
)
@click.option("--username", help="Broker username (default: {data-dir}/credentials.json if it exists).")
@click.option(
    "--password", help="Broker password (prefer TETHER_PASSWORD or the config file: argv is public)."
)
@click.option(
    "--ca-file", type=click.Path(path_type=Path), help="CA certificate to verify mqtts:// brokers with."
)
@click.option(
    "--tls-cert",
    type=click.Path(path_type=Path),
    help="Client certificate (PEM, CN = device id) for a broker that requires one; with --tls-key.",
)
@click.option("--tls-key", type=click.Path(path_type=Path), help="The client certificate's private key.")
@click.option(
    "--enrollment-token",
    help="Fleet enrollment token: without credentials, join with it (prefer TETHER_ENROLLMENT_TOKEN).",
)
@click.option(
    "--download-rate-limit",
    help="Image downloads at most this fast: 2mbit, 256kbit, 500KB (default: no limit).",
)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option(
    "--hold", "hold", flag_value="hold", default=None, help="Hold updates on this device, then exit."
)
@click.option(
    "--release", "hold", flag_value="release", help="Release a hold (updates apply again), then exit."
)
@click.version_option(__version__, prog_name="tether-agent")
def main(
    brokers: tuple[str, ...],
    device_id: str | None,
    labels: tuple[str, ...],
    data_dir: Path | None,
    driver: str | None,
    config_file: Path | None,
    keepalive: int | None,
    reconcile_interval: float | None,
    metrics_interval: float | None,
    metrics_full_interval: float | None,
    metrics_threshold: float | None,
    labels_command: str | None,
    labels_interval: float | None,
    username: str | None,
    password: str | None,
    ca_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    enrollment_token: str | None,
    download_rate_limit: str | None,
    log_level: str,
    hold: str | None,
) -> None:
    """Run the Tether device agent: keep this device's stacks as the controller wants them."""
    log_to_stderr(log_level)
    try:
        flags: dict[str, Any] = {
            "brokers": list(brokers),
            "device_id": device_id,
            "labels": parse_labels(labels, "--label") if labels else None,
            "data_dir": data_dir,
            "driver": driver,
            "keepalive": keepalive,
            "reconcile_interval": reconcile_interval,
            "labels_command": labels_command,
            "labels_interval": labels_interval,
            "metrics_interval": metrics_interval,
            "metrics_full_interval": metrics_full_interval,
            "metrics_threshold": metrics_threshold,
            "username": username,
            "password": password,
            "enrollment_token": enrollment_token,
            "ca_file": ca_file,
            "tls_cert": tls_cert,
            "tls_key": tls_key,
            "download_rate_limit": download_rate_limit,
        }
        config = load_config(config_file, os.environ, flags)
        config.credentials()  # a broken credentials file is a config error, said once
        config.check_tls()  # so is a missing or wrong CA, certificate or key file
        if hold is not None:
            set_hold(config, hold == "hold")
            return
        private_dir(config.data_dir)  # before anything is written into it
        runtime = make_driver(config)
    except (ConfigError, DriverError) as exc:
        click.echo(f"tether-agent: {exc}", err=True)
        sys.exit(2)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    from . import enroll

    if enroll.needs_enrollment(config):
        try:
            if not enroll.enroll(config, stop):
                return
        except ConfigError as exc:
            click.echo(f"tether-agent: {exc}", err=True)
            sys.exit(2)

    from .runner import Agent

    agent = Agent(config, runtime)
    click.echo(
        f"tether-agent {__version__}: device {config.device_id}, driver {runtime.name}, "
        f"brokers {', '.join(config.brokers)}",
        err=True,
    )
    agent.run(stop)


if __name__ == "__main__":  # pragma: no cover
    main()
