"""Device crypto, shared by the controller and the agent: X25519 keys and sealed boxes.

Used for enrollment grants and for secrets (:func:`seal_text`, :func:`open_text`): the
device's key pair is made once and kept in its data directory (``enroll.key``).

A new device generates an X25519 key pair and sends the public key in its
:class:`~.models.EnrollmentRequest`. The controller answers with an
:class:`~.models.EnrollmentGrant` in a libsodium *sealed box* (PyNaCl ``SealedBox``:
an ephemeral X25519 key, XSalsa20-Poly1305) to that key, so only that device can read its
credentials; the broker, other clients and the controller's database at rest see only
ciphertext. A sealed box does not say who sealed it: the topic ACL (only the controller
may publish on ``enroll/{id}/response``) is what vouches for the sender. Any change to
the ciphertext fails authentication: :func:`open_grant` raises :class:`PayloadError`.
"""

from __future__ import annotations

import base64
import binascii

from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from pydantic import ValidationError

from .codec import describe
from .errors import PayloadError
from .models import EnrollmentGrant

__all__ = [
    "KEY_BYTES",
    "decode_public_key",
    "new_private_key",
    "open_bytes",
    "open_grant",
    "open_text",
    "public_key_b64",
    "seal_bytes",
    "seal_grant",
    "seal_text",
]

KEY_BYTES = 32


def new_private_key() -> PrivateKey:
    return PrivateKey.generate()


def public_key_b64(private_key: PrivateKey) -> str:
    return base64.b64encode(bytes(private_key.public_key)).decode()


def decode_public_key(text: str) -> bytes:
    """The raw 32-byte X25519 key in ``text`` (base64); :class:`PayloadError` otherwise."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError("public_key: not base64") from exc
    if len(raw) != KEY_BYTES:
        raise PayloadError(f"public_key: {len(raw)} bytes, expected {KEY_BYTES} (X25519)")
    return raw


def seal_bytes(public_key: str, plaintext: bytes) -> str:
    """``plaintext`` sealed to ``public_key`` (base64 X25519), as base64 text."""
    box = SealedBox(PublicKey(decode_public_key(public_key)))
    return base64.b64encode(box.encrypt(plaintext)).decode()


def open_bytes(private_key: PrivateKey, sealed: str, what: str) -> bytes:
    """Open a sealed box; :class:`PayloadError` naming ``what`` if it is tampered with,
    sealed for another key, or not base64."""
    try:
        ciphertext = base64.b64decode(sealed, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PayloadError(f"{what}: sealed part is not base64") from exc
    try:
        return SealedBox(private_key).decrypt(ciphertext)
    except CryptoError as exc:
        raise PayloadError(
            f"{what}: cannot be opened with this key (tampered with, or sealed for another key)"
        ) from exc


def seal_text(public_key: str, text: str) -> str:
    return seal_bytes(public_key, text.encode())


def open_text(private_key: PrivateKey, sealed: str, what: str) -> str:
    try:
        return open_bytes(private_key, sealed, what).decode()
    except UnicodeDecodeError as exc:
        raise PayloadError(f"{what}: not UTF-8 text") from exc


def seal_grant(public_key: str, grant: EnrollmentGrant) -> str:
    """``grant`` sealed to ``public_key`` (base64 X25519), as base64 text."""
    return seal_bytes(public_key, grant.model_dump_json().encode())


def open_grant(private_key: PrivateKey, sealed: str) -> EnrollmentGrant:
    """Open a sealed grant; :class:`PayloadError` if it is tampered with, not for us, or malformed."""
    plaintext = open_bytes(private_key, sealed, "enrollment response")
    try:
        return EnrollmentGrant.model_validate_json(plaintext)
    except ValidationError as exc:
        raise PayloadError(f"enrollment response: {describe(exc)}") from exc
