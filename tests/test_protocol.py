"""The wire protocol: codec round-trips and rejections, topic parsing, backoff, broker URLs."""

from __future__ import annotations

import random

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel
from tether.protocol import codec, topics
from tether.protocol.backoff import Backoff
from tether.protocol.commands import (
    COMMAND_ADAPTER,
    DevicesList,
    DevicesShow,
    GroupsCreate,
    GroupsList,
    GroupsRemove,
    GroupsShow,
    StacksDeploy,
    StacksList,
    StacksRemove,
    StacksStatus,
)
from tether.protocol.errors import ConfigError, PayloadError, TopicError
from tether.protocol.models import (
    DesiredState,
    DeviceFacts,
    DownloadStatus,
    Event,
    HealthcheckSpec,
    ImageDownload,
    PortSpec,
    Presence,
    RegistryAuth,
    Reply,
    ReportedState,
    Request,
    ServiceSpec,
    ServiceStatus,
    StackDefinition,
    StackRef,
    StackSpec,
    StackStatus,
    VolumeSpec,
    content_hash,
)
from tether.protocol.mqtt import BrokerAddress, parse_broker_url

HASH = "ab" * 32

SPEC = StackSpec(
    services=(
        ServiceSpec(name="db", image="postgres:16", environment={"A": "1"}, restart="always"),
        ServiceSpec(
            name="web",
            image="web:1",
            command=("serve", "--port", "80"),
            entrypoint=("/bin/tini", "--"),
            ports=(
                PortSpec(container=80, host=8080, host_ip="127.0.0.1"),
                PortSpec(container=53, protocol="udp"),
            ),
            volumes=(
                VolumeSpec(type="bind", source="/srv", target="/srv", read_only=True),
                VolumeSpec(type="volume", source="data", target="/data"),
            ),
            network_mode="bridge",
            labels={"team": "shop"},
            healthcheck=HealthcheckSpec(test=("CMD", "true"), interval_s=1.5, retries=2),
            depends_on=("db",),
            stop_grace_period_s=3.0,
        ),
    ),
    volumes=("data",),
)

MESSAGES: list[BaseModel] = [
    StackDefinition(spec_hash=SPEC.spec_hash(), spec=SPEC),
    DesiredState(
        device_id="pi-1", generation=7, stacks=(StackRef(name="shop", spec_hash=HASH),), issued_at=1.5
    ),
    DesiredState(device_id="pi-1", generation=0),
    DesiredState(
        device_id="pi-1",
        generation=8,
        stage=(StackRef(name="shop", spec_hash=HASH),),
        registries=(RegistryAuth(host="registry.example:5000", digest="d1", sealed="c2VhbGVk"),),
    ),
    ReportedState(
        device_id="pi-1",
        generation=8,
        downloads={
            "shop": DownloadStatus(
                spec_hash=HASH,
                state="retrying",
                done=3_400_000,
                total=8_000_000,
                rate=12_000.0,
                eta_s=383.0,
                reason="connection refused",
                images=(ImageDownload(image="web:2", done=3_400_000, total=8_000_000),),
            )
        },
    ),
    ReportedState(
        device_id="pi-1",
        generation=7,
        stacks={
            "shop": StackStatus(
                spec_hash=HASH,
                state="running",
                services={
                    "web": ServiceStatus(state="running", spec_hash=HASH, health="healthy", restarts=2),
                    "db": ServiceStatus(state="exited", exit_code=3, last_error="boom"),
                },
            )
        },
        error="rejected",
        at=2.0,
    ),
    ReportedState(device_id="pi-1", generation=-1),
    Presence(
        device_id="pi-1",
        status="online",
        session=3,
        facts=DeviceFacts(
            agent_version="0.1.0", driver="docker", arch="aarch64", os="Linux", labels={"site": "b"}
        ),
        at=3.0,
    ),
    Presence(device_id="pi-1", status="offline", session=0),
    Event(device_id="pi-1", kind="action.failed", message="no", level="error", stack="shop", service="web"),
    Request(id="r1", reply_to="tether/v1/clients/c1/replies", command={"kind": "devices.ls"}),
    Reply(id="r1", ok=True, result={"devices": [{"id": "pi-1", "labels": {"a": "b"}}], "n": 1}),
    Reply(id="r1", ok=False, error="no such group"),
]

