"""``tether devices ls|show|label|credentials|revoke|rm``: the devices of the fleet.

cli/remote.py adds ``restart``, ``facts`` and ``top`` to this group, cli/enroll.py
``pending``, ``approve`` and ``reject``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from tether.protocol import labels as label_rules
from tether.protocol.client import ControllerClient
from tether.protocol.commands import (
    DEVICES_PAGE_MAX,
    DevicesCredentials,
    DevicesLabel,
    DevicesList,
    DevicesRemove,
    DevicesRevoke,
    DevicesShow,
)
from tether.protocol.errors import TetherError

from . import output, remote
from .common import common, read_pages, send_and_print


@click.group()
def devices() -> None:
    """Devices of the fleet."""


LS_PAGE = DEVICES_PAGE_MAX
"""Devices per ``devices.ls`` request. The whole fleet in one reply passes the message limit
past some 25,000 devices (about 170 bytes each): the controller answers ``too_large``."""


@devices.command("ls")
@common
def devices_ls(client: ControllerClient, fmt: str) -> None:
    """List devices with their presence and stacks."""
    _, rows = read_pages(client, lambda after: DevicesList(after=after, limit=LS_PAGE), "devices")
    if fmt == "json":
        click.echo(output.to_json(rows))
    else:
        click.echo(_devices_table(rows))


def _devices_table(devices: list[dict[str, Any]]) -> str:
    rows = [
        (
            d["id"],
            output.presence(d) + (", storage error" if d.get("storage_error") else ""),
            output.labels(d["labels"]),
            f"{d['applied_generation'] if (d['applied_generation'] or -1) >= 0 else '-'}/"
            f"{d['desired_generation'] if d['desired_generation'] is not None else '-'}",
            ", ".join(f"{k}:{v}" for k, v in sorted(d["stacks"].items())) or "-",
        )
        for d in devices
    ]
    return output.table(["DEVICE", "PRESENCE", "LABELS", "GEN (APPLIED/DESIRED)", "STACKS"], rows)


@devices.command("show")
@click.argument("device_id")
@common
def devices_show(client: ControllerClient, fmt: str, device_id: str) -> None:
    """Show one device: facts, desired and reported state, recent events."""
    d = client.request(DevicesShow(device_id=device_id))["device"]
    if fmt == "json":
        click.echo(output.to_json(d))
        return
    remote.add_live_facts(client, d)  # asks the device itself when it is online
    facts = d.get("facts") or {}
    show = output.printable
    click.echo(f"device:     {show(d['id'])}")
    click.echo(f"presence:   {output.presence(d)} (session {d['session']})")
    click.echo(f"labels:     {output.labels(d['labels'], d.get('label_sources', {}))}")
    if any(source == "device" for source in d.get("label_sources", {}).values()):
        click.echo("            ([device] labels and facts match only groups that trust device labels)")
    for key, title in (
        ("agent_version", "agent"),
        ("driver", "driver"),
        ("arch", "arch"),
        ("os", "os"),
        ("hostname", "hostname"),
    ):
        if key in facts:
            click.echo(f"{title + ':':<11} {show(facts[key])}")
    remote.echo_host_facts(d)
    click.echo(f"generation: applied {d['applied_generation']} / desired {d['desired_generation']}")
    reported = d.get("reported") or {}
    if reported.get("error"):
        click.echo(f"error:      {show(reported['error'])}")
    if reported.get("storage_error"):
        click.echo(f"storage:    {show(reported['storage_error'])}")
    rows = []
    for stack, status in sorted((reported.get("stacks") or {}).items()):
        for svc, s in status["services"].items():
            rows.append(
                (
                    stack,
                    svc,
                    s["state"],
                    s.get("health") or "",
                    s.get("restarts", 0),
                    s.get("last_error") or "",
                )
            )
    if rows:
        click.echo("")
        click.echo(output.table(["STACK", "SERVICE", "STATE", "HEALTH", "RESTARTS", "LAST ERROR"], rows))
    if d.get("dropped"):
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(d["dropped"].items()))
        click.echo(f"dropped:    {show(counts)} (messages not stored as sent: docs/security.md)")
    if d.get("events"):
        click.echo("\nrecent events:")
        for e in d["events"][-10:]:
            about = "/".join(x for x in (e.get("stack"), e.get("service")) if x)
            click.echo(
                f"  {output.when(e['at'])} {show(e['level']):<7} {show(e['kind'])}"
                + (f" {show(about)}" if about else "")
                + f": {show(e['message'])}"
            )


@devices.command("label")
@click.argument("device_id")
@click.argument("changes", nargs=-1, required=True)
@common
def devices_label(client: ControllerClient, fmt: str, device_id: str, changes: tuple[str, ...]) -> None:
    """Set labels (k=v) or remove them (k-) on a device, from the controller."""
    to_set: dict[str, str] = {}
    to_remove: list[str] = []
    for change in changes:
        if change.endswith("-") and "=" not in change:
            to_remove.append(change[:-1])
        elif "=" in change:
            try:
                key, value = label_rules.split(change)  # checked by the controller, all at once
            except ValueError as exc:
                raise TetherError(f"{exc}: use key=value to set or key- to remove") from None
            to_set[key] = value
        else:
            raise TetherError(f"{change!r}: use key=value to set or key- to remove")
    send_and_print(
        client,
        fmt,
        DevicesLabel(device_id=device_id, set=to_set, remove=tuple(to_remove)),
        lambda d: f"{d['id']}: {output.labels(d['labels'])}",
        key="device",
    )


@devices.command("credentials")
@click.argument("device_id")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write them to this file (0600, the agent's credentials.json format) instead of stdout; "
    "with --cert, a directory.",
)
@click.option(
    "--cert",
    is_flag=True,
    help="A client certificate and key instead of a password (tether up --require-client-cert).",
)
@common
def devices_credentials(
    client: ControllerClient, fmt: str, device_id: str, out: Path | None, cert: bool
) -> None:
    """Create (or rotate) a device's broker credentials; the password is shown only once."""
    if cert:
        _device_certificate(client, fmt, device_id, out)
        return
    result = client.request(DevicesCredentials(device_id=device_id))
    data = {"username": result["username"], "password": result["password"]}
    if out is not None:
        from tether.protocol.secret_files import write_secret_json

        write_secret_json(out, data)
        if fmt == "json":
            click.echo(output.to_json({"device_id": device_id, "written": str(out)}))
        else:
            click.echo(f"{device_id}: credentials written to {out}")
    elif fmt == "json":
        click.echo(output.to_json(result))
    else:
        click.echo(f"username: {data['username']}\npassword: {data['password']}")


