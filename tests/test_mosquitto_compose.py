"""compose/production.yml's broker, run for real without Docker: the script of its
``broker-setup`` service and compose/mosquitto.conf (container paths, owners and the port
mapped onto this machine's), with mosquitto 2.0 started as root and dropping to its own
user as in its image. Anonymous and clear-text clients are refused, the image's health
check passes, and the controller and a device with credentials work over TLS.
"""

from __future__ import annotations

import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from support.infra import MOSQUITTO_BIN, accepts, free_port, stop_process, wait_until
from support.procs import ControllerProcess, credentialed_agent, wait_online
from test_e2e_mtls import Probe, refused
from tether.controller.mosquitto import find_plugin
from tether.protocol.errors import TransportError
from tether.protocol.mqtt import MqttClient, parse_broker_url

pytestmark = [pytest.mark.mosquitto, pytest.mark.e2e]
COMPOSE = Path(__file__).resolve().parent.parent / "compose"


@pytest.fixture
def root() -> Iterator[Path]:
    """A directory Mosquitto's own user can traverse (pytest's tmp_path is root's only)."""
    path = Path(tempfile.mkdtemp(prefix="tether-compose-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_production_broker_refuses_anonymous_and_serves_devices(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The production broker setup: no anonymous or clear-text client; the controller and a
    device with its credentials connect over TLS; the Mosquitto health check passes."""
    if not Path(MOSQUITTO_BIN).exists() or os.geteuid() != 0:
        pytest.skip("needs mosquitto, and root (it drops to its own user as in its image)")
    try:
        user = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no mosquitto user")
    monkeypatch.delenv("TETHER_DB", raising=False)  # broker-setup and the controller share SQLite here
    services = yaml.safe_load((COMPOSE / "production.yml").read_text())["services"]
    port = free_port()
    data, broker_dir = root / "data", root / "mosquitto"
    (broker_dir / "data").mkdir(parents=True)
    tether = f"{shlex.quote(sys.executable)} -m tether.cli.main"  # the `tether` of this checkout

    def local(text: str) -> str:
        """A container's paths, owners and port as they are on this machine."""
        text = re.sub(r"\b8883\b", str(port), text.replace("$$", "$"))
        text = text.replace("1883:1883", f"{user.pw_uid}:{user.pw_gid}")
        text = text.replace("/usr/lib/mosquitto_dynamic_security.so", find_plugin())
        text = re.sub(r"(?<![\w/.-])/mosquitto/", f"{broker_dir}/", text)
        text = re.sub(r"(?<![\w/.-])/data\b", str(data), text)
        return text.replace("tether mosquitto-config", f"{tether} mosquitto-config")

    script = local(services["broker-setup"]["command"][-1])
    env = {**os.environ, "TETHER_MQTT_HOST": "mqtt.test"}
    for _ in range(2):  # the second run (every `up`) keeps what the first made
        setup = subprocess.run(["sh", "-ec", script], capture_output=True, text=True, env=env, timeout=120)
        assert setup.returncode == 0, setup.stdout + setup.stderr
    dynsec = broker_dir / "tether" / "dynamic-security.json"
    assert dynsec.stat().st_uid == user.pw_uid and (broker_dir / "tether" / "tls" / "server.key").is_file()
    subprocess.run(
        ["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(broker_dir)], check=True
    )  # the image's entrypoint

    conf = root / "mosquitto.conf"
    conf.write_text(local((COMPOSE / "mosquitto.conf").read_text()))
    out = (root / "mosquitto.out").open("wb")
    proc = subprocess.Popen([MOSQUITTO_BIN, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    ctl = agent = None
    try:
        wait_until(lambda: proc.poll() is not None or accepts(port), 15, message="mosquitto listening")
        assert proc.poll() is None, (root / "mosquitto.out").read_text()
        ca = data / "tls" / "ca.pem"
        url = f"mqtts://127.0.0.1:{port}"

        # Nobody without credentials, and nothing in clear text.
        assert refused(url, "anonymous", ca, None)
        anonymous = Probe(url, "anonymous", ca, None)
        assert not anonymous.connected
        anonymous.client.loop_stop()
        plain = MqttClient([parse_broker_url(f"mqtt://127.0.0.1:{port}")], "plain", reconnect=False)
        with pytest.raises(TransportError):
            plain.connect(10)
        health = local(services["mosquitto"]["healthcheck"]["test"][1])
        result = subprocess.run(["sh", "-c", health], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{health}: {result.stdout}{result.stderr}"

        # The controller as production.yml runs it, and a device with its own credentials.
        command = services["controller"]["command"]
        assert command[command.index("--broker") + 1] == "mqtts://mosquitto:8883"
        ctl = ControllerProcess(
            data,
            broker=url,
            auth=True,
            extra=[
                a for o in ("--tls-ca", "--mosquitto-dir") for a in (o, local(command[command.index(o) + 1]))
            ],
        )
        ctl.wait_for_line("dynamic security in step with the store")
        monkeypatch.setenv("TETHER_CREDENTIALS", str(ctl.operator_file))
        agent = credentialed_agent(url, "pi-1", root, ca)
        assert wait_online(url, "pi-1")["status"] == "online"
    finally:
        if agent is not None:
            agent.stop()
        if ctl is not None:
            ctl.stop()
        stop_process(proc)
        out.close()
