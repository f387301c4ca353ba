"""Topic tries for the embedded broker: which retained topics a filter matches, which
wildcard filters a topic matches. Pure Python, no amqtt, MQTT 3.1.1 section 4.7 rules:

* ``+`` matches exactly one level, ``#`` (last level only) matches any number of levels,
  including none: ``a/#`` matches ``a``.
* Topics whose first character is ``$`` are not matched by a filter whose first level
  is a wildcard (``#``, ``+/...``); ``$SYS/#`` matches them.
* Levels may be empty: ``a//b`` has three levels, ``/a`` two.

Exact filters (no wildcard) never need a trie: a dict lookup by topic is enough, so the
broker keeps them in its dict and puts only wildcard filters in :class:`FilterTrie`.
"""

from __future__ import annotations

from collections.abc import Iterator


def is_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def valid_filter(topic_filter: str) -> bool:
    """True if ``topic_filter`` is a well-formed MQTT 3.1.1 topic filter."""
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


class _Node:
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.value: str | None = None  # the topic (or filter) that ends at this node


class _Trie:
    """A trie of ``/``-separated names; each stored name ends at one node."""

    def __init__(self) -> None:
        self._root = _Node()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, name: str) -> None:
        node = self._root
        for level in name.split("/"):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        if node.value is None:
            self._size += 1
        node.value = name

    def remove(self, name: str) -> None:
        path = [self._root]
        levels = name.split("/")
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        if path[-1].value is None:
            return
        path[-1].value = None
        self._size -= 1
        # prune the branch back to the first node still in use
        for i in range(len(levels), 0, -1):
            node = path[i]
            if node.value is not None or node.children:
                break
            del path[i - 1].children[levels[i - 1]]

    def clear(self) -> None:
        self._root = _Node()
        self._size = 0


class TopicTrie(_Trie):
    """Topic names (e.g. of retained messages), looked up by topic filter."""

    def match(self, topic_filter: str) -> list[str]:
        """Every stored topic that ``topic_filter`` matches."""
        out: list[str] = []
        levels = topic_filter.split("/")
        last = len(levels)
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            if i == last:
                if node.value is not None:
                    out.append(node.value)
                continue
            level = levels[i]
            if level == "#":
                if node.value is not None and i > 0:  # "a/#" matches "a"
                    out.append(node.value)
                for name, child in node.children.items():
                    if i == 0 and name.startswith("$"):
                        continue
                    out.extend(_subtree(child))
            elif level == "+":
                for name, child in node.children.items():
                    if i == 0 and name.startswith("$"):
                        continue
                    stack.append((child, i + 1))
            else:
                exact = node.children.get(level)
                if exact is not None:
                    stack.append((exact, i + 1))
        return out


def _subtree(node: _Node) -> Iterator[str]:
    stack = [node]
    while stack:
        n = stack.pop()
        if n.value is not None:
            yield n.value
        stack.extend(n.children.values())


class FilterTrie(_Trie):
    """Wildcard topic filters, looked up by topic name."""

    def match(self, topic: str) -> list[str]:
        """Every stored filter that matches ``topic``."""
        out: list[str] = []
        levels = topic.split("/")
        last = len(levels)
        dollar = topic.startswith("$")
        stack: list[tuple[_Node, int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            wild = not (dollar and i == 0)
            children = node.children
            hash_child = children.get("#")
            if hash_child is not None and hash_child.value is not None and wild:
                out.append(hash_child.value)  # "a/#" at node "a": matches "a" and below
            if i == last:
                if node.value is not None:
                    out.append(node.value)
                continue
            child = children.get(levels[i])
            if child is not None:
                stack.append((child, i + 1))
            plus = children.get("+")
            if plus is not None and wild:
                stack.append((plus, i + 1))
        return out
