"""Client certificates as identity on Mosquitto: `tether mosquitto-config --tls --require-client-cert`.

The generated snippet (minus its `listener` line: the test broker picks a free port) runs
a real Mosquitto with `require_certificate` and `use_identity_as_username`; `tether up`
keeps its dynamic security (or, with `--files`, the ACL file) and connects with its own
certificate. Mosquitto reads the files on SIGHUP, so with files each change is followed by
a reload that the test waits for in its log; the dynamic security needs none.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.infra import MOSQUITTO_BIN, Mosquitto, wait_until
from support.procs import AgentProcess, ControllerProcess, cli_json, wait_online
from test_e2e_mtls import Probe, refused
from tether.controller.tls import issue_client, quickstart

pytestmark = [pytest.mark.mosquitto, pytest.mark.e2e]
R = "tether/v1"


def reload(broker: Mosquitto) -> None:
    assert broker.proc is not None
    reloads = broker.log_text().count("Reloading config")
    broker.proc.send_signal(1)  # SIGHUP
    wait_until(lambda: broker.log_text().count("Reloading config") > reloads, 15, message="reload")


@pytest.mark.parametrize("mode", ["dynsec", "files"])
def test_mosquitto_client_certificates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """A certificate from the CA is its CN's identity, with that user's rights only; another CA's
    or none is refused; a revoked device's certificate may still connect but do nothing."""
    if not Path(MOSQUITTO_BIN).exists():
        pytest.skip("mosquitto not installed")
    data, out = tmp_path / "ctl", tmp_path / "mosq"
    setup = subprocess.run(
        [sys.executable, "-m", "tether.cli.main", "mosquitto-config", "--out", str(out)]
        + ["--data-dir", str(data), "--tls", "--require-client-cert"]
        + (["--files"] if mode == "files" else []),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert setup.returncode == 0, setup.stderr
    conf = (out / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "use_identity_as_username true" in conf
    ca = data / "tls" / "ca.pem"
    listener_conf = "".join(line + "\n" for line in conf.splitlines() if not line.startswith("listener"))
    with Mosquitto(tmp_path, extra_conf=listener_conf) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        ctl = ControllerProcess(
            data, broker=url, auth=True, extra=["--mosquitto-dir", str(out), "--require-client-cert"]
        )
        monkeypatch.setenv("TETHER_CREDENTIALS", str(ctl.operator_file))
        operator = json.loads(ctl.operator_file.read_text())
        op_cert = (Path(operator["tls_cert"]), Path(operator["tls_key"]))
        agent = None
        probes: list[Probe] = []
        try:
            certs = tmp_path / "certs"
            for device in ("dev-a", "dev-b"):
                cli_json(url, "devices", "credentials", device, "--cert", "--out", str(certs))
            if mode == "files":
                assert "user dev-a" in (out / "acl").read_text()
                reload(broker)
            cert, key = certs / "dev-a.pem", certs / "dev-a.key"

            # Without a certificate, or with one from another CA: refused in the handshake.
            quickstart(tmp_path / "other")
            pem, other_key = issue_client(tmp_path / "other", "dev-a")
            (tmp_path / "x.pem").write_text(pem)
            (tmp_path / "x.key").write_text(other_key)
            assert refused(url, "tether-dev-a", ca, None)
            assert refused(url, "tether-dev-a", ca, (tmp_path / "x.pem", tmp_path / "x.key"))

            # dev-a's certificate: dev-a's rights only (Mosquitto may grant a subscription and
            # deliver nothing; the barrier shows nothing forged got through).
            a = Probe(url, "tether-dev-a", ca, (cert, key))
            probes.append(a)
            assert a.connected
            watcher = Probe(url, "tether-cli-watch", ca, op_cert)
            probes.append(watcher)
            assert watcher.connected
            assert watcher.subscribe(f"{R}/devices/+/events") in (0, 1)
            a.publish(f"{R}/devices/dev-b/events", b"forged")
            a.publish(f"{R}/devices/dev-a/events", b"barrier")
            assert watcher.messages.get(timeout=10) == (f"{R}/devices/dev-a/events", b"barrier")
            assert watcher.messages.empty()
            a.close()
            probes.remove(a)

            agent = AgentProcess(
                url,
                "dev-a",
                tmp_path / "dev-a",
                extra=["--tls-cert", str(cert), "--tls-key", str(key), "--ca-file", str(ca)],
            )
            wait_online(url, "dev-a")
            agent.stop()
            agent = None

            # Revoked: gone from the ACL file; after the reload its valid certificate still
            # connects (Mosquitto does not check the password file for it) but may do nothing.
            cli_json(url, "devices", "revoke", "dev-a")
            if mode == "files":
                assert "user dev-a" not in (out / "acl").read_text()
                reload(broker)
            revoked = Probe(url, "tether-dev-a", ca, (cert, key))
            assert revoked.connected  # Mosquitto: the CA vouches for it; the ACL file takes its rights
            probes.append(revoked)
            revoked.publish(f"{R}/devices/dev-a/events", b"after revoke")
            b = Probe(url, "tether-dev-b", ca, (certs / "dev-b.pem", certs / "dev-b.key"))
            probes.append(b)
            b.publish(f"{R}/devices/dev-b/events", b"barrier 2")
            assert watcher.messages.get(timeout=10) == (f"{R}/devices/dev-b/events", b"barrier 2")
            assert watcher.messages.empty()
        finally:
            for p in probes:
                p.close()
            if agent is not None:
                agent.stop()
            ctl.stop()
