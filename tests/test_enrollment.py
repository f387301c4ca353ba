"""Enrollment's pure parts: the agent's request and response handling, token grants, the ACL."""

from __future__ import annotations

import base64
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tether.agent.enroll import build_request, load_or_create_key, open_response
from tether.protocol import codec
from tether.protocol.acl import Identity, may_publish, may_subscribe
from tether.protocol.credentials import CredentialTable, TokenGrant, hash_token
from tether.protocol.enrollment import DeviceKey, decode_public_key, seal_grant
from tether.protocol.errors import ConfigError, PayloadError
from tether.protocol.models import (
    DeviceFacts,
    EnrollmentGrant,
    EnrollmentRequest,
    EnrollmentResponse,
)

FACTS = DeviceFacts(agent_version="0.1.0", driver="process", arch="x86_64", os="Linux")


def _answer(public_key: str, device_id: str = "pi-1", **grant: object) -> bytes:
    fields = {"device_id": device_id, "status": "approved", "username": device_id, "password": "s3cret"}
    fields.update(grant)
    sealed = seal_grant(public_key, EnrollmentGrant.model_validate(fields))
    return codec.encode(EnrollmentResponse(device_id=device_id, sealed=sealed))


def test_request_carries_identity_and_public_key() -> None:
    key = DeviceKey.generate()
    request = codec.decode(build_request("pi-1", "tet_x", key, FACTS), EnrollmentRequest)
    assert request.device_id == "pi-1" and request.token == "tet_x" and request.v >= 1
    assert decode_public_key(request.public_key) == bytes(key.nacl().public_key)


def test_response_opens_only_with_the_right_key() -> None:
    key = DeviceKey.generate()
    public = key.public
    grant = open_response(_answer(public), key, "pi-1")
    assert (grant.status, grant.username, grant.password) == ("approved", "pi-1", "s3cret")
    with pytest.raises(PayloadError, match="cannot be opened"):
        open_response(_answer(public), DeviceKey.generate(), "pi-1")


def test_tampered_response_is_refused() -> None:
    key = DeviceKey.generate()
    public = key.public
    response = codec.decode(_answer(public), EnrollmentResponse)
    raw = bytearray(base64.b64decode(response.sealed))
    raw[-1] ^= 0x01
    tampered = codec.encode(response.model_copy(update={"sealed": base64.b64encode(bytes(raw)).decode()}))
    with pytest.raises(PayloadError, match="tampered"):
        open_response(tampered, key, "pi-1")
    with pytest.raises(PayloadError, match="not base64"):
        open_response(codec.encode(response.model_copy(update={"sealed": "%%%"})), key, "pi-1")
    with pytest.raises(PayloadError):
        open_response(b"\x93garbage", key, "pi-1")
    with pytest.raises(PayloadError, match="not 'pi-1'"):
        open_response(_answer(public, device_id="pi-2"), key, "pi-1")


def test_approved_without_credentials_is_refused() -> None:
    key = DeviceKey.generate()
    public = key.public
    with pytest.raises(PayloadError, match="without credentials"):
        open_response(_answer(public, password=None), key, "pi-1")
    rejected = open_response(_answer(public, status="rejected", username=None, password=None), key, "pi-1")
    assert rejected.status == "rejected"


def test_public_key_must_be_32_bytes() -> None:
    with pytest.raises(PayloadError, match="expected 32"):
        decode_public_key(base64.b64encode(b"x" * 31).decode())
    with pytest.raises(PayloadError, match="not base64"):
        decode_public_key("not base64!")


def test_key_file_is_private_and_stable(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    assert stat.S_IMODE((tmp_path / "enroll.key").stat().st_mode) == 0o600
    again = load_or_create_key(tmp_path)
    assert (again.private, again.public) == (key.private, key.public)
    assert key.public == base64.b64encode(bytes(again.nacl().public_key)).decode()


def test_key_file_without_its_public_line_gets_it(tmp_path: Path) -> None:
    """An ``enroll.key`` written before the public key was kept in it: derived and added."""
    key = DeviceKey.generate()
    (tmp_path / "enroll.key").write_text(base64.b64encode(key.private).decode() + "\n")
    loaded = load_or_create_key(tmp_path)
    assert (loaded.private, loaded.public) == (key.private, key.public)
    assert (tmp_path / "enroll.key").read_text() == key.save_text()


@pytest.mark.parametrize("text", ["", "%%%\n", "YWJj\n", "a b c\n"])
def test_unreadable_key_file_is_one_clear_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "enroll.key").write_text(text)
    with pytest.raises(ConfigError, match="enrollment key .* is unreadable"):
        load_or_create_key(tmp_path)
    assert (tmp_path / "enroll.key").read_text() == text  # left as it was


def test_agent_without_secrets_does_not_load_pynacl(tmp_path: Path) -> None:
    """PyNaCl (about 1.2 MB resident) is loaded only when a box is opened: a new key pair
    is made by a child process, and loading it again needs no PyNaCl either."""
    code = (
        "import sys; from pathlib import Path; from tether.agent.enroll import load_or_create_key;"
        "import tether.agent.runner;"
        f"k = load_or_create_key(Path({str(tmp_path)!r})); assert k.public;"
        "print('nacl' in sys.modules)"
    )
    for _ in range(2):  # made, then loaded
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "False"
    key = DeviceKey.from_text((tmp_path / "enroll.key").read_text())
    assert key.public == base64.b64encode(bytes(key.nacl().public_key)).decode()


def test_table_admits_enrolling_devices_only_with_a_valid_token() -> None:
    table = CredentialTable()
    now = time.time()
    table.set_tokens(
        {
            hash_token("good"): TokenGrant("a"),
            hash_token("old"): TokenGrant("b", expires=now - 1),
            hash_token("spent"): TokenGrant("c", uses_left=0, devices=frozenset({"pi-1"})),
        }
    )
    auth = table.authenticate
    assert auth("enroll:pi-1", "good", "tether-enroll-pi-1") == Identity(
        "enrolling", "pi-1", "tether-enroll-pi-1"
    )
    assert auth("enroll:pi-1", "good", "tether-pi-1") is None  # not its client id
    assert auth("enroll:pi-1", "bad", "tether-enroll-pi-1") is None
    assert auth("enroll:pi-1", None, "tether-enroll-pi-1") is None
    assert auth("enroll:pi-1", "old", "tether-enroll-pi-1") is None
    assert auth("enroll:pi-1", "spent", "tether-enroll-pi-1") is not None  # already admitted with it
    assert auth("enroll:pi-2", "spent", "tether-enroll-pi-2") is None
    assert auth("enroll:bad/id", "good", "tether-enroll-bad/id") is None
    table.set_tokens({})
    assert auth("enroll:pi-1", "good", "tether-enroll-pi-1") is None


def test_enrolling_identity_reaches_only_its_enrollment_topics() -> None:
    me = Identity("enrolling", "pi-1", "tether-enroll-pi-1")
    assert may_publish(me, "tether/v1/enroll/pi-1/request")
    assert may_subscribe(me, "tether/v1/enroll/pi-1/response")
    assert not may_publish(me, "tether/v1/enroll/pi-2/request")
    assert not may_subscribe(me, "tether/v1/enroll/+/response")
    assert not may_subscribe(me, "tether/v1/devices/pi-1/desired")
    assert not may_publish(me, "tether/v1/devices/pi-1/presence")
