"""protocol/compose_resolve.py and `tether stacks config`: the operator's Compose files
resolved as docker compose resolves them (interpolation, env files, overlays, extends,
include, relative paths). Every Compose file here is written for these tests."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from tether.cli.compose_files import LocalFiles, resolve_files
from tether.cli.main import main
from tether.controller.compose import parse_compose
from tether.protocol.compose_resolve import (
    MAX_SHIPPED_BYTES,
    Resolver,
    interpolate,
    merge,
    parse_env_file,
)
from tether.protocol.compose_yaml import dump_yaml, load_yaml
from tether.protocol.errors import ComposeError, TetherError


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def resolve(root: Path, *names: str, env: dict[str, str] | None = None, **kw: Any) -> Any:
    resolver = Resolver(LocalFiles(), home=str(root.parent / "home"))
    paths = [str(root / n) for n in names]
    values = resolver.project_env(str(root), env or {}, kw.pop("env_files", None), kw.pop("overrides", None))
    return resolver.resolve(paths, values, **kw)


def interp(value: str, env: dict[str, str]) -> tuple[str, list[str]]:
    warnings: list[str] = []
    out, errors = interpolate({"v": value}, env.get, warnings, "f.yml")
    if errors:
        raise ComposeError("\n".join(errors))
    return out["v"], warnings


@pytest.mark.parametrize(
    ("template", "result"),
    [
        ("$A", "a"),
        ("${A}", "a"),
        ("x${A}y$A", "xaya"),
        ("${UNSET:-def}", "def"),
        ("${EMPTY:-def}", "def"),
        ("${EMPTY-def}", ""),
        ("${UNSET-def}", "def"),
        ("${A:-def}", "a"),
        ("${A:+alt}", "alt"),
        ("${EMPTY:+alt}", ""),
        ("${EMPTY+alt}", "alt"),
        ("${UNSET+alt}", ""),
        ("${UNSET:-${A}-nested}", "a-nested"),
        ("${A:?must be set}", "a"),
        ("$$A", "$$A"),  # a literal $ stays escaped for the controller
        ("${var:app/token}", "${var:app/token}"),  # Tether's: left for the device
        ("pre-${var:a/b}-$A", "pre-${var:a/b}-a"),
        ("${DOLLAR}", "$$x"),  # a value holding $ is a literal $
        ("no variables", "no variables"),
    ],
)
def test_interpolation_forms(template: str, result: str) -> None:
    """Every Compose substitution form gives docker compose's value (in escaped form)."""
    assert interp(template, {"A": "a", "EMPTY": "", "DOLLAR": "$x"})[0] == result


def test_unset_variable_is_empty_with_one_warning() -> None:
    """An unset variable is blank and warned about once, as Compose does."""
    value, warnings = interp("$NOPE-${NOPE}", {})
    assert value == "-"
    assert warnings == ['the "NOPE" variable is not set: defaulting to a blank string']


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("${NEED:?set NEED first}", "required variable NEED is missing a value: set NEED first"),
        ("${EMPTY:?}", "required variable EMPTY"),
        ("${NEED?}", "required variable NEED"),
        ("cost $5", "invalid interpolation '$5'"),
        ("${A", "no closing }"),
        ("${A B}", "invalid interpolation ${A B}"),
        ("${}", "invalid interpolation ${}"),
    ],
)
def test_interpolation_errors(template: str, fragment: str) -> None:
    """Required variables and malformed templates are errors naming the value."""
    with pytest.raises(ComposeError, match="f.yml: v: ") as info:
        interp(template, {"A": "a", "EMPTY": ""})
    assert fragment in str(info.value)


def test_every_interpolation_error_is_reported_at_once(tmp_path: Path) -> None:
    """Three bad values in two services: one error listing all three."""
    write(
        tmp_path,
        {
            "compose.yaml": """
            services:
              a: {image: "x:${TAG:?tag needed}", command: "echo $1"}
              b: {image: x, environment: {K: "${OOPS"}}
            """
        },
    )
    with pytest.raises(ComposeError) as info:
        resolve(tmp_path, "compose.yaml")
    message = str(info.value)
    assert "services.a.image" in message and "tag needed" in message
    assert "services.a.command" in message and "services.b.environment.K" in message


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_escaped_text_survives_interpolation(text: str) -> None:
    """Any text written with $$ for each $ comes out as that same escaped text: literals
    (and Tether's ${var:...} written $${var:...}) never change."""
    escaped = text.replace("$", "$$")
    assert interp(escaped, {})[0] == escaped


