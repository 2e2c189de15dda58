"""AES-256-GCM for the model formats: the one module that touches the AEAD primitives.

Everything that encrypts or decrypts model bytes goes through here, so that nonces, key
derivation and tag checks are written once and reviewed once (docs/sealed-format.md §4).

Sealed format (``model.sealed``):

- :func:`derive_chunk_key` turns the DEK and the package salt into the package's chunk key
  ``K = HKDF-SHA256(DEK, salt, info="confinfer sealed v1 chunk key")``.
- :func:`header_tag` / :func:`verify_header_tag`: an empty-plaintext GCM tag over the header
  prefix, under ``K`` with the reserved all-0xFF nonce.
- :class:`ChunkCipher` seals and opens one chunk into a caller's preallocated buffer, with the
  nonce ``u64 BE index | u8 final | 3 zero bytes`` and the header digest as associated data.

Tutorial layout (``model_archive.tar.enc``): :class:`GcmStreamDecryptor` decrypts one long GCM
stream in pieces and checks the tag at the end.

Buffers: ``update_into`` may hold back up to one AES block, so an output buffer must be at
least ``len(data) + 15`` bytes (:data:`OUT_SLACK`). cryptography releases the GIL while it
encrypts, so several threads can each run a :class:`ChunkCipher` in parallel.

Failures raise :class:`~confinfer.errors.IntegrityError` with an opaque message: which chunk
failed, or at which offset, is never reported.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confinfer.errors import IntegrityError, Reason

# What the primitives accept as input (collections.abc.Buffer is Python 3.12+).
Buffer = bytes | bytearray | memoryview

KEY_LEN = 32
NONCE_LEN = 12
TAG_LEN = 16
# update_into may buffer up to one block less one byte beyond what it has written so far.
OUT_SLACK = 15
CHUNK_KEY_INFO = b"confinfer sealed v1 chunk key"
# Reserved for the header tag; a chunk nonce's 9th byte is 0 or 1, so it can never be this.
HEADER_NONCE = b"\xff" * NONCE_LEN
MAX_CHUNK_INDEX = (1 << 64) - 1

_NONCE = struct.Struct(">QB3x")


def derive_chunk_key(dek: Buffer, salt: bytes) -> bytearray:
    """The package's chunk key: HKDF-SHA256 of the DEK with the package salt.

    Returned as a bytearray so the caller can zero it when done (best effort: the KDF's own
    intermediate copies are out of reach).
    """
    raw = bytes(dek)
    if len(raw) != KEY_LEN:
        raise ValueError("the DEK must be 32 bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=salt, info=CHUNK_KEY_INFO)
    return bytearray(hkdf.derive(raw))


def chunk_nonce(index: int, final: bool) -> bytes:
    """``u64 BE index | u8 final (0 or 1) | 00 00 00``."""
    if not 0 <= index <= MAX_CHUNK_INDEX:
        raise ValueError("chunk index out of range")
    return _NONCE.pack(index, 1 if final else 0)


def _check_key(key: Buffer) -> bytes:
    raw = bytes(key)
    if len(raw) != KEY_LEN:
        raise ValueError("AES-256 needs a 32-byte key")
    return raw


def header_tag(key: Buffer, authenticated: Buffer) -> bytes:
    """GCM tag of an empty plaintext with ``authenticated`` (magic|len|header) as AAD."""
    enc = Cipher(algorithms.AES(_check_key(key)), modes.GCM(HEADER_NONCE)).encryptor()
    enc.authenticate_additional_data(bytes(authenticated))
    enc.finalize()
    return enc.tag


def verify_header_tag(key: Buffer, authenticated: Buffer, tag: bytes) -> None:
    """Raise IntegrityError (``header-integrity``) unless ``tag`` authenticates the header."""
    dec = Cipher(algorithms.AES(_check_key(key)), modes.GCM(HEADER_NONCE, tag)).decryptor()
    dec.authenticate_additional_data(bytes(authenticated))
    try:
        dec.finalize()
    except InvalidTag:
        raise IntegrityError(
            "the package header failed authentication (tampered, or sealed under another key)",
            reason=Reason.HEADER_INTEGRITY,
        ) from None


class ChunkCipher:
    """Seal or open chunks of one package. One instance per thread is not required: the
    object only holds the key and the associated data, every call builds its own context."""

    def __init__(self, key: Buffer, aad: bytes) -> None:
        self._algorithm = algorithms.AES(_check_key(key))
        self._aad = aad

    def seal_into(self, index: int, final: bool, plaintext: Buffer, out: memoryview) -> bytes:
        """Encrypt ``plaintext`` into ``out[:len(plaintext)]``; return the 16-byte tag."""
        enc = Cipher(self._algorithm, modes.GCM(chunk_nonce(index, final))).encryptor()
        enc.authenticate_additional_data(self._aad)
        done = enc.update_into(plaintext, out) if len(memoryview(plaintext)) else 0
        tail = enc.finalize()
        if tail or done != len(memoryview(plaintext)):  # pragma: no cover - GCM is a stream
            raise RuntimeError("GCM produced an unexpected amount of output")
        return enc.tag

    def open_into(
        self, index: int, final: bool, ciphertext: Buffer, tag: Buffer, out: memoryview
    ) -> int:
        """Decrypt and authenticate one chunk into ``out``; return the plaintext length.

        ``out`` holds plaintext only once this returns: on a bad tag it raises
        IntegrityError (``chunk-integrity``) and the caller must discard ``out``.
        """
        dec = Cipher(self._algorithm, modes.GCM(chunk_nonce(index, final), bytes(tag))).decryptor()
        dec.authenticate_additional_data(self._aad)
        done = dec.update_into(ciphertext, out) if len(memoryview(ciphertext)) else 0
        try:
            dec.finalize()
        except InvalidTag:
            raise IntegrityError(
                "a chunk of the package failed authentication (tampered, reordered, or from "
                "another package)",
                reason=Reason.CHUNK_INTEGRITY,
            ) from None
        return done


class GcmStreamDecryptor:
    """Decrypt one AES-256-GCM stream piece by piece; the tag is checked by :meth:`finalize`.

    Plaintext handed out by :meth:`update_into` is NOT authenticated until :meth:`finalize`
    returns: the caller must be able to discard everything it produced if finalize raises.
    No associated data (the tutorial layout has none).
    """

    def __init__(self, key: Buffer, nonce: bytes) -> None:
        if len(nonce) != NONCE_LEN:
            raise ValueError("the GCM nonce must be 12 bytes")
        self._key = algorithms.AES(_check_key(key))
        self._nonce = nonce
        self._ctx = Cipher(self._key, modes.GCM(nonce)).decryptor()

    def update_into(self, data: Buffer, out: memoryview | bytearray) -> int:
        """Decrypt ``data`` into ``out`` (at least ``len(data) + 15`` bytes); return the count."""
        if not len(memoryview(data)):
            return 0
        return self._ctx.update_into(data, out)

    def finalize(self, tag: bytes) -> None:
        """Check the stream's tag; raise IntegrityError (``integrity``) when it does not match."""
        if len(tag) != TAG_LEN:
            raise IntegrityError("the archive's authentication tag is truncated")
        try:
            self._ctx.finalize_with_tag(tag)
        except InvalidTag:
            raise IntegrityError(
                "the archive failed authentication (tampered, truncated, or a wrong key)"
            ) from None
