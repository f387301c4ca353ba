"""The one YAML reader of Compose files: read as docker compose reads them, with bounded cost.

Used by the CLI (resolving the operator's files) and the controller (parsing what it is
sent); the agent never imports it (PyYAML is in the ``cli`` and ``controller`` extras, not
in the device install).

**Scalars as Compose reads them.** PyYAML implements YAML 1.1, where an unquoted ``22:22``
is the base-60 integer 1342 and ``yes``/``on``/``no``/``off`` are booleans. Compose's parser
follows YAML 1.2's core schema: only ``true``/``false`` (three spellings each) are booleans,
``~``/``null``/empty are null, integers are decimal, ``0x``/``0o`` (and, as Compose's parser
keeps from YAML 1.1, a leading ``0`` for octal: ``022`` is 18), floats need a ``.`` or are
``.inf``/``.nan``; everything else (``22:22``, ``yes``, ``2024-01-01``) is a string. The
resolvers below are exactly that, so a file means the same under Tether and under Compose.

**Bounded cost.** Compose files come from operators and, at the controller, from anyone
allowed to send requests. A file is read only up to :data:`MAX_BYTES`; nesting deeper than
:data:`MAX_DEPTH` and documents whose aliases expand to more than :data:`MAX_NODES` nodes
(the "billion laughs" alias bomb) are refused while composing, before any Python object is
built, and recursive aliases are refused. Keys must be unique (as in Compose) and strings.

**Compose's tags.** ``!reset`` and ``!override`` (used in override files) are read as
:class:`Reset` and :class:`Override` markers; :func:`load_yaml` with ``markers=False``
applies them as a single file means them (a reset key is dropped, an override is its value).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import yaml
from tether.protocol.errors import ComposeError

MAX_BYTES = 256 * 1024
"""Largest Compose file read (each file, and the resolved file sent to the controller)."""
MAX_DEPTH = 64
"""Deepest nesting of maps and lists (real Compose files stay under 10)."""
MAX_NODES = 200_000
"""Most nodes a document may expand to, aliases counted at every use."""


@dataclass(frozen=True)
class Reset:
    """``!reset``: in an override file, remove the value the files before it set."""


@dataclass(frozen=True)
class Override:
    """``!override VALUE``: in an override file, replace the value instead of merging."""

    value: Any


# --- scalars: YAML 1.2 core schema, with Compose's octal ---------------------------------------

_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)\Z")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)\Z")
_INT = re.compile(r"^(?:[-+]?[0-9][0-9_]*|[-+]?0o[0-7_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?0b[01_]+)\Z")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*\.[0-9_]*)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))\Z"
)
_LEGACY_OCTAL = re.compile(r"^[-+]?0[0-7]+\Z")


def _int(text: str) -> int:
    body = text.replace("_", "")
    sign = -1 if body.startswith("-") else 1
    body = body.lstrip("+-")
    if body.startswith("0o"):
        return sign * int(body[2:], 8)
    if body.startswith("0x"):
        return sign * int(body[2:], 16)
    if body.startswith("0b"):
        return sign * int(body[2:], 2)
    if _LEGACY_OCTAL.match(body):  # Compose's parser: 022 is octal, as in YAML 1.1
        return sign * int(body, 8)
    return sign * int(body)


def _float(text: str) -> float:
    body = text.replace("_", "").lower()
    if body.endswith(".inf"):
        return -math.inf if body.startswith("-") else math.inf
    if body == ".nan":
        return math.nan
    return float(body)


try:
    from yaml.cyaml import CParser as _Parser  # type: ignore[attr-defined]
except ImportError:  # PyYAML built without libyaml: its Python reader, scanner and parser

    class _Parser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)


def _line(event: Any) -> int:
    return int(event.start_mark.line) + 1


class _Loader(yaml.composer.Composer, _Parser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    """libyaml's parser (fast, iterative) under PyYAML's Python composer (so that nesting and
    alias expansion are bounded while composing), with Compose's scalar resolution and
    unique string keys."""

    def __init__(self, stream: str) -> None:
        _Parser.__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._depth = 0
        self._nodes = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Any, index: Any) -> Any:
        event: Any = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._sizes:
                raise ComposeError(f"alias *{event.anchor} refers to itself at line {_line(event)}")
            node = super().compose_node(parent, index)
            self._count(self._sizes.get(id(node), 1), event)
            return node
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise ComposeError(f"nested too deeply (more than {MAX_DEPTH} levels) at line {_line(event)}")
        start = self._nodes
        node = super().compose_node(parent, index)
        self._depth -= 1
        size = self._nodes - start + 1
        self._sizes[id(node)] = size
        self._count(1, event)
        return node

    def _count(self, n: int, event: Any) -> None:
        self._nodes += n
        if self._nodes > MAX_NODES:
            raise ComposeError(
                f"expands to more than {MAX_NODES} values (aliases counted at each use) "
                f"at line {event.start_mark.line + 1}"
            )

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str):
                    raise ComposeError(
                        f"line {key_node.start_mark.line + 1}: key {key!r} must be a string "
                        f"(quote it: '{key_node.value}')"
                    )
                if key in seen:
                    raise ComposeError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""])
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+.0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)\Z"), ["<"])
_Loader.add_constructor("tag:yaml.org,2002:int", lambda loader, node: _int(node.value))
_Loader.add_constructor("tag:yaml.org,2002:float", lambda loader, node: _float(node.value))
_Loader.add_constructor(
    "tag:yaml.org,2002:bool", lambda loader, node: node.value.lower() == "true" if node.value else False
)


def _refuse(loader: _Loader, node: Any) -> Any:
    raise ComposeError(f"line {node.start_mark.line + 1}: tag {node.tag} is not allowed in a Compose file")


for _tag in ("timestamp", "binary", "set", "omap", "pairs"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _refuse)  # type: ignore[type-var]
_Loader.add_constructor(None, _refuse)  # type: ignore[type-var]  # any other tag (Python objects, ...)


def _reset(loader: _Loader, node: Any) -> Reset:
    return Reset()


def _override(loader: _Loader, node: Any) -> Override:
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    # Resolver.resolve is untyped in types-PyYAML; style "" is plain (libyaml).
    implicit = (node.style in (None, ""), False)
    tag: str = loader.resolve(yaml.ScalarNode, node.value, implicit)  # type: ignore[no-untyped-call]
    return Override(loader.construct_object(yaml.ScalarNode(tag, node.value, style=node.style)))


_Loader.add_constructor("!reset", _reset)  # type: ignore[type-var]
_Loader.add_constructor("!override", _override)  # type: ignore[type-var]


def strip_markers(value: Any) -> Any:
    """A document as one file means it: ``!reset`` keys dropped, ``!override`` values unwrapped."""
    if isinstance(value, Override):
        return strip_markers(value.value)
    if isinstance(value, dict):
        return {k: strip_markers(v) for k, v in value.items() if not isinstance(v, Reset)}
    if isinstance(value, list):
        return [strip_markers(v) for v in value if not isinstance(v, Reset)]
    return None if isinstance(value, Reset) else value


def load_yaml(text: str, name: str = "compose file", *, markers: bool = False) -> Any:
    """Read one YAML document as Compose does; :class:`ComposeError` names ``name`` and the line.

    An empty document is ``None``. With ``markers``, ``!reset``/``!override`` stay as
    :class:`Reset`/:class:`Override` for the caller to merge with."""
    if len(text) > MAX_BYTES or len(text.encode()) > MAX_BYTES:
        raise ComposeError(f"{name}: larger than {MAX_BYTES // 1024} KiB")
    loader = _Loader(text)
    try:
        node = loader.get_node() if loader.check_node() else None
        more = node is not None and loader.check_node()
        doc = None if node is None or more else loader.construct_document(node)
    except ComposeError as exc:
        raise ComposeError(f"{name}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        if "nesting depth" in str(getattr(exc, "problem", "")):  # libyaml's own bound
            raise ComposeError(f"{name}: nested too deeply{where}") from None
        raise ComposeError(f"{name}: not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    except RecursionError:
        raise ComposeError(f"{name}: nested too deeply") from None
    finally:
        loader.dispose()
    if more:
        raise ComposeError(f"{name}: holds more than one YAML document (---); write one")
    return doc if markers else strip_markers(doc)


# --- writing: the resolved file, read back with the same meaning ---------------------------


class _Dumper(yaml.SafeDumper):
    """Quotes every string that :class:`_Loader` (or a YAML 1.1 reader) would read as
    something else, so a dumped document loads back equal."""

    def ignore_aliases(self, data: Any) -> bool:
        return True  # expanded: the reader counts them anyway, and they are not the user's


for _first, _resolvers in _Loader.yaml_implicit_resolvers.items():
    for _tag_name, _regexp in _resolvers:
        _Dumper.add_implicit_resolver(_tag_name, _regexp, [_first])


_ESCAPE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ufeff\ud800-\udfff\ufffe\uffff]")


def _str_presenter(dumper: _Dumper, data: str) -> Any:
    if _ESCAPE.search(data):  # written escaped: a reader would fold or refuse them raw
        style: str | None = '"'
    elif "\n" in data and not data.endswith((" ", "\t")) and "\r" not in data:
        style = "|"
    else:
        style = None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str_presenter)


def dump_yaml(doc: Any) -> str:
    """``doc`` as YAML that :func:`load_yaml` reads back equal (keys in the given order)."""
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1_000_000)


def scalar_text(value: bool | int | float | str) -> str:
    """A scalar as Compose turns it into text (an environment value, a label): booleans
    ``true``/``false``, numbers as Go prints them (``1.0`` is ``1``, ``1e21`` is ``1e+21``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | str):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    mantissa, _, exp_text = repr(value).partition("e")  # Python's shortest digits, Go's layout
    exp = int(exp_text) if exp_text else 0
    sign = "-" if mantissa.startswith("-") else ""
    whole, _, frac = mantissa.lstrip("-").partition(".")
    frac = frac.rstrip("0")
    significant = (whole + frac).lstrip("0") or "0"
    point = len(whole) + exp - (len(whole + frac) - len((whole + frac).lstrip("0")))
    if significant == "0":
        return f"{sign}0"
    significant = significant.rstrip("0") or "0"
    decimal_exp = point - 1  # the value is 0.d1d2... * 10**point
    if -4 <= decimal_exp < 21:
        if point <= 0:
            return f"{sign}0.{'0' * -point}{significant}"
        if point >= len(significant):
            return f"{sign}{significant}{'0' * (point - len(significant))}"
        return f"{sign}{significant[:point]}.{significant[point:]}"
    rest = f".{significant[1:]}" if len(significant) > 1 else ""
    return f"{sign}{significant[0]}{rest}e{'+' if decimal_exp >= 0 else '-'}{abs(decimal_exp):02d}"
