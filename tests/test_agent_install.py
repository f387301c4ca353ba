"""The device install served by ``tether up --http``: the script, the agent's wheel, the CA, the wheelhouse.

The chroot tests of tests/test_install_script.py run the served script on Debian root file
systems; these check what the controller serves.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import subprocess
import sys
import tomllib
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from support.images import REPO_ROOT
from support.procs import ControllerProcess
from tether.controller import agent_install
from tether.controller.agent_install import InstallFiles, build_wheel, render_script
from tether.protocol import __version__
from tether.protocol.mqtt import BrokerAddress


def _get(port: int, path: str, host: str | None = None) -> tuple[int, bytes, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("GET", path, skip_host=host is not None)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        answer = connection.getresponse()
        return answer.status, answer.read(), answer.getheader("Content-Type", "")
    finally:
        connection.close()


def served_values(script: str) -> dict[str, str]:
    """The ``served_NAME='value'`` lines of a served script."""
    return dict(re.findall(r"^served_([a-z0-9_]+)='([^']*)'$", script, re.M))


def test_packages_are_the_distributions() -> None:
    """agent_install.PACKAGES lists pyproject.toml's packages (the wheel would miss one otherwise)."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert list(agent_install.PACKAGES) == pyproject["tool"]["setuptools"]["packages"]


def test_wheel_is_the_running_code_and_deterministic(tmp_path: Path) -> None:
    """The wheel holds this checkout's files byte for byte, its RECORD hashes them, two builds are
    identical, and pip installs it with working entry points."""
    wheel = build_wheel()
    assert wheel.name == f"tether-{__version__}-py3-none-any.whl"
    assert build_wheel().data == wheel.data
    with zipfile.ZipFile(BytesIO(wheel.data)) as archive:
        names = archive.namelist()
        assert archive.read("tether/agent/core.py") == (REPO_ROOT / "agent" / "core.py").read_bytes()
        assert (
            archive.read("tether/agent/drivers/process.py")
            == (REPO_ROOT / "agent/drivers/process.py").read_bytes()
        )
        record = archive.read(f"tether-{__version__}.dist-info/RECORD").decode().splitlines()
        for line in record[:-1]:
            name, digest, size = line.split(",")
            data = archive.read(name)
            assert int(size) == len(data)
            assert digest == agent_install._record_hash(data)
        assert len(record) == len(names)
        assert "console_scripts" in archive.read(f"tether-{__version__}.dist-info/entry_points.txt").decode()
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    path = tmp_path / wheel.name
    path.write_bytes(wheel.data)
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True
    )
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert installed.returncode == 0, installed.stderr
    assert (target / "tether" / "agent" / "main.py").read_bytes() == (
        REPO_ROOT / "agent" / "main.py"
    ).read_bytes()


def test_render_script_fills_the_served_lines_and_refuses_unsafe_values() -> None:
    """Only the ``served_NAME=""`` lines change; a value a shell could misread is refused."""
    template = 'a=1\nserved_server=""\nserved_wheel_sha256=""\necho "$served_server"\n'
    out = render_script(template, {"server": "http://h:9100", "wheel_sha256": "ab"})
    assert out == "a=1\nserved_server='http://h:9100'\nserved_wheel_sha256='ab'\necho \"$served_server\"\n"
    for bad in ("x'; rm -rf /; '", "a b", "$(id)", "`id`", "a\nb"):
        with pytest.raises(ValueError):
            render_script(template, {"server": bad})
    with pytest.raises(ValueError, match="no served_nothing line"):
        render_script(template, {"nothing": "x"})
    # The packaged script has every line the controller fills in.
    files = InstallFiles(
        BrokerAddress("127.0.0.1", 1883, tls=False), build_wheel(), agent_install.script_template()
    )
    assert served_values(files.script("ctl.example:9100") or "").keys() >= {
        "server",
        "broker",
        "wheel_sha256",
    }


@pytest.mark.parametrize(
    ("broker", "host", "expected"),
    [
        (BrokerAddress("127.0.0.1", 1883, tls=False), "ctl.example", "mqtt://ctl.example:1883"),
        (BrokerAddress("127.0.0.1", 8883, tls=True), "10.1.2.3", "mqtts://10.1.2.3:8883"),
        (BrokerAddress("0.0.0.0", 1883, tls=False), "fd00::1", "mqtt://[fd00::1]:1883"),
        (BrokerAddress("mqtt.example", 1884, tls=False), "ctl.example", "mqtt://mqtt.example:1884"),
    ],
)
def test_device_broker_url(broker: BrokerAddress, host: str, expected: str) -> None:
    """A loopback or wildcard broker host becomes the host the device reached the controller at."""
    assert agent_install.device_broker_url(broker, host) == expected


