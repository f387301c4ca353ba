"""Agent configuration: TOML file < environment < flags, validated with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tether.agent.config import AgentConfig, load_config
from tether.protocol.errors import ConfigError
from tether.protocol.mqtt import BrokerAddress

FULL_TOML = """
brokers = ["mqtt://10.0.0.5:1883", "mqtts://backup.example"]
device_id = "pi-042"
data_dir = "/var/lib/tether-test"
driver = "process"
keepalive = 30
reconcile_interval = 2.5

[labels]
site = "berlin"
"example.com/tier" = "edge"
"""

NO_FLAGS: dict[str, Any] = {
    "brokers": [],
    "device_id": None,
    "labels": None,
    "data_dir": None,
    "driver": None,
    "keepalive": None,
    "reconcile_interval": None,
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def config_error(file: Path | None, env: dict[str, str], flags: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(file, env, flags)
    return str(info.value)


def test_file_with_every_key(tmp_path: Path) -> None:
    """Every documented key of the TOML file is read and typed."""
    config = load_config(write(tmp_path, FULL_TOML), {}, NO_FLAGS)
    assert config == AgentConfig(
        brokers=("mqtt://10.0.0.5:1883", "mqtts://backup.example"),
        device_id="pi-042",
        labels={"site": "berlin", "example.com/tier": "edge"},
        data_dir=Path("/var/lib/tether-test"),
        driver="process",
        keepalive=30,
        reconcile_interval=2.5,
    )
    assert config.broker_addresses() == [
        BrokerAddress("10.0.0.5", 1883),
        BrokerAddress("backup.example", 8883, tls=True),
    ]


def test_precedence_is_file_then_env_then_flags(tmp_path: Path) -> None:
    """A flag beats the environment, which beats the file; unset layers fall through."""
    path = write(tmp_path, FULL_TOML)
    env = {
        "TETHER_DEVICE_ID": "from-env",
        "TETHER_BROKERS": "mqtt://env-a:1883, ,mqtt://env-b:1884",
        "TETHER_LABELS": "site=paris, rack = 7",
        "TETHER_KEEPALIVE": "45",
        "TETHER_RECONCILE_INTERVAL": "4",
        "TETHER_DRIVER": "docker",
        "TETHER_DATA_DIR": str(tmp_path / "env-data"),
    }
    flags = {**NO_FLAGS, "device_id": "from-flag", "keepalive": 90, "labels": {"only": "flag"}}

    from_file = load_config(path, {}, NO_FLAGS)
    from_env = load_config(path, env, NO_FLAGS)
    from_flags = load_config(path, env, flags)

    assert (from_file.device_id, from_env.device_id, from_flags.device_id) == (
        "pi-042",
        "from-env",
        "from-flag",
    )
    assert (from_file.keepalive, from_env.keepalive, from_flags.keepalive) == (30, 45, 90)
    assert from_env.brokers == ("mqtt://env-a:1883", "mqtt://env-b:1884")
    assert from_env.labels == {"site": "paris", "rack": "7"}
    assert from_flags.labels == {"only": "flag"}
    assert from_env.driver == from_flags.driver == "docker"
    assert from_env.reconcile_interval == 4.0
    assert from_env.data_dir == tmp_path / "env-data"
    # A layer that sets nothing does not erase the one below.
    assert from_flags.brokers == from_env.brokers
    assert from_flags.data_dir == from_env.data_dir


def test_config_file_may_come_from_tether_config(tmp_path: Path) -> None:
    """Without an explicit file, TETHER_CONFIG names it; an explicit file wins over it."""
    path = write(tmp_path, 'device_id = "via-env-file"\n')
    assert load_config(None, {"TETHER_CONFIG": str(path)}, NO_FLAGS).device_id == "via-env-file"
    other = tmp_path / "other.toml"
    other.write_text('device_id = "explicit"\n')
    assert load_config(other, {"TETHER_CONFIG": str(path)}, NO_FLAGS).device_id == "explicit"


def test_defaults_without_any_source() -> None:
    """With no file, variables or flags, the defaults are valid (local broker, docker driver)."""
    config = load_config(None, {}, NO_FLAGS)
    assert config.brokers == ("mqtt://127.0.0.1:1883",)
    assert config.driver == "docker"
    assert config.keepalive == 60
    assert config.labels == {}


def test_metrics_interval_defaults_to_300_s_or_two_keepalives() -> None:
    """Unset, metrics are sampled every 300 s, or every two keepalives when that is longer."""
    assert load_config(None, {}, NO_FLAGS).metrics_every() == 300.0
    assert load_config(None, {"TETHER_KEEPALIVE": "300"}, NO_FLAGS).metrics_every() == 600.0
    assert load_config(None, {"TETHER_METRICS_INTERVAL": "60"}, NO_FLAGS).metrics_every() == 60.0
    assert load_config(None, {"TETHER_METRICS_INTERVAL": "0"}, NO_FLAGS).metrics_every() == 0.0


def test_unknown_key_in_file_is_an_error_naming_it(tmp_path: Path) -> None:
    """A misspelt key is refused (not ignored), naming the key and the file."""
    path = write(tmp_path, 'device_id = "pi"\nreconcile_intervall = 5\n')
    message = config_error(path, {}, NO_FLAGS)
    assert "reconcile_intervall" in message
    assert str(path) in message


def test_bad_toml_is_an_error(tmp_path: Path) -> None:
    """A file that is not TOML gives ConfigError saying so, with the file's path."""
    path = write(tmp_path, "device_id = pi-042\n")
    message = config_error(path, {}, NO_FLAGS)
    assert "invalid TOML" in message
    assert str(path) in message


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    """A config file that does not exist gives ConfigError naming it and the reason."""
    path = tmp_path / "nope.toml"
    message = config_error(path, {}, NO_FLAGS)
    assert f"cannot read config file {path}" in message
    assert "No such file" in message