COMMANDS: list[BaseModel] = [
    DevicesList(),
    DevicesShow(device_id="pi-1"),
    GroupsCreate(name="edge", devices=("pi-1", "pi-2")),
    GroupsCreate(name="berlin", selector="site=berlin"),
    GroupsList(),
    GroupsShow(name="edge"),
    GroupsRemove(name="edge"),
    StacksDeploy(name="shop", group="edge", compose="services: {}\n"),
    StacksList(),
    StacksStatus(name="shop"),
    StacksRemove(name="shop"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_wire_model_round_trips(message: BaseModel) -> None:
    """encode then decode gives back an equal model, as a msgpack map."""
    payload = codec.encode(message)
    assert isinstance(msgpack.unpackb(payload), dict)
    assert codec.decode(payload, type(message)) == message


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: type(c).__name__)
def test_every_command_round_trips_inside_a_request(command: BaseModel) -> None:
    """A command carried in a Request comes back, through COMMAND_ADAPTER, as the same model."""
    request = Request(id="r", reply_to="x", command=command.model_dump(mode="json"))
    received = codec.decode(codec.encode(request), Request)
    parsed = COMMAND_ADAPTER.validate_python(received.command)
    assert type(parsed) is type(command)
    assert parsed == command


def test_command_adapter_rejects_unknown_kind() -> None:
    """A command with an unknown kind fails validation (so the controller can reply with an error)."""
    with pytest.raises(ValueError, match="devices.reboot|tag"):
        COMMAND_ADAPTER.validate_python({"kind": "devices.reboot"})


def test_spec_hash_is_stable_across_the_wire() -> None:
    """A decoded stack definition hashes to the hash it was sent under."""
    received = codec.decode(codec.encode(MESSAGES[0]), StackDefinition)
    assert received.spec.spec_hash() == received.spec_hash == SPEC.spec_hash()


@given(
    env=st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=12), max_size=3),
    configs=st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), st.text(max_size=20), max_size=2),
)
def test_a_stack_hashes_its_services_on_the_way(env: dict[str, str], configs: dict[str, str]) -> None:
    """The stack's hash is computed from one dump that also gives its services' hashes: both
    must be exactly the content hashes of the models (canonical JSON of each on its own)."""
    services = (SPEC.services[0].model_copy(update={"environment": env}), *SPEC.services[1:])
    fresh = StackSpec.model_validate(
        StackSpec(services=services, volumes=SPEC.volumes, configs=configs).model_dump()
    )
    assert fresh.spec_hash() == content_hash(fresh)
    assert [s.spec_hash() for s in fresh.services] == [content_hash(s) for s in fresh.services]


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"\xc1", "not valid msgpack"),
        (b"", "not valid msgpack"),
        (b"\x81\xa1a\x01\x02", "not valid msgpack"),  # trailing bytes
        (msgpack.packb([1, 2, 3]), "expected a map, got list"),
        (msgpack.packb("text"), "expected a map, got str"),
        (msgpack.packb({"device_id": "pi-1", "status": "online"}), "session"),
        (msgpack.packb({"device_id": "pi-1", "status": "away", "session": 1}), "status"),
        (msgpack.packb({"device_id": "pi-1", "status": "online", "session": -1}), "session"),
        (msgpack.packb({"v": 0, "device_id": "pi-1", "status": "online", "session": 1}), "v"),
        (msgpack.packb({1: "int keys"}), "not valid msgpack"),
    ],
)
def test_decode_rejects_bad_payloads_naming_the_model(payload: bytes, fragment: str) -> None:
    """Undecodable, non-map or invalid payloads raise PayloadError naming the model and problem."""
    with pytest.raises(PayloadError) as info:
        codec.decode(payload, Presence)
    assert str(info.value).startswith("Presence: ")
    assert fragment in str(info.value)


def test_decode_rejects_oversize_payloads() -> None:
    """A payload over MAX_PAYLOAD is refused with PayloadError before it is unpacked."""
    payload = msgpack.packb({"device_id": "x", "kind": "k", "message": "m" * codec.MAX_PAYLOAD})
    with pytest.raises(PayloadError, match=r"^Event: payload of \d+ bytes exceeds"):
        codec.decode(payload, Event)


def _report(device: str, state: str = "running", restarts: int = 0) -> ReportedState:
    service = ServiceStatus(state="running", spec_hash=HASH, restarts=restarts)
    stack = StackStatus(spec_hash=HASH, state=state, services={"web": service})  # type: ignore[arg-type]
    return ReportedState(device_id=device, generation=3, stacks={"app": stack}, at=1.5)


