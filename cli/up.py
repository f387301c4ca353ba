"""``tether up`` (the controller, and the embedded broker) and ``tether mosquitto-config``
(Mosquitto's files from the store): the commands that run on the controller's machine and
read its data directory, not through a broker."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import click
from tether.protocol.errors import TetherError
from tether.protocol.logsafe import log_to_stderr

from . import contexts, users
from .common import duration_option, fail


@click.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("tether-data"), show_default=True)
@click.option(
    "--db",
    envvar="TETHER_DB",
    default=None,
    help="State store: postgresql://user@host/db (default: SQLite in --data-dir).",
)
@click.option(
    "--ha", is_flag=True, help="High availability: several controllers on one PostgreSQL and broker."
)
@click.option(
    "--broker", default=None, help="Use this external broker (mqtt://host:port) instead of the embedded one."
)
@click.option(
    "--bind", default="127.0.0.1", show_default=True, help="Address the embedded broker listens on."
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=1883, show_default=True, help="0 picks a free port."
)
@click.option("--with-agent/--no-agent", default=False, help="Also run a local agent (device id 'local').")
@click.option("--agent-driver", type=click.Choice(["docker", "process"]), default=None)
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option(
    "--log-format", default="text", type=click.Choice(["text", "json"]), help="json: one object per line."
)
@click.option(
    "--http",
    default=None,
    help="Serve /healthz, /readyz, /metrics, the device install (/install.sh), the HTTP API "
    "(/api/v1) and the web UI (/ui/) on HOST:PORT (port 0 picks one).",
)
@click.option(
    "--http-tls",
    is_flag=True,
    help="Serve --http over HTTPS with the broker's certificate (--tls: the quick-start CA's; "
    "or --tls-cert/--tls-key).",
)
@click.option(
    "--wheelhouse",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="With --http: serve these wheels (the agent's dependencies) to devices without the package index.",
)
@click.option(
    "--allow-anonymous",
    is_flag=True,
    help="Let clients without credentials do anything (a local demo only; default: refused).",
)
@click.option(
    "--mosquitto-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Keep Mosquitto's password/ACL files here, rewritten on every credential or stack change.",
)
@click.option(
    "--tls", is_flag=True, help="Embedded broker with TLS only (a quick-start CA in --data-dir/tls)."
)
@click.option(
    "--tls-cert", type=click.Path(path_type=Path, dir_okay=False), help="Your server certificate (PEM)."
)
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False), help="Its private key (PEM).")
@click.option(
    "--tls-ca",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The CA clients verify the broker with (written to operator.json). With an mqtts:// "
    "--broker, default: the quick-start CA in DATA_DIR/tls/ if it exists, else the system's CAs.",
)
@click.option(
    "--tls-san", multiple=True, help="Another host name or address for the quick-start certificate."
)
@click.option(
    "--require-client-cert",
    is_flag=True,
    help="mTLS: every client needs a certificate from the quick-start CA; its CN is its username.",
)
@click.option(
    "--audit-retention",
    default="90d",
    show_default=True,
    help="How long the audit log keeps its records (30d, 12h), or 'forever'.",
)
@click.option(
    "--presence-reread",
    default="60s",
    show_default=True,
    callback=duration_option,
    help="How often the broker's retained presence of the devices not shown online is read again "
    "(a presence message the broker dropped is not lost for good; docs/architecture.md).",
)
def up(
    data_dir: Path,
    db: str | None,
    ha: bool,
    broker: str | None,
    bind: str,
    port: int,
    with_agent: bool,
    agent_driver: str | None,
    log_level: str,
    log_format: str,
    http: str | None,
    http_tls: bool,
    wheelhouse: Path | None,
    allow_anonymous: bool,
    mosquitto_dir: Path | None,
    tls: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_ca: Path | None,
    tls_san: tuple[str, ...],
    require_client_cert: bool,
    audit_retention: str,
    presence_reread: float,
) -> None:
    """Start the controller (and the embedded broker unless --broker is given)."""
    if presence_reread <= 0:
        raise click.BadParameter("must be more than 0", param_hint="'--presence-reread'")
    retention = (
        None if audit_retention == "forever" else users.days_or_duration(audit_retention, "--audit-retention")
    )
    import logging

    if log_format == "json":
        from tether.controller.observability import JsonFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=getattr(logging, log_level.upper()), handlers=[handler])
    else:
        log_to_stderr(log_level)  # text lines, control characters in messages escaped
    try:
        from tether.controller.app import UpOptions, serve
    except ImportError as exc:
        fail(f"the controller is not installed ({exc.name} missing): pip install 'tether[controller]'", 2)
    try:
        code = serve(
            UpOptions(
                data_dir,
                db,
                ha,
                broker,
                bind,
                port,
                with_agent,
                agent_driver,
                http,
                http_tls=http_tls,
                wheelhouse=wheelhouse,
                allow_anonymous=allow_anonymous,
                mosquitto_dir=mosquitto_dir,
                tls=tls,
                tls_cert=tls_cert,
                tls_key=tls_key,
                tls_ca=tls_ca,
                tls_san=tls_san,
                require_client_cert=require_client_cert,
                remember_operator=contexts.remember_local,
                audit_retention=retention,
                presence_reread=presence_reread,
            ),
            _status_line(log_format),
        )
    except TetherError as exc:
        fail(str(exc))
    sys.exit(code)


def _status_line(log_format: str) -> Callable[[str], None]:
    """How `tether up` reports its status lines: plain on stdout, or as JSON log records."""
    if log_format != "json":
        return lambda line: click.echo(line, err=False)
    import logging

    logger = logging.getLogger("tether.up")
    return lambda line: logger.info(line.removeprefix("tether: "))


@click.command("mosquitto-config")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True, help="Directory.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("tether-data"), show_default=True)
@click.option("--db", envvar="TETHER_DB", default=None, help="State store (default: SQLite in --data-dir).")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=1883, show_default=True, help="For the snippet."
)
@click.option("--tls", is_flag=True, help="A TLS listener with the quick-start CA in --data-dir/tls.")
@click.option(
    "--bind",
    default=None,
    help="The listener's address (default: 127.0.0.1 without --tls, every interface with --tls).",
)
@click.option("--tls-san", multiple=True, help="Another host name or address for its server certificate.")
@click.option(
    "--require-client-cert",
    is_flag=True,
    help="mTLS (with --tls): clients need a certificate from the quick-start CA; its CN is the username.",
)
@click.option(
    "--files",
    is_flag=True,
    help="Static password and ACL files instead of the dynamic security plugin (no enrollment; "
    "a revocation needs a Mosquitto restart).",
)
@click.option("--plugin", default=None, help="The dynamic security plugin's path (default: found).")
def mosquitto_config(
    out: Path,
    data_dir: Path,
    db: str | None,
    port: int,
    tls: bool,
    bind: str | None,
    tls_san: tuple[str, ...],
    require_client_cert: bool,
    files: bool,
    plugin: str | None,
) -> None:
    """Write Mosquitto's dynamic security file (or password and ACL files) and a mosquitto.conf
    snippet from the store (docs/security.md). Stop Mosquitto first, start it after."""
    if require_client_cert and not tls:
        fail("--require-client-cert needs --tls")
    try:
        from tether.controller.mosquitto import quickstart_tls, write_dynsec_files, write_mosquitto_files
        from tether.controller.security import (
            ensure_controller_credentials,
            ensure_operator_credentials,
            load_table,
        )
        from tether.controller.store import Store
        from tether.protocol.secret_files import private_dir
    except ImportError as exc:
        fail(f"the controller is not installed ({exc.name} missing): pip install 'tether[controller]'", 2)
    target = db or str(data_dir / "tether.db")
    try:
        private_dir(data_dir)
        listener = quickstart_tls(data_dir, tls_san, require_client_cert) if tls else None
        operator_cert = None
        if require_client_cert:
            from tether.controller.security import OPERATOR_USER
            from tether.controller.tls import client_files

            cert_file, key_file = client_files(data_dir, OPERATOR_USER, "operator")
            operator_cert = (str(cert_file), str(key_file))
        store = Store(target)
        try:  # what `tether up` would create first, so that Mosquitto knows them before it starts
            with store.transaction():
                ensure_controller_credentials(store, data_dir, time.time())
                operator_file = ensure_operator_credentials(
                    store,
                    data_dir,
                    f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{port}",
                    time.time(),
                    listener.cafile if listener else None,
                    operator_cert,
                )
            table = load_table(store, allow_anonymous=False)
        finally:
            store.close()
        if files:
            (out / "dynamic-security.json").unlink(missing_ok=True)  # back to the static files
            written = write_mosquitto_files(
                out, table.credentials(), table.all_stacks(), port, listener, bind=bind
            )
        else:
            written = write_dynsec_files(
                out, table.credentials(), table.all_stacks(), port, listener, bind, plugin
            )
    except (TetherError, OSError) as exc:
        fail(str(exc))
    for path in written:
        click.echo(f"wrote {path}")
    if not files:
        click.echo(
            "Mosquitto keeps dynamic-security.json in memory and writes it back: it must not run while "
            "the file is written; (re)start it now, then `tether up --mosquitto-dir` with this directory"
        )
    if operator_file is not None:
        click.echo(f"operator credentials in {operator_file.resolve()}")


def register(main: click.Group) -> None:
    main.add_command(up)
    main.add_command(mosquitto_config)
