"""Password hashes (Mosquitto's $7$ format) and the credential table the broker checks (pure)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from tether.protocol.acl import Identity, client_id_allowed
from tether.protocol.credentials import Credential, CredentialTable, hash_password, verify_password


def test_hash_round_trip_and_rejects() -> None:
    """A hash verifies its password only; a malformed hash verifies nothing and raises nothing."""
    h = hash_password("s3cret", iterations=1000)
    assert h.startswith("$7$1000$")
    assert verify_password("s3cret", h)
    assert not verify_password("s3cret ", h)
    for bad in ("", "$7$", "$6$abc$def", "$7$x$AAAA$AAAA", "$7$100$!!$AAAA", "$7$0$AAAA$AAAA"):
        assert not verify_password("s3cret", bad)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd not installed")
def test_verifies_mosquitto_passwd_hashes(tmp_path: Path) -> None:
    """A hash written by the real mosquitto_passwd verifies here: the formats are the same."""
    path = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "alice", "wonder"], check=True)
    _, h = path.read_text().strip().split(":", 1)
    assert verify_password("wonder", h)
    assert not verify_password("wander", h)


def test_table_refuses_revoked_unknown_anonymous_and_foreign_client_ids() -> None:
    """Only a known, unrevoked user with its password and its own client id gets an identity."""
    cred = Credential("dev-a", "device", "dev-a", hash_password("pw", iterations=1000))
    table = CredentialTable([cred])
    assert table.authenticate("dev-a", "pw", "tether-dev-a") == Identity("device", "dev-a", "tether-dev-a")
    assert table.authenticate("dev-a", "pw", "tether-dev-b") is None
    assert table.authenticate("dev-a", "nope", "tether-dev-a") is None
    assert table.authenticate("dev-a", None, "tether-dev-a") is None
    assert table.authenticate("ghost", "pw", "tether-ghost") is None
    assert table.authenticate(None, None, "x") is None
    assert CredentialTable(allow_anonymous=True).authenticate(None, None, "x") is not None
    table.put(Credential("dev-a", "device", "dev-a", cred.password_hash, revoked=True))
    assert table.authenticate("dev-a", "pw", "tether-dev-a") is None
    assert table.identity("dev-a", "tether-dev-a") is None


def test_client_ids_belong_to_their_roles() -> None:
    """Nobody can connect under another role's client id and so take over its session."""
    assert client_id_allowed(Identity("device", "a", "tether-a"))
    assert not client_id_allowed(Identity("device", "a", "tether-controller-1"))
    assert client_id_allowed(Identity("controller", "controller", "tether-controller-1"))
    assert client_id_allowed(Identity("operator", "admin", "tether-cli-1"))
    assert client_id_allowed(Identity("operator", "admin", "node-red-1"))
    assert not client_id_allowed(Identity("operator", "admin", "tether-a"))
    assert client_id_allowed(Identity("enrolling", "n", "tether-enroll-n"))
    assert not client_id_allowed(Identity("enrolling", "n", "tether-n"))