@pytest.mark.parametrize(
    ("path", "value", "cast"),
    [
        (("healthcheck", "retries"), "${R:-5}", 5),
        (("read_only",), "${RO:-yes}", True),
        (("privileged",), "false", False),
        (("ports", "[0]", "published"), "${P:-8080}", 8080),
        (("mem_limit",), "512m", "512m"),
    ],
)
def test_values_are_cast_as_compose_casts_them(path: tuple[str, ...], value: str, cast: Any) -> None:
    """Interpolated values where Compose expects a number or boolean become one."""
    doc: dict[str, Any] = {}
    node = doc.setdefault("services", {}).setdefault("s", {})
    for part in path[:-1]:
        node = node.setdefault("__list__" if part.startswith("[") else part, {})
    node[path[-1]] = value
    text = dump_yaml(doc).replace("__list__:", "-")
    out, errors = interpolate(load_yaml(text), {}.get, [], "f.yml")
    assert errors == []
    found: Any = out["services"]["s"]
    for part in path:
        found = found[0] if part.startswith("[") else found[part]
    assert found == cast and type(found) is type(cast)


def test_env_file_syntax() -> None:
    """Compose's env file syntax: comments, export, quotes, escapes, interpolation, bare keys."""
    text = textwrap.dedent(
        """\
        # a comment
        PLAIN=value  # trailing comment
        HASH=a#b
        export EXPORTED=yes
        SINGLE='$NOT ${EXPANDED} \\t'
        DOUBLE="line\\nnext \\"q\\" $PLAIN"
        MULTI="one
        two"
        EMPTY=
        SPACED = spaced out
        REF=${PLAIN}-${FROMSHELL:-none}
        INHERITED
        MISSING
        """
    )
    values = parse_env_file(text, {"INHERITED": "from shell"}.get, ".env", [])
    assert values == {
        "PLAIN": "value",
        "HASH": "a#b",
        "EXPORTED": "yes",
        "SINGLE": "$NOT ${EXPANDED} \\t",
        "DOUBLE": 'line\nnext "q" value',
        "MULTI": "one\ntwo",
        "EMPTY": "",
        "SPACED": "spaced out",
        "REF": "value-none",
        "INHERITED": "from shell",
    }


@pytest.mark.parametrize(("text", "fragment"), [("A='open\n", "unterminated"), ("!bad=1\n", "line 1")])
def test_bad_env_files(text: str, fragment: str) -> None:
    """A malformed env file is one error naming the file and line."""
    with pytest.raises(ComposeError, match=fragment):
        parse_env_file(text, {}.get, ".env", [])


def test_overlay_merge_rules() -> None:
    """Compose's rules: maps merged, command replaced, environment/labels by key, ports and
    volumes one per port/target, x-* replaced, depends_on list and map merged, !reset/!override."""
    base = load_yaml(
        textwrap.dedent(
            """
            x-meta: {a: 1, b: 2}
            services:
              web:
                image: web:1
                command: [serve, --port, "80"]
                environment: [A=1, B=2]
                labels: {team: edge}
                ports: ["8080:80", "9090:90"]
                volumes: [/srv/a:/data, /srv/log:/log]
                depends_on: [db]
                dns: [1.1.1.1]
                logging: {driver: json-file, options: {max-size: 1m}}
              db: {image: db:1, ports: ["5432:5432"]}
            """
        ),
        markers=True,
    )
    over = load_yaml(
        textwrap.dedent(
            """
            x-meta: {c: 3}
            services:
              web:
                image: web:2
                command: [serve]
                environment: {B: "20", C: "3"}
                labels: [site=lab]
                ports: ["9090:90", "7070:70"]
                volumes: [/srv/b:/data]
                depends_on: {cache: {condition: service_healthy}}
                dns: [1.1.1.1, 8.8.8.8]
                logging: {driver: local}
              db: {ports: !reset []}
              cache: {image: cache:1, command: !override [run]}
            """
        ),
        markers=True,
    )
    merged = merge(base, over)
    web = merged["services"]["web"]
    assert merged["x-meta"] == {"c": 3}
    assert web["image"] == "web:2" and web["command"] == ["serve"]
    assert web["environment"] == {"A": "1", "B": "20", "C": "3"}
    assert web["labels"] == {"team": "edge", "site": "lab"}
    assert web["ports"] == ["8080:80", "9090:90", "7070:70"]
    assert web["volumes"] == ["/srv/b:/data", "/srv/log:/log"]
    assert web["depends_on"] == {
        "db": {"condition": "service_started"},
        "cache": {"condition": "service_healthy"},
    }
    assert web["dns"] == ["1.1.1.1", "8.8.8.8"]
    assert web["logging"] == {"driver": "local"}
    assert "ports" not in merged["services"]["db"]
    assert merged["services"]["cache"]["command"] == ["run"]


