"""Every command's result is a model of protocol/results.py, and docs/topics.md documents each one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel
from tether.controller.service import COMMANDS
from tether.protocol import results

TOPICS = Path(__file__).resolve().parents[2] / "docs" / "topics.md"

VIEWS: dict[str, list[type[BaseModel]]] = {
    "DeviceView": [results.DeviceDetails],
    "GroupView": [results.GroupView],
    "StackView": [results.StackSummary],
    "StackDeviceRow": [results.StackDeviceRow],
    "JobView": [results.JobView],
    "DeploymentView": [results.DeploymentView],
    "VariableView": [results.VariableView],
}
"""Each view documented in its own paragraph of docs/topics.md, and the models whose fields it names."""


def documented_results() -> dict[str, str]:
    """Each command kind of the commands table, with its Result column."""
    rows: dict[str, str] = {}
    for line in TOPICS.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`") or "." not in cells[0]:
            continue
        for kind in re.findall(r"`([a-z]+\.[a-z]+)`", cells[0]):
            rows[kind] = cells[2]
    return rows


def top_level_keys(result: str) -> set[str]:
    """The keys of the first ``{...}`` map written in backticks in a Result cell."""
    match = re.search(r"`\{(.*?)\}`", result)
    assert match is not None, result
    text, depth, keys, current = match.group(1), 0, set(), ""
    for char in text + ",":
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            keys.add(current.split(":")[0].strip())
            current = ""
        elif depth == 0 or char not in "]})":
            current += char if depth == 0 else ""
    return keys


def test_every_command_has_a_result_model() -> None:
    """Each registered handler names a model of protocol/results.py as its result."""
    for handler in COMMANDS:
        assert getattr(results, handler.result.__name__, None) is handler.result


def test_the_commands_table_lists_each_result_s_fields() -> None:
    """docs/topics.md gives, per command, the same top-level result fields as its model."""
    documented = documented_results()
    for handler in COMMANDS:
        for kind in handler.model.kinds():
            assert kind in documented, f"{kind} is missing from the commands table of docs/topics.md"
            assert top_level_keys(documented[kind]) == set(handler.result.model_fields), kind


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_each_view_paragraph_names_every_field(view: str) -> None:
    """The paragraph of docs/topics.md that describes a view names every field of its models."""
    text = TOPICS.read_text()
    start = text.index(f"**{view}**")
    end = text.find("\n**", start + 2)
    paragraph = text[start : end if end != -1 else len(text)]
    named = set(re.findall(r"`(\w+)`", paragraph))
    for model in VIEWS[view]:
        missing = set(model.model_fields) - named
        assert not missing, f"{view}: docs/topics.md does not describe {sorted(missing)}"


def test_the_commands_a_standby_answers_are_documented() -> None:
    """docs/topics.md names exactly the read-only commands of the registry as answered by a standby."""
    text = " ".join(TOPICS.read_text().split())
    sentence = text[text.index("answers these from the shared store:") :].split("(read-only", 1)[0]
    documented = set(re.findall(r"`([a-z]+\.[a-z]+)`", sentence))
    assert documented == {kind for h in COMMANDS if h.read_only for kind in h.model.kinds()}