_REPORT = msgpack.packb(_report("pi-1").model_dump(mode="json"))


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        b"",
        _REPORT + b"\x01",  # trailing bytes
        msgpack.packb([1, 2, 3]),
        msgpack.packb({1: "int keys", "device_id": "pi-1", "generation": 1}),
        msgpack.packb({"device_id": "pi-1"}),  # no generation
        msgpack.packb({"device_id": "pi-1", "generation": -2, "stacks": {}}),
        msgpack.packb({"device_id": "pi-1", "generation": 1, "stacks": {"app": {"state": "odd"}}}),
        msgpack.packb({"device_id": "pi-1", "generation": 1, "stacks": [1]}),
        msgpack.packb({"device_id": "pi-1", "generation": 1, "stacks": {1: {}}}),
        _REPORT[:-3],  # cut short
        msgpack.packb({"device_id": "pi-1", "generation": 1, "stacks": "x" * (codec.MAX_PAYLOAD + 1)}),
        msgpack.packb({"device_id": "pi-1", "generation": 1, "at": float("inf")}),  # stored as null
        msgpack.packb({"device_id": "pi-1", "generation": 1, "at": float("nan")}),
        msgpack.packb(
            {
                "device_id": "pi-1",
                "generation": 1,
                "downloads": {"a": {"spec_hash": "a", "state": "downloading", "rate": float("inf")}},
            }
        ),
    ],
)
def test_field_memo_refuses_what_decode_refuses_in_the_same_words(payload: bytes) -> None:
    """FieldMemo raises decode's PayloadError for every bad payload, a known field value or not."""
    memo = codec.FieldMemo(ReportedState, "stacks")
    memo.decode(_REPORT)  # the stacks of a good report are known
    with pytest.raises(PayloadError) as expected:
        codec.decode(payload, ReportedState)
    with pytest.raises(PayloadError) as got:
        memo.decode(payload)
    assert str(got.value) == str(expected.value)
    # Nothing of it left in the memo's parser: the next good reports decode as ever, their
    # stacks the very value kept (not decode's fresh copy: what the memo's own path gives).
    again = memo.decode(_REPORT)
    assert again == codec.decode(_REPORT, ReportedState)
    assert memo.decode(_REPORT).stacks is again.stacks


def test_field_memo_decodes_as_decode_and_shares_the_validated_field() -> None:
    """Reports equal to decode's; the same stacks encoding validated once (shared), a new one anew."""
    memo = codec.FieldMemo(ReportedState, "stacks", size=2)
    reports = [_report("pi-1"), _report("pi-2"), _report("pi-3", "converging"), _report("pi-4", restarts=2)]
    raw = {**reports[1].model_dump(mode="json"), "future": 1}  # a field from a newer agent
    payloads = [codec.encode(reports[0]), msgpack.packb(raw), *map(codec.encode, reports[2:])]
    decoded = [memo.decode(p) for p in payloads]
    assert decoded == [codec.decode(p, ReportedState) for p in payloads] == reports
    assert decoded[0].stacks["app"] is decoded[1].stacks["app"]  # validated once
    assert decoded[0].stacks is decoded[1].stacks  # the very dict, not an equal copy of it
    assert decoded[2].stacks["app"] is not decoded[0].stacks["app"]
    assert decoded[2].stacks["app"].state == "converging"
    assert decoded[3].stacks["app"].services["web"].restarts == 2  # past size: forgotten, then anew
    assert memo.decode(payloads[0]) == reports[0]
    without = msgpack.packb({"device_id": "pi-9", "generation": 1})
    assert memo.decode(without) == ReportedState(device_id="pi-9", generation=1)


def test_fields_added_for_updates_are_absent_while_empty() -> None:
    """stage, registries and downloads stay off the wire when empty, so old receivers see the same payload."""
    desired = msgpack.unpackb(codec.encode(DesiredState(device_id="pi-1", generation=1)))
    reported = msgpack.unpackb(codec.encode(ReportedState(device_id="pi-1", generation=1)))
    assert not {"stage", "registries", "vars"} & set(desired)
    assert "downloads" not in reported