def test_overlays_relative_paths_and_env_file_precedence(tmp_path: Path) -> None:
    """-f files merge in order; their relative paths are relative to the first file's
    directory; environment beats env_file whichever file sets it; a null value comes from
    the operator's environment or is dropped."""
    write(
        tmp_path,
        {
            "app/compose.yaml": """
            services:
              web:
                image: web
                environment: {MODE: base, FROM_SHELL: null, NOT_SET: null}
                volumes: [./conf:/conf]
            """,
            "override/dev.yaml": """
            services:
              web:
                env_file: [./app.env]
                volumes: [./dev-conf:/conf]
            """,
            "app/app.env": "MODE=from-env-file\nOTHER=1\n",
        },
    )
    result = resolve(tmp_path / "app", "compose.yaml", "../override/dev.yaml", env={"FROM_SHELL": "shell"})
    web = result.doc["services"]["web"]
    assert web["environment"] == {"MODE": "base", "OTHER": "1", "FROM_SHELL": "shell"}
    assert web["volumes"] == ["./dev-conf:/conf"]


def test_project_env_precedence(tmp_path: Path) -> None:
    """-e beats the shell, which beats .env; --env-file replaces .env."""
    write(tmp_path, {".env": "A=dotenv\nB=dotenv\nC=dotenv\n", "other.env": "C=other\n"})
    resolver = Resolver(LocalFiles())
    env = resolver.project_env(str(tmp_path), {"B": "shell", "C": "shell"}, None, {"C": "flag"})
    assert env == {"A": "dotenv", "B": "shell", "C": "flag"}
    env = resolver.project_env(str(tmp_path), {}, [str(tmp_path / "other.env")])
    assert env == {"C": "other"}
    with pytest.raises(ComposeError, match="not found"):
        resolver.project_env(str(tmp_path), {}, [str(tmp_path / "missing.env")])


def test_extends_in_the_same_file_and_another(tmp_path: Path) -> None:
    """extends merges the base service under the service (same file or file:), the base's
    relative paths relative to its own file; a cycle is one clear error."""
    write(
        tmp_path,
        {
            "compose.yaml": """
            services:
              base: {image: app:1, environment: {A: "1"}, restart: always}
              worker:
                extends: base
                environment: {B: "2"}
              remote:
                extends: {service: common, file: lib/common.yaml}
                command: [run]
            """,
            "lib/common.yaml": """
            services:
              common: {image: lib:1, volumes: [./data:/data], command: [idle]}
            """,
        },
    )
    services = resolve(tmp_path, "compose.yaml").doc["services"]
    assert services["worker"] == {"image": "app:1", "environment": {"A": "1", "B": "2"}, "restart": "always"}
    assert services["remote"] == {"image": "lib:1", "volumes": ["./lib/data:/data"], "command": ["run"]}
    write(tmp_path, {"loop.yaml": "services:\n  a: {extends: b, image: x}\n  b: {extends: a}\n"})
    with pytest.raises(ComposeError, match="extends cycle"):
        resolve(tmp_path, "loop.yaml")


def test_include_is_a_project_of_its_own(tmp_path: Path) -> None:
    """An included file is interpolated with its own .env (the including project's values
    win) and its paths are relative to its own directory; a clash or a cycle is an error."""
    write(
        tmp_path,
        {
            "compose.yaml": """
            include: [db/compose.yaml]
            services:
              web: {image: "web:${TAG}", depends_on: [db]}
            """,
            ".env": "TAG=1\nSHARED=from-parent\n",
            "db/compose.yaml": """
            services:
              db:
                image: "db:${DB_TAG}"
                environment: {S: "${SHARED}"}
                volumes: [./init:/docker-entrypoint-initdb.d]
            volumes: {dbdata: {}}
            """,
            "db/.env": "DB_TAG=16\nSHARED=from-include\n",
        },
    )
    resolver = Resolver(LocalFiles())
    env = resolver.project_env(str(tmp_path), {})
    doc = resolver.resolve([str(tmp_path / "compose.yaml")], env).doc
    assert doc["services"]["web"]["image"] == "web:1"
    assert doc["services"]["db"] == {
        "image": "db:16",
        "environment": {"S": "from-parent"},
        "volumes": ["./db/init:/docker-entrypoint-initdb.d"],
    }
    assert doc["volumes"] == {"dbdata": {}}
    write(tmp_path, {"clash.yaml": "include: [db/compose.yaml]\nservices:\n  db: {image: other}\n"})
    with pytest.raises(ComposeError, match="also defined by the included"):
        resolve(tmp_path, "clash.yaml")
    write(tmp_path, {"a.yaml": "include: [b.yaml]\nservices: {}\n", "b.yaml": "include: [a.yaml]\n"})
    with pytest.raises(ComposeError, match="include cycle"):
        resolve(tmp_path, "a.yaml")


