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

PyNaCl is imported only where a box is made or opened: it costs an agent about 1.2 MB of
resident memory, and a device without secrets never opens one after it has enrolled.
:class:`DeviceKey` holds the device's key pair as bytes for that reason (the public key is
kept beside the private one in ``enroll.key``, so announcing it needs no PyNaCl either).
"""

from __future__ import annotations

import base64
import binascii
from typing import TYPE_CHECKING

from pydantic import ValidationError

from .codec import describe
from .errors import PayloadError
from .models import EnrollmentGrant

if TYPE_CHECKING:
    from nacl.public import PrivateKey

__all__ = [
    "KEY_BYTES",
    "DeviceKey",
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
    from nacl.public import PrivateKey

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
    from nacl.public import PublicKey, SealedBox

    box = SealedBox(PublicKey(decode_public_key(public_key)))
    return base64.b64encode(box.encrypt(plaintext)).decode()


def open_bytes(private_key: PrivateKey, sealed: str, what: str) -> bytes:
    """Open a sealed box; :class:`PayloadError` naming ``what`` if it is tampered with,
    sealed for another key, or not base64."""
    from nacl.exceptions import CryptoError
    from nacl.public import SealedBox

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


class DeviceKey:
    """A device's X25519 key pair as bytes; PyNaCl is loaded on the first box opened.

    ``public`` is the public key in base64, as announced in the device's facts and its
    enrollment request. :meth:`save_text` / :meth:`from_text` are the ``enroll.key`` format:
    the private key in base64, then the public key (derived again if the line is missing,
    as in files written before it was kept).
    """

    def __init__(self, private: bytes, public: str) -> None:
        self.private = private
        self.public = public
        self._nacl: PrivateKey | None = None

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls.of(new_private_key())

    @classmethod
    def of(cls, key: PrivateKey) -> DeviceKey:
        device_key = cls(bytes(key), public_key_b64(key))
        device_key._nacl = key
        return device_key

    @classmethod
    def from_text(cls, text: str) -> DeviceKey:
        """Parse ``enroll.key``; ValueError (binascii.Error) if it is not one or two base64 keys."""
        lines = text.split()
        if not 1 <= len(lines) <= 2:
            raise ValueError(f"expected 1 or 2 lines, found {len(lines)}")
        private = base64.b64decode(lines[0], validate=True)
        if len(private) != KEY_BYTES:
            raise ValueError(f"private key of {len(private)} bytes, expected {KEY_BYTES}")
        if len(lines) == 1:
            from nacl.public import PrivateKey

            return cls.of(PrivateKey(private))
        try:
            decode_public_key(lines[1])
        except PayloadError as exc:
            raise ValueError(str(exc)) from None
        return cls(private, lines[1])

    def save_text(self) -> str:
        return f"{base64.b64encode(self.private).decode()}\n{self.public}\n"

    def nacl(self) -> PrivateKey:
        if self._nacl is None:
            from nacl.public import PrivateKey

            self._nacl = PrivateKey(self.private)
        return self._nacl

    def open_text(self, sealed: str, what: str) -> str:
        return open_text(self.nacl(), sealed, what)

    def open_grant(self, sealed: str) -> EnrollmentGrant:
        return open_grant(self.nacl(), sealed)
