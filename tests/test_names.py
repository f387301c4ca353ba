"""Identifiers are matched in full everywhere: a final newline or control character never passes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, ValidationError
from tether.protocol import names, topics
from tether.protocol.credentials import Credential, CredentialTable, hash_password
from tether.protocol.errors import TopicError
from tether.protocol.models import StackRef, VarBinding

ROOT = Path(__file__).resolve().parent.parent
KINDS = [getattr(names, n) for n in names.__all__ if isinstance(getattr(names, n), names.Identifier)]
GOOD = {
    "device id": "pi-9",
    "username": "admin",
    "client id": "tether-cli-1",
    "name": "web",
    "config name": "App.conf",
    "stack hash": "a" * 64,
    "token id": "0a1b2c3d",
    "label key": "site/room",
    "variable key": "password",
    "variable path": "db/main",
    "variable reference": "db/main/password",
    "signal": "SIGHUP",
    "registry host": "registry.example:5000",
    "HTTP host": "[fd00::1]:9100",
}


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.what)
@pytest.mark.parametrize("suffix", ["\n", "\r\n", "\x00", " ", "\t", "\x1b[2K"])
def test_every_identifier_refuses_a_trailing_control_character(kind: names.Identifier, suffix: str) -> None:
    """Each kind accepts its example and refuses it with a newline or control character after it,
    with Python's re (match, search, fullmatch) and with pydantic's pattern (Rust regex)."""
    assert kind.what in GOOD, f"give tests/test_names.py an example {kind.what}"
    good = GOOD[kind.what]
    assert kind.ok(good) and kind.problem(good) is None
    bad = good + suffix
    assert not kind.ok(bad)
    assert kind.regex.match(bad) is None and kind.regex.search(bad) is None
    assert repr(bad) in (kind.problem(bad) or "")

    class Model(BaseModel):
        value: str = Field(pattern=kind.pattern)

    assert Model(value=good).value == good
    with pytest.raises(ValidationError):
        Model(value=bad)


def test_wire_models_and_topics_refuse_a_final_newline() -> None:
    """The wire models, topic helpers and topic parser refuse ``x\\n`` where they accept ``x``."""
    with pytest.raises(ValidationError):
        StackRef(name="web\n", spec_hash="a" * 64)
    with pytest.raises(ValidationError):
        StackRef(name="web", spec_hash="a" * 64 + "\n")
    with pytest.raises(ValidationError):
        VarBinding(stack="web", ref="db/password\n")
    with pytest.raises(TopicError, match=r"invalid device id 'pi-9\\n'"):
        topics.check_device_id("pi-9\n")
    with pytest.raises(TopicError):
        topics.replies("tether-cli-1\n")
    assert topics.parse("tether/v1/devices/pi-9\n/reported") is None
    assert topics.parse("tether/v1/enroll/devB\n/request") is None
    assert topics.parse("tether/v1/enroll/devB/request") is not None


def test_enrolling_id_with_a_final_newline_is_refused_by_the_broker_table() -> None:
    """`enroll:devB\\n` never gets an identity (it would be a second "devB")."""
    from tether.protocol.credentials import TokenGrant, hash_token

    table = CredentialTable([Credential("admin", "operator", "admin", hash_password("pw", iterations=1000))])
    table.set_tokens({hash_token("tok"): TokenGrant("0a1b2c3d")})
    assert table.authenticate("enroll:devB", "tok", "tether-enroll-devB") is not None
    assert table.authenticate("enroll:devB\n", "tok", "tether-enroll-devB\n") is None
    assert table.authenticate("enroll:devB\n", "tok", "tether-enroll-devB") is None


def _python_regex_literals() -> list[tuple[str, int, str]]:
    """(file, line, pattern) of every string literal passed to re.compile/match/search/fullmatch."""
    found = []
    for directory in ("protocol", "controller", "agent", "cli", "broker", "sim"):
        for path in (ROOT / directory).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "re"
                    and node.func.attr in ("compile", "match", "search", "fullmatch")
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    found.append((str(path.relative_to(ROOT)), node.lineno, node.args[0].value))
    return found


def test_no_python_regex_ends_with_a_dollar_anchor() -> None:
    """No Python regex in the code ends in ``$`` (which also matches before a final newline):
    identifiers go through tether.protocol.names, other patterns end in ``\\Z`` or use fullmatch."""
    literals = _python_regex_literals()
    assert literals, "the scan found no regex at all: it is broken"
    offenders = [f"{f}:{line}: {p!r}" for f, line, p in literals if re.search(r"(?<!\\)\$\)?$", p)]
    assert offenders == []