def test_profiles_disable_services_unless_enabled(tmp_path: Path) -> None:
    """A service with profiles runs only when one of them is enabled (--profile, or
    COMPOSE_PROFILES as docker compose reads it)."""
    write(tmp_path, {"compose.yaml": "services:\n  a: {image: x}\n  dbg: {image: y, profiles: [debug]}\n"})
    assert list(resolve(tmp_path, "compose.yaml").doc["services"]) == ["a"]
    doc = resolve(tmp_path, "compose.yaml", profiles=("debug",)).doc
    assert doc["services"]["dbg"] == {"image": "y"}
    doc = resolve(tmp_path, "compose.yaml", env={"COMPOSE_PROFILES": "other, debug"}).doc
    assert list(doc["services"]) == ["a", "dbg"]


def test_raw_env_file_format(tmp_path: Path) -> None:
    """env_file with format: raw takes each KEY=VALUE line as it is (no quotes, no $)."""
    write(
        tmp_path,
        {
            "compose.yaml": "services:\n  a: {image: x, env_file: [{path: raw.env, format: raw}]}\n",
            "raw.env": "# comment\nQ='quoted' $HOME\n",
        },
    )
    assert resolve(tmp_path, "compose.yaml").doc["services"]["a"]["environment"] == {"Q": "'quoted' $$HOME"}


def test_relative_bind_sources_and_shipped_files(tmp_path: Path) -> None:
    """./x, ../x and ~/x become paths in the stack's directory; files and directories that
    exist are shipped (with their modes), missing ones are not (created empty on device)."""
    project = tmp_path / "proj"
    write(
        tmp_path,
        {
            "proj/compose.yaml": """
            services:
              s:
                image: x
                volumes:
                  - ./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro
                  - ./conf:/conf
                  - ./data:/data
                  - ../shared/certs:/certs
                  - ~/keys:/keys
                  - type: bind
                    source: ./conf/sub
                    target: /sub
                  - /dev/ttyUSB0:/dev/ttyUSB0
                  - named:/named
            volumes: {named: {}}
            """,
            "proj/mosquitto.conf": "listener 1883\n",
            "proj/conf/a.yml": "a: 1\n",
            "proj/conf/sub/b.sh": "#!/bin/sh\n",
            "shared/certs/ca.pem": "CA\n",
        },
    )
    (project / "conf/sub/b.sh").chmod(0o755)
    result = resolve(project, "compose.yaml")
    volumes = result.doc["services"]["s"]["volumes"]
    assert volumes[:5] == [
        "./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro",
        "./conf:/conf",
        "./data:/data",
        "./_parent/shared/certs:/certs",
        "./_parent/home/keys:/keys",
    ]
    assert volumes[5] == {"type": "bind", "source": "./conf/sub", "target": "/sub"}
    assert volumes[6:] == ["/dev/ttyUSB0:/dev/ttyUSB0", "named:/named"]
    files = {path: (f.data, f.mode) for path, f in result.files.items()}
    assert files == {
        "mosquitto.conf": (b"listener 1883\n", 0o644),
        "conf/a.yml": (b"a: 1\n", 0o644),
        "conf/sub/b.sh": (b"#!/bin/sh\n", 0o755),
        "_parent/shared/certs/ca.pem": (b"CA\n", 0o644),
    }


def test_shipped_files_are_bounded(tmp_path: Path) -> None:
    """A mounted directory larger than the bound is one error saying what to do instead."""
    write(tmp_path, {"compose.yaml": "services:\n  s: {image: x, volumes: [./big:/big]}\n"})
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "blob").write_bytes(b"\0" * (MAX_SHIPPED_BYTES + 1))
    with pytest.raises(ComposeError, match="bind mount ./big: .* larger than 1024 KiB"):
        resolve(tmp_path, "compose.yaml")


