"""`tether up --broker mqtts://...` verifies Mosquitto with the quick-start CA unless --tls-ca says otherwise.

`tether mosquitto-config --tls` makes the quick-start CA in the controller's data directory
and Mosquitto's TLS listener from it; `tether up` then finds that CA by itself.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.infra import MOSQUITTO_BIN, Mosquitto
from support.procs import ControllerProcess, cli_json

pytestmark = [pytest.mark.mosquitto, pytest.mark.e2e]


def test_external_tls_broker_is_verified_with_the_quick_start_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --tls-ca the controller verifies Mosquitto with {data_dir}/tls/ca.pem and says
    so (operator.json names it and the CLI gets through); an explicit --tls-ca wins."""
    if not Path(MOSQUITTO_BIN).exists():
        pytest.skip("mosquitto not installed")
    data, out = tmp_path / "ctl", tmp_path / "mosq"
    setup = subprocess.run(
        [sys.executable, "-m", "tether.cli.main", "mosquitto-config", "--out", str(out)]
        + ["--data-dir", str(data), "--tls"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert setup.returncode == 0, setup.stderr
    conf = (out / "mosquitto.conf").read_text()
    ca = (data / "tls" / "ca.pem").resolve()
    listener_conf = "".join(line + "\n" for line in conf.splitlines() if not line.startswith("listener"))
    with Mosquitto(tmp_path, extra_conf=listener_conf) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        ctl = ControllerProcess(data, broker=url, auth=True, extra=["--mosquitto-dir", str(out)])
        try:
            ctl.wait_for_line(re.escape(f"verified with the quick-start CA {ca}"))
            ctl.wait_for_line("dynamic security in step with the store")
            assert json.loads(ctl.operator_file.read_text())["ca_file"] == str(ca)
            monkeypatch.setenv("TETHER_CREDENTIALS", str(ctl.operator_file))
            assert cli_json(url, "devices", "ls") == []
        finally:
            ctl.stop()
        # The flag wins: another file with the same CA, named in the log and in operator.json.
        copy = tmp_path / "mine.pem"
        shutil.copy(ca, copy)
        ctl = ControllerProcess(
            data, broker=url, auth=True, extra=["--mosquitto-dir", str(out), "--tls-ca", str(copy)]
        )
        try:
            ctl.wait_for_line(re.escape(f"verified with the CA {copy.resolve()} (--tls-ca)"))
            ctl.wait_for_line("dynamic security in step with the store")
            assert json.loads(ctl.operator_file.read_text())["ca_file"] == str(copy.resolve())
            assert cli_json(url, "devices", "ls") == []
        finally:
            ctl.stop()
