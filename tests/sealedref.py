"""An independent reading of docs/sealed-format.md, for tests.

It writes and reads ``model.sealed`` from the spec alone, with cryptography's one-shot AESGCM
and nothing from ``loader``, so that a misunderstanding of the format cannot hide behind code
shared by the writer and the reader under test. It also crafts packages the real writer never
would (hostile manifests with a valid header tag).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"CFSEALv1"
INFO = b"confinfer sealed v1 chunk key"
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def kek(n: int = 0) -> rsa.RSAPrivateKey:
    """Test KEKs, made once per process (``n`` picks a distinct key)."""
    return _kek(n)


@cache
def _kek(n: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def write_pem(directory: Path, n: int = 0) -> tuple[Path, Path]:
    """(private PEM, public PEM) of ``kek(n)`` in ``directory``."""
    key = kek(n)
    private = directory / f"kek{n}.pem"
    public = directory / f"kek{n}.pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def fingerprint(n: int = 0) -> str:
    der = (
        kek(n)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def chunk_key(dek: bytes, salt: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=INFO).derive(dek)


def nonce(index: int, final: bool) -> bytes:
    return index.to_bytes(8, "big") + (b"\x01" if final else b"\x00") + b"\x00\x00\x00"


@dataclass
class Spec:
    """Everything a package is made of; ``header()`` is the JSON object."""

    files: dict[str, bytes]
    directories: list[str] = field(default_factory=list)
    chunk_size: int = 64
    dek: bytes = field(default_factory=lambda: os.urandom(32))
    salt: bytes = field(default_factory=lambda: os.urandom(32))
    kek_n: int = 0
    key_id: str | None = None
    modes: dict[str, int] = field(default_factory=dict)
    created: str = "2026-01-01T00:00:00Z"

    def pieces(self) -> list[bytes]:
        out = []
        for data in self.files.values():
            out += [data[i : i + self.chunk_size] for i in range(0, len(data), self.chunk_size)]
        return out or [b""]

    def header(self) -> dict[str, Any]:
        wrapped = kek(self.kek_n).public_key().encrypt(self.dek, OAEP)
        return {
            "version": 1,
            "cipher": "AES-256-GCM",
            "kdf": "HKDF-SHA256",
            "wrap": "RSA-OAEP-256",
            "chunk_size": self.chunk_size,
            "salt": base64.b64encode(self.salt).decode(),
            "key_id": self.key_id or fingerprint(self.kek_n),
            "wrapped_dek": base64.b64encode(wrapped).decode(),
            "created": self.created,
            "chunk_count": len(self.pieces()),
            "manifest": {
                "directories": [
                    {"path": d, "mode": self.modes.get(d, 0o755)} for d in self.directories
                ],
                "files": [
                    {"path": p, "size": len(b), "mode": self.modes.get(p, 0o644)}
                    for p, b in self.files.items()
                ],
            },
        }


def build(spec: Spec, header: dict[str, Any] | None = None) -> bytes:
    """The package bytes for ``spec`` (or for a hand-made ``header`` with spec's key/data)."""
    obj = spec.header() if header is None else header
    hb = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    prefix = MAGIC + len(hb).to_bytes(4, "big") + hb
    gcm = AESGCM(chunk_key(spec.dek, spec.salt))
    out = [prefix, gcm.encrypt(b"\xff" * 12, b"", prefix)]
    aad = hashlib.sha256(prefix).digest()
    pieces = spec.pieces()
    for i, piece in enumerate(pieces):
        out.append(gcm.encrypt(nonce(i, i == len(pieces) - 1), piece, aad))
    return b"".join(out)


def read(data: bytes, private_key: rsa.RSAPrivateKey) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Decrypt a whole package held in memory: (header object, {path: bytes})."""
    assert data[:8] == MAGIC
    hlen = int.from_bytes(data[8:12], "big")
    prefix, tag = data[: 12 + hlen], data[12 + hlen : 28 + hlen]
    header = json.loads(prefix[12:])
    dek = private_key.decrypt(base64.b64decode(header["wrapped_dek"]), OAEP)
    gcm = AESGCM(chunk_key(dek, base64.b64decode(header["salt"])))
    gcm.decrypt(b"\xff" * 12, tag, prefix)
    aad = hashlib.sha256(prefix).digest()
    pos, index, count = 28 + hlen, 0, header["chunk_count"]
    files: dict[str, bytes] = {}
    cs = header["chunk_size"]
    for entry in header["manifest"]["files"]:
        parts = []
        for start in range(0, entry["size"], cs):
            n = min(cs, entry["size"] - start)
            parts.append(
                gcm.decrypt(nonce(index, index == count - 1), data[pos : pos + n + 16], aad)
            )
            pos, index = pos + n + 16, index + 1
        files[entry["path"]] = b"".join(parts)
    if index == 0:
        gcm.decrypt(nonce(0, True), data[pos : pos + 16], aad)
        pos, index = pos + 16, 1
    assert index == count and pos == len(data)
    return header, files


def install(data: bytes, pkg_dir: Path) -> Path:
    pkg_dir.mkdir(parents=True, exist_ok=True)
    path = pkg_dir / "model.sealed"
    path.write_bytes(data)
    return pkg_dir


def tree(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """{relative path: (kind, mode, content)} of a directory, for comparisons."""
    out: dict[str, tuple[str, int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        info = path.lstat()
        if path.is_symlink():
            out[rel] = ("link", 0, b"")
        elif path.is_dir():
            out[rel] = ("dir", info.st_mode & 0o7777, b"")
        else:
            out[rel] = ("file", info.st_mode & 0o7777, path.read_bytes())
    return out


def is_empty_or_absent(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))