def test_configs_from_files_and_environment_are_inlined(tmp_path: Path) -> None:
    """configs with file: or environment: reach the controller as content, $ kept literal."""
    write(
        tmp_path,
        {
            "compose.yaml": """
            services:
              s: {image: x, configs: [app, motd]}
            configs:
              app: {file: ./app.ini}
              motd: {environment: MOTD}
            """,
            "app.ini": "price=$5\n",
        },
    )
    doc = resolve(tmp_path, "compose.yaml", env={"MOTD": "hello"}).doc
    assert doc["configs"] == {"app": {"content": "price=$$5\n"}, "motd": {"content": "hello"}}
    spec = parse_compose(dump_yaml(doc))
    assert spec.configs == {"app": "price=$5\n", "motd": "hello"}


def test_resolved_file_means_the_same_to_the_controller(tmp_path: Path) -> None:
    """A file that needs no resolution parses to the same stack (same hash) after the CLI's
    resolution as before; and ${var:...} and $$ survive for the device."""
    text = textwrap.dedent(
        """
        services:
          db: {image: "db:2", restart: always, volumes: ["data:/var/lib/db"]}
          web:
            image: web:1
            depends_on: [db]
            ports: ["8080:80", 22:22]
            environment: [MODE=prod, "PRICE=$$5", "TOKEN=${var:shop/token}", LEVEL=3]
            labels: {tier: front}
            healthcheck: {test: [CMD, wget, -q, localhost], interval: 10s, retries: 5}
            command: ["sh", "-c", "echo $$HOME"]
        volumes: {data: {}}
        """
    )
    write(tmp_path, {"compose.yaml": text})
    resolved = resolve(tmp_path, "compose.yaml")
    assert resolved.warnings == []
    before = parse_compose(text)
    after = parse_compose(dump_yaml(resolved.doc))
    assert after == before and after.spec_hash() == before.spec_hash()
    web = after.service("web")
    assert web is not None and web.environment["TOKEN"] == "${var:shop/token}"
    assert web.environment["PRICE"] == "$5" and web.command == ("sh", "-c", "echo $HOME")


def test_stacks_config_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tether stacks config` prints the resolved file (interpolated from .env, -e and the
    shell; overlays merged), warns about unset variables, and lists the shipped files."""
    write(
        tmp_path,
        {
            "compose.yaml": """
            services:
              broker:
                image: "eclipse-mosquitto:${TAG}"
                ports: ["${PORT}:1883"]
                volumes: [./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro]
                environment: {WHO: "${WHO}", MISSING: "${NOT_SET_ANYWHERE}"}
            """,
            "prod.yaml": "services:\n  broker: {restart: always}\n",
            ".env": "TAG=2\nPORT=1883\n",
            "mosquitto.conf": "listener 1883\n",
        },
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WHO", "shell")
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    result = CliRunner().invoke(
        main, ["stacks", "config", "compose.yaml", "-f", "prod.yaml", "-e", "PORT=18830"]
    )
    assert result.exit_code == 0, result.output
    doc = load_yaml(result.stdout)
    assert doc["services"]["broker"] == {
        "image": "eclipse-mosquitto:2",
        "ports": ["18830:1883"],
        "volumes": ["./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro"],
        "environment": {"WHO": "shell", "MISSING": ""},
        "restart": "always",
    }
    assert "# shipped with the stack" in result.stdout and "mosquitto.conf (14 bytes" in result.stdout
    assert 'the "NOT_SET_ANYWHERE" variable is not set' in result.stderr
    bad = CliRunner().invoke(main, ["stacks", "config", "-f", "nope.yaml"])
    assert bad.exit_code == 1 and "nope.yaml: no such file" in bad.stderr


def test_default_file_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a file, compose.yaml (then docker-compose.yml ...) in the current directory."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TetherError, match="no Compose file given"):
        resolve_files([])
    write(tmp_path, {"docker-compose.yml": "services:\n  a: {image: x}\n"})
    assert resolve_files([]).doc == {"services": {"a": {"image": "x"}}}
    assert os.path.isfile(tmp_path / "docker-compose.yml")


def test_secrets_from_files_reach_the_device_as_files(tmp_path: Path) -> None:
    """secrets with file: are read here like configs and mounted at /run/secrets/NAME."""
    write(
        tmp_path,
        {
            "compose.yaml": """
            services:
              s: {image: x, secrets: [db_password]}
            secrets:
              db_password: {file: ./db_password.txt}
            """,
            "db_password.txt": "s3cret\n",
        },
    )
    doc = resolve(tmp_path, "compose.yaml").doc
    assert doc["secrets"] == {"db_password": {"content": "s3cret\n"}}
    spec = parse_compose(dump_yaml(doc))
    assert spec.configs == {"secret.db_password": "s3cret\n"}
    assert [(m.source, m.target) for m in spec.services[0].configs] == [
        ("secret.db_password", "/run/secrets/db_password")
    ]
