"""Architecture rules: which package may import what, and what the device install pulls in."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "agent", "controller", "broker", "cli")


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository root, e.g. "agent/drivers/docker.py"
    module: str  # absolute, e.g. "tether.protocol.models" or "docker.errors"
    line: int
    in_function: bool
    noqa: str  # the codes listed after noqa on the import's line, if any
    is_module: bool = True  # False for "base.name" of "from base import name" (maybe not a module)


def package_of(rel: str) -> str:
    """The installed package of a source file: agent/drivers/docker.py -> tether.agent.drivers."""
    return ".".join(["tether", *Path(rel).parent.parts])


def imports_in(source: str, rel: str) -> list[Import]:
    """Every import in ``source`` with relative imports resolved against ``rel``'s package."""
    lines = source.splitlines()
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            modules: list[str] = []
            if isinstance(child, ast.Import):
                modules = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package_of(rel).split(".")
                    parent = parts[: len(parts) - child.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                modules = [base] + [f"{base}.{alias.name}" for alias in child.names if alias.name != "*"]
            if isinstance(child, ast.Import | ast.ImportFrom) and modules:
                match = re.search(r"#\s*noqa:\s*([A-Z0-9, ]+)", lines[child.lineno - 1])
                noqa = match.group(1).strip() if match else ""
                is_from = isinstance(child, ast.ImportFrom)
                found.extend(
                    Import(rel, m, child.lineno, in_function, noqa, not (is_from and n > 0))
                    for n, m in enumerate(modules)
                )
            visit(child, nested)

    visit(ast.parse(source, filename=rel), False)
    return found


def all_imports() -> list[Import]:
    result = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            result.extend(imports_in(path.read_text(), rel))
    return result


IMPORTS = all_imports()


def importers(prefix: str) -> list[Import]:
    """Imports of ``prefix`` or any submodule of it."""
    return [i for i in IMPORTS if i.module == prefix or i.module.startswith(prefix + ".")]


def test_scanner_resolves_relative_imports_and_sees_nested_ones() -> None:
    """The checker itself works: relative imports resolve, imports inside functions are flagged."""
    source = (
        "from .base import Observed\nfrom .. import reconcile\ndef f():\n    import docker  # noqa: TID251\n"
    )
    found = imports_in(source, "agent/drivers/x.py")
    modules = {(i.module, i.in_function, i.noqa) for i in found}
    assert ("tether.agent.drivers.base", False, "") in modules
    assert ("tether.agent.drivers.base.Observed", False, "") in modules
    assert [i.module for i in found if not i.is_module] == [
        "tether.agent.drivers.base.Observed",
        "tether.agent.reconcile",
    ]
    assert ("tether.agent.reconcile", False, "") in modules
    assert ("docker", True, "TID251") in modules
    # And the real tree is actually scanned (a broken scanner would find nothing to forbid).
    assert len({i.file for i in IMPORTS}) >= 20
    assert any(i.file == "protocol/mqtt.py" and i.module.startswith("paho") for i in IMPORTS)
    internal = [i for i in IMPORTS if i.is_module and i.module.startswith("tether.")]
    assert len(internal) >= 20
    unresolved = [
        f"{i.file}:{i.line} {i.module}" for i in internal if importlib.util.find_spec(i.module) is None
    ]
    assert unresolved == [], "relative imports resolved to modules that do not exist"


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("protocol", ("tether.agent", "tether.controller", "tether.broker", "tether.cli")),
        ("agent", ("tether.controller", "tether.broker", "tether.cli")),
        ("controller", ("tether.agent", "tether.cli")),
    ],
)
def test_packages_do_not_import_across_layers(package: str, forbidden: tuple[str, ...]) -> None:
    """protocol imports no other Tether package; the agent not the controller/broker/CLI; the
    controller neither the agent nor the CLI (what both use lives in protocol, e.g. client.py)."""
    bad = [
        f"{i.file}:{i.line} imports {i.module}"
        for prefix in forbidden
        for i in importers(prefix)
        if i.file.startswith(package + "/")
    ]
    assert bad == []