def _device_certificate(client: ControllerClient, fmt: str, device_id: str, out: Path | None) -> None:
    """`tether devices credentials ID --cert --out DIR`: DIR/ID.pem, DIR/ID.key (0600), DIR/ca.pem."""
    if out is None:
        raise TetherError("--cert needs --out DIR (the private key is written to a file, never printed)")
    if out.exists() and not out.is_dir():
        raise TetherError(f"--out {out}: not a directory (with --cert, --out names a directory)")
    result = client.request(DevicesCredentials(device_id=device_id, certificate=True))
    from tether.protocol.secret_files import write_secret_text

    out = out.resolve()
    cert_file, key_file, ca_file = out / f"{device_id}.pem", out / f"{device_id}.key", out / "ca.pem"
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_secret_text(key_file, result["key"])
        cert_file.write_text(result["certificate"])
        ca_file.write_text(result["ca"])
    except OSError as exc:
        raise TetherError(f"cannot write the certificate files in {out}: {exc.strerror or exc}") from exc
    if fmt == "json":
        written = {"certificate": str(cert_file), "key": str(key_file), "ca": str(ca_file)}
        click.echo(output.to_json({"device_id": device_id, **written}))
        return
    click.echo(f"{device_id}: certificate {cert_file}, key {key_file}, CA {ca_file}")
    click.echo(f'agent config: tls_cert = "{cert_file}"  tls_key = "{key_file}"  ca_file = "{ca_file}"')


@devices.command("revoke")
@click.argument("device_ids", nargs=-1, required=True)
@common
def devices_revoke(client: ControllerClient, fmt: str, device_ids: tuple[str, ...]) -> None:
    """Cut devices off now: credentials revoked, live session closed, out of every group."""
    send_and_print(
        client, fmt, DevicesRevoke(device_ids=device_ids), lambda r: [f"{d}: revoked" for d in r["revoked"]]
    )


@devices.command("rm")
@click.argument("device_ids", nargs=-1, required=True)
@common
def devices_rm(client: ControllerClient, fmt: str, device_ids: tuple[str, ...]) -> None:
    """Forget devices: record, desired state (cleared on the broker), events and credentials."""
    send_and_print(
        client, fmt, DevicesRemove(device_ids=device_ids), lambda r: [f"{d}: removed" for d in r["removed"]]
    )


def register(main: click.Group) -> None:
    main.add_command(devices)
