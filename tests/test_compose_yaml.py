"""protocol/compose_yaml.py: Compose files read as docker compose reads them, with bounded cost."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tether.controller.compose import parse_compose
from tether.protocol.compose_yaml import (
    MAX_DEPTH,
    MAX_NODES,
    Override,
    Reset,
    dump_yaml,
    load_yaml,
    scalar_text,
)
from tether.protocol.errors import ComposeError


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("22:22", "22:22"),  # YAML 1.1: 1342 (base 60)
        ("1:30", "1:30"),
        ("yes", "yes"),  # YAML 1.1: true
        ("no", "no"),
        ("on", "on"),
        ("off", "off"),
        ("y", "y"),
        ("2024-01-01", "2024-01-01"),  # YAML 1.1: a date
        ("true", True),
        ("True", True),
        ("FALSE", False),
        ("~", None),
        ("null", None),
        ("", None),
        ("18", 18),
        ("-3", -3),
        ("1_000", 1000),
        ("0o22", 18),
        ("022", 18),  # Compose's parser keeps YAML 1.1's leading-zero octal
        ("0x1F", 31),
        ("1.5", 1.5),
        ("1.", 1.0),
        ("-.5", -0.5),
        ("1e3", "1e3"),  # Compose's parser: no dot, not a number
        ("1.0e3", 1000.0),
        ("0.1.2", "0.1.2"),
        ("'022'", "022"),
        ('"yes"', "yes"),
        ("'true'", "true"),
    ],
)
def test_scalars_resolve_as_compose_reads_them(text: str, value: Any) -> None:
    """Each plain scalar gets the type and value Compose's YAML 1.2 parser gives it."""
    got = load_yaml(f"k: {text}\n")["k"]
    assert got == value and type(got) is type(value)


def test_special_floats() -> None:
    """.inf, -.inf and .nan are floats, as in YAML 1.2's core schema."""
    doc = load_yaml("a: .inf\nb: -.Inf\nc: .nan\n")
    assert doc["a"] == math.inf and doc["b"] == -math.inf and math.isnan(doc["c"])


def test_the_issue_examples_keep_their_meaning_in_a_stack() -> None:
    """Unquoted 22:22 stays port 22 and ENABLE: yes stays "yes" in the parsed stack."""
    spec = parse_compose(
        "services:\n  s:\n    image: x\n    ports: [22:22]\n"
        "    environment: {ENABLE: yes, LEVEL: 1.0, ON: on, UMASK: '022'}\n"
    )
    service = spec.services[0]
    assert [(p.host, p.container) for p in service.ports] == [(22, 22)]
    assert service.environment == {"ENABLE": "yes", "LEVEL": "1", "ON": "on", "UMASK": "022"}


def test_merge_keys_and_anchors() -> None:
    """<< merges an anchored map, explicit keys win; aliases share the anchored value."""
    doc = load_yaml("x: &base {image: a, restart: always}\ns:\n  <<: *base\n  image: b\nt: *base\n")
    assert doc["s"] == {"image": "b", "restart": "always"}
    assert doc["t"] == {"image": "a", "restart": "always"}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a: 1\na: 2\n", "duplicate key 'a'"),
        ("s: {x: 1, x: 2}\n", "duplicate key 'x'"),
        ("8080: x\n", "key 8080 must be a string"),
        ("true: x\n", "key True must be a string"),
        ("a: !!python/object/apply:os.system [ls]\n", "not allowed"),
        ("a: !!binary aGk=\n", "not allowed"),
        ("a: !custom x\n", "not allowed"),
        ("a: &a [*a]\n", "refers to itself"),
        ("a: &a {b: *a}\n", "refers to itself"),
        ("a: *nowhere\n", "undefined alias"),
        ("a: [1, 2\n", "not valid YAML at line"),
        ("a: 1\n---\nb: 2\n", "more than one YAML document"),
    ],
)
def test_refused_documents_name_the_problem(text: str, fragment: str) -> None:
    """Duplicate or non-string keys, arbitrary tags, recursive or unknown aliases, syntax errors
    and several documents are each one ComposeError naming the file."""
    with pytest.raises(ComposeError, match="^web.yml: ") as info:
        load_yaml(text, "web.yml")
    assert fragment in str(info.value)


