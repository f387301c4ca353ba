"""Password hashes (Mosquitto's $7$ format) and the credential table the broker checks (pure)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from tether.protocol import credentials
from tether.protocol.acl import Identity, client_id_allowed
from tether.protocol.credentials import (
    Credential,
    CredentialTable,
    VerifiedPasswords,
    hash_password,
    verify_password,
)


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


def _counting_kdf(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count the KDF runs of :class:`VerifiedPasswords` (the password of each)."""
    runs: list[str] = []

    def counted(password: str, password_hash: str) -> bool:
        runs.append(password)
        return verify_password(password, password_hash)

    monkeypatch.setattr(credentials, "verify_password", counted)
    return runs


def test_the_table_remembers_a_password_until_it_changes_or_is_revoked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The broker runs the KDF once per verified password; a new password refuses the old one at
    once, a revoked or removed user is refused though its password was remembered."""
    runs = _counting_kdf(monkeypatch)
    table = CredentialTable([Credential("dev-a", "device", "dev-a", hash_password("old", iterations=1000))])
    for _ in range(3):
        assert table.authenticate("dev-a", "old", "tether-dev-a") is not None
    assert runs == ["old"]
    table.put(Credential("dev-a", "device", "dev-a", hash_password("new", iterations=1000)))
    assert table.authenticate("dev-a", "old", "tether-dev-a") is None
    assert table.authenticate("dev-a", "new", "tether-dev-a") is not None
    assert table.authenticate("dev-a", "new", "tether-dev-a") is not None
    assert runs == ["old", "old", "new"]
    table.put(Credential("dev-a", "device", "dev-a", table.get("dev-a").password_hash, revoked=True))  # type: ignore[union-attr]
    assert table.authenticate("dev-a", "new", "tether-dev-a") is None
    table.put(Credential("dev-a", "device", "dev-a", table.get("dev-a").password_hash))  # type: ignore[union-attr]
    assert table.authenticate("dev-a", "new", "tether-dev-a") is not None
    table.remove("dev-a")
    assert table.authenticate("dev-a", "new", "tether-dev-a") is None
    assert runs == ["old", "old", "new"]


def test_remembered_passwords_start_afresh_at_their_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """VerifiedPasswords keeps at most ``limit`` entries; a wrong password is never remembered."""
    runs = _counting_kdf(monkeypatch)
    verified = VerifiedPasswords(2)
    hashes = {p: hash_password(p, iterations=1000) for p in ("a", "b", "c")}
    assert not verified.verify("u", "x", hashes["a"]) and not verified.verify("u", "x", hashes["a"])
    assert all(verified.verify("u", p, hashes[p]) for p in ("a", "b", "a", "b"))
    assert runs == ["x", "x", "a", "b"]
    assert verified.verify("u", "c", hashes["c"]) and verified.verify("u", "a", hashes["a"])
    assert runs == ["x", "x", "a", "b", "c", "a"]


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
