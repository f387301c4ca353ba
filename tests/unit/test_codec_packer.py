"""codec.packb: a Packer reused per thread gives msgpack.packb's bytes, after a failed pack too."""

from __future__ import annotations

import random
import threading

import msgpack
import pytest
from tether.protocol import codec


def _value(rng: random.Random, depth: int = 0) -> object:
    """A random msgpack value: every kind the codec packs, nested maps and lists, long and short."""
    kinds = ["none", "bool", "int", "bigint", "float", "str", "longstr", "bytes"]
    if depth < 3:
        kinds += ["map", "list"]
    kind = rng.choice(kinds)
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-200, 200)
    if kind == "bigint":
        return (
            rng.choice([-1, 1]) * rng.randint(0, 2**64 - 1)
            if rng.random() < 0.5
            else rng.randint(0, 2**64 - 1)
        )
    if kind == "float":
        return rng.uniform(-1e9, 1e9)
    if kind == "str":
        return "".join(rng.choice("aé€😀-_ ") for _ in range(rng.randint(0, 40)))
    if kind == "longstr":
        return "x" * rng.choice([31, 32, 255, 256, 65_535, 65_536, 300_000])
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 300))
    if kind == "map":
        return {f"k{i}-{rng.random():.3f}": _value(rng, depth + 1) for i in range(rng.randint(0, 17))}
    return [_value(rng, depth + 1) for _ in range(rng.randint(0, 17))]


def _valid(value: object) -> bool:
    try:
        msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return False
    return True


def test_reused_packer_gives_packb_bytes_for_varied_values() -> None:
    """For 2,000 random values (every kind, nested, long), codec.packb == msgpack.packb."""
    rng = random.Random(21)
    checked = 0
    for _ in range(2_000):
        value = _value(rng)
        if not _valid(value):  # -2**64 + 1 and such: msgpack refuses them (tested below)
            continue
        assert codec.packb(value) == msgpack.packb(value, use_bin_type=True)
        checked += 1
    assert checked > 1_500


@pytest.mark.parametrize(
    "bad",
    [
        {"a": 1, "b": [1, 2, object()]},  # a type msgpack cannot pack, deep in a map
        {"a": "x" * 1000, "n": 2**64},  # an int too large, after a long string
        [1, 2, {"k": -(2**63) - 1}],  # an int too small
        {"a": {1.5: "float key"}, "z": {1, 2}},  # a set
    ],
)
def test_reused_packer_after_a_failed_pack_starts_clean(bad: object) -> None:
    """A pack that fails midway raises as msgpack.packb does and leaves nothing for the next one."""
    with pytest.raises((TypeError, OverflowError, ValueError)) as mine:
        codec.packb(bad)
    with pytest.raises(type(mine.value)):
        msgpack.packb(bad, use_bin_type=True)
    rng = random.Random(7)
    for _ in range(50):
        value = _value(rng)
        if _valid(value):
            assert codec.packb(value) == msgpack.packb(value, use_bin_type=True)


def test_each_thread_packs_with_its_own_packer() -> None:
    """Four threads packing at once each get msgpack.packb's bytes for every value (no shared buffer)."""
    values = [
        {"device_id": f"d-{i}", "seq": i, "payload": "p" * (i % 700), "list": list(range(i % 50))}
        for i in range(3_000)
    ]
    expected = [msgpack.packb(v, use_bin_type=True) for v in values]
    wrong: list[int] = []

    def work(offset: int) -> None:
        for n in range(len(values)):
            i = (n + offset * 700) % len(values)
            if codec.packb(values[i]) != expected[i]:
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert wrong == []