def test_unknown_fields_are_tolerated_on_receipt() -> None:
    """Fields a newer sender adds (top level and nested) are ignored, and a newer v is accepted."""
    raw = {
        "v": 2,
        "device_id": "pi-1",
        "generation": 4,
        "stacks": [{"name": "shop", "spec_hash": HASH, "priority": 9}],
        "signature": b"\x00\x01",
        "future": {"nested": [1, 2]},
    }
    state = codec.decode(msgpack.packb(raw, use_bin_type=True), DesiredState)
    assert state == DesiredState(
        v=2, device_id="pi-1", generation=4, stacks=(StackRef(name="shop", spec_hash=HASH),)
    )


# --- topics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(topics.DeviceTopic))
def test_parse_classifies_device_topics(kind: topics.DeviceTopic) -> None:
    """Every per-device topic built by topics.device parses back to its device and kind."""
    parsed = topics.parse(topics.device("pi-1.b_2", kind))
    assert parsed == topics.ParsedTopic("device", device_id="pi-1.b_2", device_topic=kind)
    assert topics.parse_device(topics.device("pi-1.b_2", kind)) == ("pi-1.b_2", kind)


def test_parse_classifies_stack_request_and_reply_topics() -> None:
    """Stack definitions, the request topic and reply topics are recognised with their ids."""
    assert topics.parse(topics.stack(HASH)) == topics.ParsedTopic("stack", spec_hash=HASH)
    assert topics.parse(topics.REQUESTS) == topics.ParsedTopic("requests")
    assert topics.parse(topics.replies("cli-7")) == topics.ParsedTopic("replies", client_id="cli-7")
    assert topics.all_devices(topics.DeviceTopic.REPORTED) == "tether/v1/devices/+/reported"


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "tether",
        "tether/v1",
        "other/v1/devices/pi/desired",
        "tether/v2/devices/pi/desired",
        "Tether/v1/devices/pi/desired",
        "tether/v1/devices/-pi/desired",
        "tether/v1/devices/pi!/desired",
        "tether/v1/devices//desired",
        f"tether/v1/devices/{'a' * 65}/desired",
        "tether/v1/devices/+/desired",
        "tether/v1/devices/#",
        "tether/v1/devices/pi/#",
        "tether/v1/devices/pi/+",
        "tether/v1/devices/pi/status",
        "tether/v1/devices/pi/desired/extra",
        "tether/v1/devices/pi",
        f"tether/v1/stacks/{HASH}/extra",
        f"tether/v1/stacks/{HASH.upper()}",
        "tether/v1/stacks/abc",
        "tether/v1/stacks/+",
        "tether/v1/controller/requests/extra/more",
        "tether/v1/controller/replies",
        "tether/v1/clients/c1/replies/extra",
        "tether/v1/clients/+/replies",
        "tether/v1/clients/c1/requests",
        "/tether/v1/controller/requests",
    ],
)
def test_parse_returns_none_for_foreign_or_malformed_topics(topic: str) -> None:
    """Topics outside the tree, with bad ids, wildcards or extra levels are not Tether topics."""
    assert topics.parse(topic) is None
    assert topics.parse_device(topic) is None


@pytest.mark.parametrize(
    "topic",
    [
        topics.REQUESTS,
        topics.replies("cli-7"),
        topics.stack(HASH),
        topics.enroll_request("pi-1"),
        "tether/v1/controller/requests/alice",
        "tether/v1/devices/pi-1/reported",
        "tether/v1/devices/pi-1/reported/",
        "tether/v1/devices/pi-1//reported",
        "tether/v1/devices/pi-1",
        "tether/v1/devices/",
        "tether/v1/devicesx/pi-1/reported",
    ],
)
def test_parse_device_agrees_with_parse(topic: str) -> None:
    """parse_device (the controller's per-message path) names a device topic exactly when
    parse says it is one, with the same device and kind."""
    parsed = topics.parse(topic)
    expected = (
        (parsed.device_id, parsed.device_topic) if parsed is not None and parsed.kind == "device" else None
    )
    assert topics.parse_device(topic) == expected


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "+", "#", "pi#1", "-pi", ".pi", "pi 1", "a" * 65])
def test_check_device_id_rejects_unusable_ids(bad: str) -> None:
    """Device ids that are empty, too long or contain topic separators or wildcards are refused."""
    with pytest.raises(TopicError, match="invalid device id"):
        topics.check_device_id(bad)
    with pytest.raises(TopicError):
        topics.device(bad, topics.DeviceTopic.DESIRED)