def test_bad_host_headers_get_no_script() -> None:
    """The Host header is the client's: anything but HOST[:PORT] gets no script."""
    files = InstallFiles(
        BrokerAddress("127.0.0.1", 1883, tls=False), build_wheel(), agent_install.script_template()
    )
    for bad in ("", "a b", "h:9100;id", "h:9100\n", "$(id)", "h'x", "[::1", "h:123456"):
        assert files.script(bad) is None, bad
    assert files.script("[::1]:9100") is not None


def test_wheelhouse_page_links_carry_sha256(tmp_path: Path) -> None:
    """/wheels/ is a pip --find-links page: each wheel linked with its SHA-256; other files are not served."""
    (tmp_path / "msgpack-1.0-cp311-cp311-linux_armv7l.whl").write_bytes(b"wheel bytes")
    (tmp_path / "notes.txt").write_text("secret")
    files = InstallFiles(
        BrokerAddress("127.0.0.1", 1883, tls=False),
        build_wheel(),
        agent_install.script_template(),
        wheelhouse=tmp_path,
    )
    page = files.get("/wheels/", "h")
    assert page is not None
    digest = hashlib.sha256(b"wheel bytes").hexdigest()
    assert f'href="msgpack-1.0-cp311-cp311-linux_armv7l.whl#sha256={digest}"' in page.data.decode()
    assert "notes.txt" not in page.data.decode()
    served = files.get("/wheels/msgpack-1.0-cp311-cp311-linux_armv7l.whl", "h")
    assert served is not None and served.data == b"wheel bytes"
    assert files.get("/wheels/notes.txt", "h") is None
    assert files.get("/wheels/../pyproject.toml", "h") is None
    script = files.script("ctl:9100") or ""
    assert served_values(script)["find_links"] == "http://ctl:9100/wheels/"


@pytest.mark.e2e
def test_controller_serves_the_install(tmp_path: Path) -> None:
    """`tether up --http` serves the script with its own broker and wheel, the wheel the script's
    checksum names, and 400 for a Host header that is not HOST[:PORT]."""
    ctl = ControllerProcess(tmp_path / "ctl", auth=True, extra=["--http", "127.0.0.1:0"])
    try:
        port = int(ctl.wait_for_line(r"health and metrics on http://[^:]+:(\d+)/").group(1))
        line = ctl.wait_for_line(r"device install \(tether-agent (\S+)\): curl -fsSL http://\S+/install.sh")
        assert line.group(1) == __version__
        status, body, content_type = _get(port, "/install.sh", host=f"ctl.example:{port}")
        assert status == 200 and content_type.startswith("text/x-shellscript")
        script = body.decode()
        values = served_values(script)
        assert values["version"] == __version__
        assert values["broker"] == f"mqtt://ctl.example:{ctl.port}"
        assert values["wheel_url"] == f"http://ctl.example:{port}/agent/tether-{__version__}-py3-none-any.whl"
        assert values["ca_url"] == "" and values["find_links"] == ""
        status, wheel, _ = _get(port, f"/agent/tether-{__version__}-py3-none-any.whl")
        assert status == 200 and hashlib.sha256(wheel).hexdigest() == values["wheel_sha256"]
        status, _, _ = _get(port, "/install.sh", host="ctl.example:1;id")
        assert status == 400
        assert _get(port, "/ca.pem")[0] == 404  # no TLS, no CA
        help_text = subprocess.run(["sh", "-s", "--", "--help"], input=script, capture_output=True, text=True)
        assert help_text.returncode == 0
        assert f"curl -fsSL http://ctl.example:{port}/install.sh | sudo sh -s --" in help_text.stdout
    finally:
        ctl.stop()


@pytest.mark.e2e
def test_controller_serves_its_ca_with_tls(tmp_path: Path) -> None:
    """With --tls the served script points devices at mqtts:// and names the CA's checksum."""
    ctl = ControllerProcess(tmp_path / "ctl", auth=True, extra=["--tls", "--http", "127.0.0.1:0"])
    try:
        port = int(ctl.wait_for_line(r"health and metrics on http://[^:]+:(\d+)/").group(1))
        values = served_values(_get(port, "/install.sh", host=f"127.0.0.1:{port}")[1].decode())
        assert values["broker"] == f"mqtts://127.0.0.1:{ctl.port}"
        status, ca, _ = _get(port, "/ca.pem")
        assert status == 200 and ca == (tmp_path / "ctl" / "tls" / "ca.pem").read_bytes()
        assert hashlib.sha256(ca).hexdigest() == values["ca_sha256"]
    finally:
        ctl.stop()