@pytest.mark.parametrize(
    ("source", "fragments"),
    [
        ({"file": 'brokers = ["http://x:1883"]'}, ("brokers", "invalid broker URL", "http://x:1883")),
        ({"file": "brokers = []"}, ("brokers", "at least one broker")),
        ({"env": {"TETHER_BROKERS": "mqtt://h:99999"}}, ("invalid broker URL",)),
        ({"flags": {"brokers": ["not a url"]}}, ("invalid broker URL",)),
        ({"file": 'device_id = "pi/1"'}, ("device_id", "invalid device id", "pi/1")),
        ({"env": {"TETHER_DEVICE_ID": "pi+"}}, ("invalid device id", "pi+")),
        ({"flags": {"device_id": "#"}}, ("invalid device id",)),
        ({"file": '[labels]\n"bad key" = "x"'}, ("labels", "invalid label", "'bad key'")),
        ({"file": "[labels]\nsite = 3"}, ("labels",)),
        ({"file": '[labels]\nsite = "a,b"'}, ("invalid label", "site='a,b'")),
        ({"file": '[labels]\nrole = "a=b"'}, ("invalid label", "role='a=b'", "none of ',=!'")),
        ({"env": {"TETHER_LABELS": "role=a=b,ok=1,x!=y"}}, ("TETHER_LABELS", "role='a=b'", "'x!'")),
        ({"env": {"TETHER_LABELS": "site=berlin,novalue"}}, ("TETHER_LABELS", "novalue", "key=value")),
        ({"env": {"TETHER_LABELS": "=x"}}, ("TETHER_LABELS", "'=x'")),
        ({"file": 'driver = "podman"'}, ("driver",)),
        ({"env": {"TETHER_KEEPALIVE": "soon"}}, ("keepalive",)),
        ({"flags": {"keepalive": 1}}, ("keepalive",)),
        ({"file": "reconcile_interval = 0"}, ("reconcile_interval",)),
    ],
)
def test_invalid_values_are_config_errors_with_a_clear_message(
    tmp_path: Path, source: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    """Bad brokers, device ids, labels and numbers, from any layer, raise ConfigError naming them."""
    path = write(tmp_path, source["file"] + "\n") if "file" in source else None
    message = config_error(path, source.get("env", {}), {**NO_FLAGS, **source.get("flags", {})})
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
