"""The API documents (docs/openapi.json, docs/asyncapi.json) agree with the code."""

from __future__ import annotations

import re

from tether.controller.http import api, docs
from tether.protocol import topics
from tether.protocol.commands import COMMANDS

REGENERATE = "out of date: run scripts/gen-api-docs and commit docs/openapi.json and docs/asyncapi.json"


def test_checked_in_documents_are_generated_from_the_code() -> None:
    """docs/openapi.json and docs/asyncapi.json are exactly what the models and routes generate."""
    assert docs.OPENAPI_FILE.read_text() == docs.render(docs.openapi_document()), (
        f"docs/openapi.json {REGENERATE}"
    )
    assert docs.ASYNCAPI_FILE.read_text() == docs.render(docs.asyncapi_document()), (
        f"docs/asyncapi.json {REGENERATE}"
    )


def test_every_command_has_one_http_route() -> None:
    """Each command of protocol/commands.py is reachable over HTTP (a new command needs its line in api.ROUTES)."""
    routed = [r.model for r in api.ROUTES]
    missing = [m.__name__ for m in COMMANDS if m not in routed]
    assert not missing, (
        f"commands without an /api/v1 route (add one to controller/http/api.py ROUTES): {missing}"
    )
    paths = {(r.method, r.path) for r in api.ROUTES}
    assert len(paths) == len(api.ROUTES), "two routes share a method and path"
    document = docs.openapi_document()
    for route in api.ROUTES:
        path = re.sub(r"\{(\w+):path\}", r"{\1}", f"/api/v1{route.path}")
        assert route.method.lower() in document["paths"][path], (
            f"{route.method} {path} not in the OpenAPI document"
        )


def test_asyncapi_has_every_topic_of_the_topic_tree() -> None:
    """Every topic protocol/topics.py lists (but the leader's probe, an opaque token) is an AsyncAPI channel."""
    listed = set(re.findall(r"^\s+(tether/v1/\S+)", topics.__doc__ or "", re.M))
    expanded = set()
    for topic in listed:
        expanded |= {topic.replace("[/{user}]", ""), topic.replace("[/{user}]", "/{user}")}
    addresses = {c["address"] for c in docs.asyncapi_document()["channels"].values()}
    assert expanded - {topics.PROBE} == addresses