@pytest.mark.parametrize(
    ("library", "allowed"),
    [
        ("paho", ("protocol/mqtt.py",)),
        ("docker", ("agent/drivers/docker_sdk.py",)),
        ("amqtt", ("broker/",)),
        ("msgpack", ("protocol/codec.py",)),
        ("yaml", ("protocol/compose_yaml.py",)),
    ],
)
def test_third_party_libraries_stay_in_their_module(library: str, allowed: tuple[str, ...]) -> None:
    """paho, docker, amqtt, msgpack and PyYAML are each imported only by the one module wrapping them."""
    users = importers(library)
    assert users, f"nothing imports {library}: is the scanner broken?"
    outside = [i for i in users if not i.file.startswith(allowed)]
    if library == "docker":
        # The controller probes for a local engine once; that import is marked and function-local.
        probe = [i for i in outside if i.file == "controller/app.py"]
        assert len(probe) == 1, probe
        assert probe[0].in_function and "TID251" in probe[0].noqa
        outside = [i for i in outside if i not in probe]
    assert [f"{i.file}:{i.line} imports {i.module}" for i in outside] == []


def test_device_install_requires_neither_amqtt_nor_pyyaml() -> None:
    """The installed distribution's base requirements (no extras) leave out amqtt and PyYAML
    (the operator's CLI gets PyYAML from the `cli` extra)."""
    requires = distribution("tether").requires or []
    assert requires, "no Requires-Dist metadata found"
    base = {re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r}
    assert {"paho-mqtt", "msgpack", "pydantic"} <= base
    assert "amqtt" not in base
    assert "pyyaml" not in base
    extras = {
        re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0].lower() for r in requires if 'extra == "controller"' in r
    }
    assert {"amqtt", "pyyaml"} <= extras
    cli = {re.split(r"[\s<>=!~;\[(]", r, maxsplit=1)[0].lower() for r in requires if 'extra == "cli"' in r}
    assert cli == {"pyyaml"}


def test_agent_loads_neither_the_controllers_commands_nor_pynacl_nor_charset_detection() -> None:
    """What the agent leaves out to stay small (docs/performance.md, agent footprint): the
    controller's command models (protocol/commands.py), PyNaCl until a sealed box is opened,
    requests' charset detection (the Docker SDK needs none), and the Compose YAML reader."""
    code = (
        "import sys, tether.agent.main, tether.agent.runner, tether.agent.drivers.docker, "
        "tether.agent.drivers.process; "
        "print(sorted(m for m in ('tether.protocol.commands', 'nacl', 'charset_normalizer', 'yaml', "
        "'tether.protocol.compose_yaml') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert "Warning" not in out.stderr, out.stderr


def test_the_agent_core_imports_no_mqtt_client_and_starts_no_thread() -> None:
    """AgentCore is I/O-free: importing it loads neither paho, the paho wrapper nor the remote
    operations (worker threads), and no thread is running afterwards; the transport seam
    (protocol/transport.py) is all it knows of MQTT."""
    code = (
        "import sys, threading, tether.agent.core, tether.protocol.transport; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'paho' or m in "
        "('tether.protocol.mqtt', 'tether.agent.remote', 'tether.agent.runner', 'tether.agent.metrics')), "
        "threading.active_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] 1", out.stdout


def test_a_cli_command_loads_only_what_it_uses() -> None:
    """Every CLI call pays its imports (docs/performance.md, "Sixth pass: the CLI"): `tether
    stacks ls` loads neither the controller, the broker (amqtt), the Docker SDK, PyYAML, the
    device API, the package metadata (the version), nor the modules of other commands."""
    code = (
        "import sys; from tether.cli.main import main\n"
        "try:\n    main(['stacks', 'ls', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('docker', 'amqtt', 'yaml') or m in "
        "('tether.controller', 'tether.broker', 'tether.protocol.device_api', 'tether.protocol.log_follow', "
        "'importlib.metadata', 'tether.cli.devices', 'tether.cli.remote', 'tether.cli.up', 'tether.cli.users')), "
        "'tether.cli.stacks' in sys.modules, file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage:" in out.stdout
    assert out.stderr.strip() == "[] True", out.stderr
