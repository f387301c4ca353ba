"""``tether up``: the controller process, with the embedded broker (its child process) unless given another."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tether.protocol import names
from tether.protocol.errors import ConfigError, StoreError, TransportError
from tether.protocol.heap import tune_gc
from tether.protocol.mqtt import BrokerAddress, MqttClient, parse_broker_url
from tether.protocol.secret_files import private_dir, private_file, write_secret_text

from .agent_install import InstallFiles
from .dynsec import DynsecAdmin, DynsecTable
from .lease import lease_for
from .mosquitto import quickstart_tls, uses_dynsec, write_mosquitto_files
from .security import (
    OPERATOR_USER,
    ensure_controller_credentials,
    ensure_operator_credentials,
    issue_device_credentials,
    load_table,
)
from .service import Controller
from .store import Store, is_postgres_url
from .variables import SecretsKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpOptions:
    data_dir: Path
    db: str | None
    ha: bool
    broker: str | None
    bind: str
    port: int
    with_agent: bool
    agent_driver: str | None
    http: str | None = None
    http_tls: bool = False
    """Serve ``http`` over HTTPS with the TLS listener's certificate (``tls`` or ``tls_cert``)."""
    wheelhouse: Path | None = None
    """With ``http``: wheels of the agent's dependencies served at /wheels/ (agent_install.py)."""
    allow_anonymous: bool = False
    mosquitto_dir: Path | None = None
    """Keep Mosquitto's password and ACL files here, rewritten on every change."""
    tls: bool = False
    """The embedded broker listens with TLS only (quick-start CA unless ``tls_cert``/``tls_key``)."""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    """The CA clients verify the broker with (the operator's own; or for an external mqtts:// broker)."""
    tls_san: tuple[str, ...] = ()
    """More host names or addresses for the quick-start server certificate."""
    require_client_cert: bool = False
    """mTLS: every client presents a certificate from the quick-start CA; its CN is its username."""
    remember_operator: Callable[[Path], Path | None] | None = None
    """Called with the operator credentials file once written: the CLI's context ``local`` for
    this user (cli/contexts.py); returns the configuration file it wrote, if any."""
    audit_retention: float | None = 90 * 86400.0
    """Seconds the audit log keeps its records (None: for ever)."""
    presence_reread: float = 60.0
    """Seconds between two re-reads of the retained presence of devices not shown online (:mod:`.reread`)."""


def _agent_env(password: str | None) -> dict[str, str]:
    """The local agent's environment: its credentials for device ``local`` (never on its argv)."""
    env = dict(os.environ)
    if password is not None:
        env.update({"TETHER_USERNAME": "local", "TETHER_PASSWORD": password})
    return env


def _check_client_cert_options(options: UpOptions) -> None:
    if options.tls_cert or options.tls_key:
        raise StoreError(
            "--require-client-cert signs client certificates with the quick-start CA: use --tls, "
            "not --tls-cert/--tls-key"
        )
    if options.broker is None and not options.tls:
        raise StoreError("--require-client-cert needs --tls (or an mqtts:// --broker)")
    if options.broker is not None and not parse_broker_url(options.broker).tls:
        raise StoreError("--require-client-cert needs an mqtts:// --broker")


def broker_ca(options: UpOptions, tls: bool) -> tuple[Path | None, str]:
    """The CA file that verifies an external broker, and what it is (for the log): ``--tls-ca``
    when given; else over TLS the quick-start CA in ``{data_dir}/tls/`` when it exists (the
    one ``tether mosquitto-config --tls`` or ``tether up --tls`` made), needed with
    ``--require-client-cert``; else None, the system's CAs."""
    if options.tls_ca is not None:
        return options.tls_ca, f"the CA {options.tls_ca.resolve()} (--tls-ca)"
    quickstart_ca = options.data_dir / "tls" / "ca.pem"
    if options.require_client_cert or (tls and quickstart_ca.is_file()):
        return quickstart_ca, f"the quick-start CA {quickstart_ca.resolve()}"
    return None, "the system's CAs"


