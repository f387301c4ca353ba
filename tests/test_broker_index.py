"""The embedded broker's topic tries agree with a straightforward MQTT 3.1.1 matcher."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from tether.broker.topic_index import FilterTrie, TopicTrie, is_wildcard, valid_filter


def reference_match(topic: str, topic_filter: str) -> bool:
    """MQTT 3.1.1 section 4.7, written for clarity rather than speed."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    t, f = topic.split("/"), topic_filter.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(t) == len(f)


LEVELS = ["a", "b", "", "$SYS", "dev-1"]
topic_names = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4).map("/".join).filter(bool)
filters = (
    st.lists(st.sampled_from([*LEVELS, "+"]), min_size=1, max_size=4)
    .flatmap(lambda levels: st.sampled_from([levels, [*levels, "#"], levels[:-1] + ["#"]]))
    .map("/".join)
    .filter(valid_filter)
)


@settings(max_examples=300, deadline=None)
@given(st.sets(topic_names, max_size=12), filters)
def test_topic_trie_finds_the_topics_a_filter_matches(topics: set[str], topic_filter: str) -> None:
    trie = TopicTrie()
    for t in topics:
        trie.add(t)
    got = trie.match(topic_filter)
    assert sorted(got) == sorted(t for t in topics if reference_match(t, topic_filter))


@settings(max_examples=300, deadline=None)
@given(st.sets(filters, max_size=12), topic_names)
def test_filter_trie_finds_the_filters_a_topic_matches(stored: set[str], topic: str) -> None:
    trie = FilterTrie()
    for f in stored:
        trie.add(f)
    got = trie.match(topic)
    assert sorted(got) == sorted(f for f in stored if reference_match(topic, f))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), topic_names), max_size=30), filters)
def test_removal_keeps_the_trie_consistent(operations: list[tuple[bool, str]], topic_filter: str) -> None:
    trie, present = TopicTrie(), set()
    for add, name in operations:
        if add:
            trie.add(name)
            present.add(name)
        else:
            trie.remove(name)
            present.discard(name)
    assert len(trie) == len(present)
    assert sorted(trie.match(topic_filter)) == sorted(t for t in present if reference_match(t, topic_filter))
    for name in list(present):
        trie.remove(name)
    assert len(trie) == 0 and trie._root.children == {}


def test_examples_from_the_specification() -> None:
    trie = TopicTrie()
    for t in [
        "sport/tennis/player1",
        "sport/tennis/player1/ranking",
        "sport",
        "sport/",
        "/finance",
        "$SYS/x",
    ]:
        trie.add(t)
    assert sorted(trie.match("sport/tennis/player1/#")) == [
        "sport/tennis/player1",
        "sport/tennis/player1/ranking",
    ]
    assert sorted(trie.match("sport/#")) == [
        "sport",
        "sport/",
        "sport/tennis/player1",
        "sport/tennis/player1/ranking",
    ]
    assert trie.match("sport/+") == ["sport/"]
    assert sorted(trie.match("+/+")) == ["/finance", "sport/"]
    assert trie.match("/+") == ["/finance"]
    assert "$SYS/x" not in trie.match("#") and trie.match("$SYS/#") == ["$SYS/x"]


def test_filter_validation() -> None:
    assert all(valid_filter(f) for f in ["#", "+", "a/#", "+/+/#", "/", "a//b", "$SYS/#"])
    assert not any(valid_filter(f) for f in ["", "a#", "a/#/b", "#/a", "a+", "+a/b", "a/\x00"])
    assert is_wildcard("a/+") and is_wildcard("#") and not is_wildcard("a/b")
