"""Label selectors of dynamic groups: parsing, matching and errors."""

from __future__ import annotations

import pytest
from tether.controller.selectors import Term, matches, parse_selector
from tether.protocol.errors import CommandError


@pytest.mark.parametrize(
    ("text", "terms"),
    [
        ("site=berlin", (Term("site", "=", "berlin"),)),
        ("site==berlin", (Term("site", "=", "berlin"),)),
        ("site!=berlin", (Term("site", "!=", "berlin"),)),
        ("gpu", (Term("gpu", "exists"),)),
        ("!gpu", (Term("gpu", "absent"),)),
        ("site=", (Term("site", "=", ""),)),
        ("example.com/tier=edge", (Term("example.com/tier", "=", "edge"),)),
        (
            "  site = berlin ,arch==arm64,  ! gpu , beta ,zone != a 1 ",
            (
                Term("site", "=", "berlin"),
                Term("arch", "=", "arm64"),
                Term("gpu", "absent"),
                Term("beta", "exists"),
                Term("zone", "!=", "a 1"),
            ),
        ),
    ],
)
def test_parse_selector_terms(text: str, terms: tuple[Term, ...]) -> None:
    """=, ==, !=, bare key (exists) and !key (absent) parse, with whitespace around anything."""
    assert parse_selector(text) == terms


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty selector"),
        ("   ", "empty selector"),
        ("site=berlin,", "''"),
        ("a,,b", "''"),
        ("=berlin", "'=berlin'"),
        ("site=a=b", "'site=a=b'"),
        ("site=a!b", "'site=a!b'"),
        ("!", "'!'"),
        ("!site=berlin", "'!site=berlin'"),
        ("-site", "'-site'"),
        ("site<3", "'site<3'"),
        ("ok,si te=x", "'si te=x'"),
    ],
)
def test_parse_selector_errors_name_the_bad_term(text: str, fragment: str) -> None:
    """An invalid selector raises CommandError quoting the offending term."""
    with pytest.raises(CommandError) as info:
        parse_selector(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("site=berlin", {"site": "berlin"}, True),
        ("site=berlin", {"site": "paris"}, False),
        ("site=berlin", {}, False),
        ("site!=berlin", {"site": "paris"}, True),
        ("site!=berlin", {}, True),
        ("site!=berlin", {"site": "berlin"}, False),
        ("gpu", {"gpu": ""}, True),
        ("gpu", {}, False),
        ("!gpu", {}, True),
        ("!gpu", {"gpu": "1"}, False),
        ("site=berlin,arch=arm64", {"site": "berlin", "arch": "arm64"}, True),
        ("site=berlin,arch=arm64", {"site": "berlin", "arch": "amd64"}, False),
        ("site=", {"site": ""}, True),
    ],
)
def test_matches_requires_every_term(selector: str, labels: dict[str, str], expected: bool) -> None:
    """A device matches a selector when all its terms hold for the device's labels."""
    assert matches(parse_selector(selector), labels) is expected