def test_alias_bomb_is_refused_quickly() -> None:
    """A billion-laughs document (10^9 values through 9 levels of aliases) is refused in well
    under a second, before anything is built."""
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    started = time.monotonic()
    with pytest.raises(ComposeError, match=f"more than {MAX_NODES} values"):
        load_yaml("\n".join(levels) + "\n")
    assert time.monotonic() - started < 1.0


def test_aliases_within_the_bound_are_fine() -> None:
    """Anchors used as real files use them (a shared block reused by services) load."""
    text = "x: &env {" + ", ".join(f"K{i}: v" for i in range(50)) + "}\nservices:\n"
    text += "".join(f"  s{i}: {{image: x, environment: *env}}\n" for i in range(100))
    doc = load_yaml(text)
    assert len(doc["services"]) == 100 and doc["services"]["s99"]["environment"]["K49"] == "v"


@pytest.mark.parametrize("opener", ["[", "{a: ", "- "])
def test_deep_nesting_is_refused(opener: str) -> None:
    """Nesting deeper than MAX_DEPTH (flow or block) is refused, even 100,000 levels deep."""
    if opener == "- ":
        text = "".join("  " * i + "-\n" for i in range(MAX_DEPTH + 5)) + "  " * (MAX_DEPTH + 5) + "x\n"
    else:
        text = (opener * 100_000)[: 250 * 1024]
    started = time.monotonic()
    with pytest.raises(ComposeError, match="nested too deeply"):
        load_yaml(text)
    assert time.monotonic() - started < 2.0


def test_size_bound() -> None:
    """A file over the size bound is refused before it is parsed."""
    with pytest.raises(ComposeError, match="larger than 256 KiB"):
        load_yaml("a: b\n" + "#" * (256 * 1024))


def test_reset_and_override_tags() -> None:
    """!reset drops a key and !override unwraps, unless markers are asked for (to merge)."""
    text = "a: !reset null\nb: !override [1, 2]\nc: !override 5\nd: [x, !reset y]\n"
    assert load_yaml(text) == {"b": [1, 2], "c": 5, "d": ["x"]}
    marked = load_yaml(text, markers=True)
    assert marked["a"] == Reset() and marked["b"] == Override([1, 2]) and marked["c"] == Override(5)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (18, "18"),
        (1.0, "1"),
        (1.5, "1.5"),
        (100.0, "100"),
        (1e20, "100000000000000000000"),
        (1e21, "1e+21"),
        (1.25e-5, "1.25e-05"),
        (0.0001, "0.0001"),
        ("x", "x"),
    ],
)
def test_scalar_text_prints_numbers_as_compose_does(value: Any, text: str) -> None:
    """Environment values and labels given as numbers read as Go prints them."""
    assert scalar_text(value) == text


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["yes", "no", "on", "022", "0o17", "22:22", "1e3", "~", "", "1_0", "<<", "0x1", ".inf"]),
)
_DOCS = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), _DOCS, max_size=5))
def test_dumped_documents_load_back_equal(doc: dict[str, Any]) -> None:
    """What the CLI writes for the controller reads back with the same value and types."""
    assert load_yaml(dump_yaml(doc)) == doc


def test_a_file_accepted_before_keeps_its_stack_hash() -> None:
    """A file that parsed before Compose's YAML reading gives the same stack hash (old agents
    keep working): the hash pinned in test_variables from the first wire models."""
    from tests.test_variables import OLD_STACK_HASH

    spec = parse_compose(
        "services:\n"
        "  db:\n    image: registry.example/db:2\n"
        "  web:\n    image: registry.example/web:1\n    environment: [MODE=prod]\n"
        '    ports: ["8080:80"]\n'
        "volumes:\n  data:\n"
    )
    assert spec.spec_hash() == OLD_STACK_HASH
