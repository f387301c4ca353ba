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


def test_enrolling_as_the_token_user() -> None:
    """An enrolling device connects as ``enroll-{token id}`` (the id inside its token) with the
    token as password; its device id is in its client id. Another token's id, a client id
    that is not ``tether-enroll-{valid id}``, or a removed token: refused."""
    from tether.protocol.credentials import TokenGrant, enroll_username, hash_token, token_id_of

    token = "tet_0a1b2c3d_secret-part_with_underscores"
    assert token_id_of(token) == "0a1b2c3d" and token_id_of("tet_x") is None
    assert enroll_username(token, "pi-1") == "enroll-0a1b2c3d"
    assert enroll_username("not-a-fleet-token", "pi-1") == "enroll:pi-1"
    table = CredentialTable()
    table.set_tokens({hash_token(token): TokenGrant("0a1b2c3d")})
    assert table.authenticate("enroll-0a1b2c3d", token, "tether-enroll-pi-1") == Identity(
        "enrolling", "pi-1", "tether-enroll-pi-1"
    )
    assert table.authenticate("enroll-ffffffff", token, "tether-enroll-pi-1") is None
    assert table.authenticate("enroll-0a1b2c3d", token, "tether-enroll-pi-1\n") is None
    assert table.authenticate("enroll-0a1b2c3d", token, "tether-pi-1") is None
    assert table.authenticate("enroll-0a1b2c3d", "tet_0a1b2c3d_other", "tether-enroll-pi-1") is None
    table.set_tokens({})
    assert table.authenticate("enroll-0a1b2c3d", token, "tether-enroll-pi-1") is None
