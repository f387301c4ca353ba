"""protocol/labels.py: the one rule for label keys, values and k=v items, as every part applies it."""

from __future__ import annotations

import pytest
from tether.protocol import labels


def test_split_takes_the_first_equals_sign_and_strips() -> None:
    """'k=v' splits at its first '=' (so 'role=a=b' has value 'a=b'), both parts stripped; no '=' or key is refused."""
    assert labels.split(" site = berlin ") == ("site", "berlin")
    assert labels.split("role=a=b") == ("role", "a=b")
    assert labels.split("empty=") == ("empty", "")
    for bad in ("novalue", "=x", " =x"):
        with pytest.raises(ValueError, match="is not key=value"):
            labels.split(bad)


def test_values_a_selector_cannot_match_are_refused() -> None:
    """A value with ',', '=' or '!', a non-printable character or over 128 characters is invalid; so is a bad key."""
    assert labels.problem({"site": "berlin", "example.com/tier": "edge", "e": ""}) is None
    for value in ("a=b", "a,b", "a!", "x\x1b[2K", "é" * 129):
        assert labels.problem({"role": value}) is not None, value
    assert labels.value_ok("é" * 128) and not labels.value_ok(3)
    message = labels.problem({"Bad Key!": "x", "role": "a=b", "ok": "1"})
    assert (
        message is not None and "'Bad Key!'" in message and "role='a=b'" in message and "ok=" not in message
    )


def test_parse_names_every_bad_item_at_once() -> None:
    """parse() returns the labels (a later key wins) or one error naming every malformed item, then every bad label."""
    assert labels.parse(["a=1", "b = 2", "a=3"]) == {"a": "3", "b": "2"}
    with pytest.raises(ValueError) as malformed:
        labels.parse(["x", "ok=1", "=y"])
    assert "'x' is not key=value" in str(malformed.value) and "'=y' is not key=value" in str(malformed.value)
    with pytest.raises(ValueError, match="role='a=b'"):
        labels.parse(["role=a=b"])