def _client_certificates(options: UpOptions, controller_user: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """mTLS: (our own, the operator's) client certificate and key files, from the quick-start CA."""
    from .tls import client_files

    ours = client_files(options.data_dir, controller_user, "controller")
    operator = client_files(options.data_dir, OPERATOR_USER, "operator")
    return (str(ours[0]), str(ours[1])), (str(operator[0]), str(operator[1]))


def _agent_command(url: str, options: UpOptions) -> list[str]:
    exe = shutil.which("tether-agent")
    base = [exe] if exe else [sys.executable, "-m", "tether.agent.main"]
    driver = options.agent_driver
    if driver is None:
        driver = "docker" if _docker_reachable() else "process"
    return [
        *base,
        "--broker",
        url,
        "--device-id",
        "local",
        "--label",
        "role=local",
        "--data-dir",
        str(options.data_dir / "agent"),
        "--driver",
        driver,
    ]


def _docker_reachable() -> bool:
    try:
        import docker  # noqa: TID251 - only a probe for the local agent's default driver

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


def _dynsec_admin(
    table: DynsecTable,
    address: BrokerAddress,
    credentials: tuple[str, str],
    ca_file: Path | None,
    client_cert: tuple[str, str] | None,
) -> MqttClient:
    """Connect the admin session for Mosquitto's dynamic security and bring it in step with
    the store (again after every reconnect, on a thread of its own)."""
    client = MqttClient(
        [address],
        client_id=f"tether-controller-admin-{uuid.uuid4().hex[:8]}",
        keepalive=30,
        username=credentials[0],
        password=credentials[1],
        ca_file=str(ca_file) if ca_file else None,
        client_cert=client_cert,
    )
    admin = DynsecAdmin(client)
    try:
        client.connect(15)
    except TransportError as exc:
        raise StoreError(
            f"{exc}: does Mosquitto load the dynamic security file written by `tether mosquitto-config` "
            "for this data directory (write it with Mosquitto stopped, then start it)?"
        ) from exc
    table.attach(admin)
    table.sync(time.time())

    def resync() -> None:
        try:
            table.sync(time.time())
        except StoreError as exc:
            log.error("%s", exc)

    client.on_connect = lambda: threading.Thread(target=resync, name="dynsec-sync", daemon=True).start()
    return client


def _session(data_dir: Path) -> tuple[str, bool]:
    """This controller's MQTT client id, kept in ``data_dir``, and whether it existed already."""
    path = data_dir / "mqtt-session"
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing.startswith("tether-controller-") and names.CLIENT_ID.ok(existing):
        private_file(path)  # anyone who reads it can take the controller's session over
        return existing, True
    session_id = f"tether-controller-{uuid.uuid4().hex[:12]}"
    write_secret_text(path, session_id + "\n")
    return session_id, False


def _check_port_free(host: str, port: int, flag: str) -> None:
    """Refuse a port something already listens on, before anything is written (issue 18)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            probe.bind((host or "0.0.0.0", port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host or '0.0.0.0'}:{port} ({exc.strerror or exc}): another `tether up` "
                f"or broker there? Choose another port with {flag} (0 picks a free one)"
            ) from None


def serve(options: UpOptions, echo: Callable[[str], None]) -> int:
    """Run until SIGTERM/SIGINT. Returns the exit status.

    A data directory this call made is removed again if the controller fails to start with
    its state in it (SQLite), so a failed first `tether up` leaves nothing behind.
    """
    if options.broker is None:
        _check_port_free(options.bind, options.port, "--port")
    if options.http:
        host, _, port_text = options.http.rpartition(":")
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ConfigError(f"--http {options.http}: expected HOST:PORT")
        _check_port_free(host or "127.0.0.1", int(port_text), "--http HOST:PORT")
    if options.http_tls and not options.http:
        raise ConfigError("--http-tls needs --http HOST:PORT")
    if options.http_tls and not (options.tls or options.tls_cert):
        raise ConfigError("--http-tls serves the broker's certificate: add --tls (or --tls-cert/--tls-key)")
    fresh = not options.data_dir.exists() and options.db is None
    started = threading.Event()
    try:
        return _serve(options, echo, started)
    except BaseException:
        if fresh and not started.is_set():
            shutil.rmtree(options.data_dir, ignore_errors=True)
        raise


def _serve(options: UpOptions, echo: Callable[[str], None], started: threading.Event) -> int:
    private_dir(options.data_dir)
    target = options.db or str(options.data_dir / "tether.db")
    if options.ha and not is_postgres_url(target):
        raise StoreError("--ha needs a PostgreSQL store (--db postgresql://...) shared by every controller")
    if options.ha and options.broker is None:
        raise StoreError("--ha needs an external broker with shared subscriptions (--broker mqtt://...)")
    lease = lease_for(target)
    store = Store(target)
    now = time.time()
    with store.transaction():
        credentials = ensure_controller_credentials(store, options.data_dir, now)
    dynsec = options.mosquitto_dir is not None and uses_dynsec(options.mosquitto_dir)
    if options.broker is None:  # the embedded broker, in a child process, keeps a copy of the table
        from tether.broker import BrokerTable

        table = load_table(store, options.allow_anonymous, BrokerTable)
    elif dynsec:  # Mosquitto's dynamic security plugin, updated at run time
        table = load_table(store, options.allow_anonymous, DynsecTable)
    else:
        table = load_table(store, options.allow_anonymous)
    secrets = SecretsKey.for_store(store, options.data_dir)  # before anything starts
    embedded = None
    ca_file = options.tls_ca
    client_cert: tuple[str, str] | None = None
    operator_cert: tuple[str, str] | None = None
    client_ca: str | None = None
    if options.require_client_cert:
        _check_client_cert_options(options)
    if options.broker is None:
        from tether.broker import EmbeddedBroker

        tls = None
        if options.tls or options.tls_cert:
            from .tls import operator_files, quickstart

            if options.tls_cert or options.tls_key:
                if not (options.tls_cert and options.tls_key):
                    raise StoreError("--tls-cert and --tls-key go together")
                files = operator_files(options.tls_cert, options.tls_key, options.tls_ca)
            else:
                extra = options.tls_san + (
                    (options.bind,) if options.bind not in ("0.0.0.0", "", "::") else ()
                )
                files = quickstart(options.data_dir, extra)
                echo(f"tether: TLS with the quick-start CA {files.ca.resolve() if files.ca else ''}")
            tls = (str(files.cert), str(files.key))
            ca_file = files.ca
            if options.require_client_cert and files.ca is not None:
                client_ca = str(files.ca)
        embedded = EmbeddedBroker(
            options.bind,
            options.port,
            table=table,
            tls=tls,
            client_ca=client_ca,
        )
        port = embedded.start()
        host = "127.0.0.1" if options.bind in ("0.0.0.0", "", "::") else options.bind
        address = BrokerAddress(host, port, tls=tls is not None)
        scheme = "mqtts" if tls else "mqtt"
        echo(f"tether: embedded broker listening on {scheme}://{options.bind}:{port}")
        if options.require_client_cert:
            echo("tether: clients need a certificate from the quick-start CA (its CN is the username)")
        if options.allow_anonymous:
            echo("tether: WARNING: anonymous clients allowed (--allow-anonymous): for a local demo only")
    else:
        address = parse_broker_url(options.broker)
        ca_file, which_ca = broker_ca(options, address.tls)
        echo(f"tether: using broker {address.url()}" + (f", verified with {which_ca}" if address.tls else ""))
    if options.require_client_cert:
        client_cert, operator_cert = _client_certificates(options, credentials[0])
    with store.transaction():
        operator_file = ensure_operator_credentials(
            store, options.data_dir, address.url(), now, ca_file if address.tls else None, operator_cert
        )
    use_credentials = embedded is not None or not options.allow_anonymous
    local_password = None
    if options.with_agent and use_credentials:
        local_password = issue_device_credentials(store, "local", now)
        table.new_secret("local", local_password)
    if operator_file is not None and dynsec:  # Mosquitto may not know it yet (a new store)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            table.new_secret(OPERATOR_USER, str(json.loads(operator_file.read_text())["password"]))
    table.replace(store.list_credentials())
    if operator_file is not None:
        echo(f"tether: operator credentials in {operator_file.resolve()} (tether --credentials FILE)")
        remembered = options.remember_operator(operator_file) if options.remember_operator else None
        if remembered is not None:
            echo(f"tether: the CLI finds them from any directory: context 'local' in {remembered}")
    controller = Controller(
        store,
        lease=lease,
        ha=options.ha,
        table=table,
        credentials=credentials if use_credentials else None,
        ca_file=ca_file if address.tls else None,
        secrets=secrets,
    )
    controller.audit_retention = options.audit_retention
    controller.ingestor.reread.every = options.presence_reread
    if client_cert is not None:
        from .tls import issue_client

        controller.context.access.client_cert = client_cert
        ca_pem = (options.data_dir / "tls" / "ca.pem").read_text()
        controller.context.access.issue_certificate = lambda name: (
            *issue_client(options.data_dir, name),
            ca_pem,
        )
    if embedded is not None:
        controller.context.access.disconnect_users = embedded.disconnect_users
        controller.metrics.lockouts.doors["mqtt"] = embedded.lockouts
    elif isinstance(table, DynsecTable):  # deleting a client disconnected it: those that were online
        controller.context.access.disconnect_users = lambda users: sum(
            1 for d in store.list_devices() if d.id in users and d.status == "online"
        )
    admin: MqttClient | None = None
    if isinstance(table, DynsecTable):
        admin = _dynsec_admin(table, address, credentials, ca_file if address.tls else None, client_cert)
        echo(f"tether: Mosquitto's dynamic security in step with the store ({options.mosquitto_dir})")
    elif options.mosquitto_dir is not None:
        mosquitto_dir = options.mosquitto_dir

        listener = None  # the quick-start CA's files, if the broker uses them (mosquitto-config --tls)
        if address.tls and (options.data_dir / "tls" / "server.pem").is_file():
            listener = quickstart_tls(options.data_dir, (), options.require_client_cert)

        def write_mosquitto() -> None:
            write_mosquitto_files(  # mosquitto.conf: `tether mosquitto-config`'s, kept as it is
                mosquitto_dir,
                table.credentials(),
                table.all_stacks(),
                address.port,
                listener,
                conf=not (mosquitto_dir / "mosquitto.conf").exists(),
            )
            log.info(
                "Mosquitto password and ACL files rewritten in %s (reload Mosquitto: SIGHUP)", mosquitto_dir
            )

        controller.context.access.on_credentials_changed = write_mosquitto
        write_mosquitto()
        echo(f"tether: Mosquitto password and ACL files in {mosquitto_dir.resolve()}")
    http: HttpServer | None = None
    agent: subprocess.Popen[bytes] | None = None
    stop = threading.Event()
    code = 0
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        session_id, session_known = (None, False) if embedded or options.ha else _session(options.data_dir)
        controller.start(
            address, fresh_broker=embedded is not None, session_id=session_id, session_known=session_known
        )
        tune_gc()  # after start-up: a long-lived heap, see protocol/heap.py
        if options.http:
            host, _, port_text = options.http.rpartition(":")
            install = InstallFiles.load(address, ca_file if address.tls else None, options.wheelhouse)
            from .http import HttpServer  # FastAPI and uvicorn: imported only when serving

            certificate = None
            if options.http_tls:  # the TLS listener's own certificate and key
                if options.tls_cert and options.tls_key:
                    certificate = (options.tls_cert, options.tls_key)
                else:
                    certificate = (
                        options.data_dir / "tls" / "server.pem",
                        options.data_dir / "tls" / "server.key",
                    )
                install.scheme = "https"
            http = HttpServer(
                controller, host or "127.0.0.1", int(port_text), install, certificate=certificate
            )
            http.start()
            shown = host or "127.0.0.1"
            if shown in ("0.0.0.0", "::"):
                shown = socket.gethostname()
            scheme = install.scheme
            cacert = " --cacert ca.pem" if certificate is not None and ca_file is not None else ""
            echo(f"tether: health and metrics on {scheme}://{shown}:{http.port}/metrics")
            echo(
                f"tether: HTTP API on {scheme}://{shown}:{http.port}/api/v1/ (its OpenAPI document: /api/v1/openapi.json)"
            )
            echo(
                f"tether: device install (tether-agent {install.version}): curl -fsSL{cacert} "
                f"{scheme}://{shown}:{http.port}/install.sh | sudo sh -s -- --token TOKEN (tether tokens create)"
            )
        controller.ready.wait(15)
        started.set()
        role = "leader" if controller.leading.is_set() else "standby"
        echo(
            f"tether: controller ready ({role}; state in {'PostgreSQL' if store.kind == 'postgresql' else target})"
        )
        if options.with_agent:
            cmd = _agent_command(address.url(), options)
            if address.tls and ca_file is not None:
                cmd += ["--ca-file", str(ca_file)]
            if client_cert is not None:
                from .tls import client_files

                local_cert, local_key = client_files(options.data_dir, "local", "local")
                cmd += ["--tls-cert", str(local_cert), "--tls-key", str(local_key)]
            agent = subprocess.Popen(cmd, env=_agent_env(local_password))
            echo(f"tether: local agent started (device 'local', driver {cmd[cmd.index('--driver') + 1]})")
        while not stop.wait(0.5):
            if controller.lost_leadership.is_set():
                code = 3
                break
            if embedded is not None and not embedded.running:  # its process died (logged)
                code = 1
                break
    finally:
        echo("tether: shutting down")
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
        if http is not None:
            http.stop()
        controller.stop()
        if admin is not None:
            admin.stop()
        if embedded is not None:
            embedded.stop()
        store.close()
        lease.release()
    return code