@pytest.mark.parametrize("good", ["pi", "PI-042", "a.b_c-d", "0", "a" * 64])
def test_check_device_id_accepts_usable_ids(good: str) -> None:
    """Letters, digits, '.', '_' and '-' up to 64 characters are valid device ids."""
    assert topics.check_device_id(good) == good


def test_topic_builders_reject_bad_hashes_and_client_ids() -> None:
    """stack() and replies() refuse values that would not parse back."""
    with pytest.raises(TopicError):
        topics.stack("XYZ")
    with pytest.raises(TopicError):
        topics.replies("a/b")


# --- backoff -------------------------------------------------------------------------------------


@given(
    base=st.floats(0.01, 10),
    cap=st.floats(0.01, 100),
    attempt=st.integers(0, 10_000),
    seed=st.integers(0, 2**32),
)
def test_backoff_delay_is_within_zero_and_a_capped_ceiling(
    base: float, cap: float, attempt: int, seed: int
) -> None:
    """Every delay lies in [0, ceiling(attempt)] and the ceiling never exceeds the cap."""
    backoff = Backoff(base=base, cap=cap, rng=random.Random(seed))
    ceiling = backoff.ceiling(attempt)
    assert 0 < ceiling <= cap
    assert ceiling == min(cap, base * 2 ** min(attempt, 32))
    assert 0.0 <= backoff.delay(attempt) <= ceiling


def test_backoff_ceiling_doubles_then_caps_and_jitters() -> None:
    """The ceiling doubles per attempt up to the cap; delays of one attempt are spread, not fixed."""
    backoff = Backoff(base=0.5, cap=30.0, rng=random.Random(1))
    assert [backoff.ceiling(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff.ceiling(10**9) == 30.0
    delays = {backoff.delay(5) for _ in range(50)}
    assert len(delays) > 40


# --- broker URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.example:1884", BrokerAddress("broker.example", 1884)),
        ("mqtt://broker.example", BrokerAddress("broker.example", 1883)),
        ("mqtts://broker.example", BrokerAddress("broker.example", 8883, tls=True)),
        ("mqtts://broker.example:9883", BrokerAddress("broker.example", 9883, tls=True)),
        ("broker.example:1234", BrokerAddress("broker.example", 1234)),
        ("broker", BrokerAddress("broker", 1883)),
        ("10.0.0.5", BrokerAddress("10.0.0.5", 1883)),
        ("mqtt://10.0.0.5:1883", BrokerAddress("10.0.0.5", 1883)),
        ("  mqtt://127.0.0.1:2000 ", BrokerAddress("127.0.0.1", 2000)),
        ("mqtt://[::1]:1883", BrokerAddress("::1", 1883)),
    ],
)
def test_parse_broker_url_accepts_supported_forms(url: str, expected: BrokerAddress) -> None:
    """mqtt://, mqtts:// (default port 8883), bare host[:port], IPv4 and IPv6 literals parse."""
    assert parse_broker_url(url) == expected
    assert parse_broker_url(expected.url()) == expected


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "mqtt://",
        "http://broker.example",
        "ws://broker.example:8080",
        "mqtt://broker.example:abc",
        "mqtt://broker.example:99999",
        "::::",
        "not a url",
        "mqtt://bro ker:1883",
        "mqtt://broker$:1883",
    ],
)
def test_parse_broker_url_rejects_junk(url: str) -> None:
    """Anything that is not a usable mqtt(s) address is a ConfigError naming the URL."""
    with pytest.raises(ConfigError, match="invalid broker URL"):
        parse_broker_url(url)


def test_peek_str_reads_one_field_and_refuses_what_lacks_it() -> None:
    """peek_str returns a reply's id wherever it is in the map, without the rest; a payload
    that is not a map, lacks the field or has it as non-text raises PayloadError."""
    reply = codec.encode(Reply(id="r-1", ok=True, result={"os": "linux", "nested": [1, 2, {"a": b"x"}]}))
    assert codec.peek_str(reply, "id") == "r-1"
    assert codec.peek_str(msgpack.packb({"ok": True, "result": {"id": 5}, "id": "r-2"}), "id") == "r-2"
    for bad in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"ok": True}), msgpack.packb({"id": 7})):
        with pytest.raises(PayloadError):
            codec.peek_str(bad, "id")
