"""The API documents (docs/openapi.json, docs/asyncapi.json) agree with the code."""

from __future__ import annotations

import re

from tether.controller import service
from tether.controller.http import docs
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


def test_every_command_has_an_http_route() -> None:
    """Each command of protocol/commands.py declares an /api/v1 route with its handler, each in the OpenAPI document."""
    missing = [h.model.__name__ for h in service.COMMANDS if not h.routes]
    assert not missing, (
        f"commands without an /api/v1 route (give their registration http=Route(...)): {missing}"
    )
    assert {h.model for h in service.COMMANDS} == set(COMMANDS)
    routes = [route for _, route in service.COMMANDS.routes()]
    assert len({(r.method, r.path) for r in routes}) == len(routes), "two routes share a method and path"
    assert all(r.tag for r in routes), "a route without a tag"
    document = docs.openapi_document()
    for route in routes:
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
