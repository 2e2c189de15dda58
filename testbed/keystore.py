"""The Key Vault stand-in's keys: RSA keys with versions, attributes and release policies.

Keys are real RSA keys generated in-process. Each create makes a new version (32 random hex
digits, as Key Vault's are); the newest version is what an unversioned request means. With a
directory the store persists to ``<dir>/keys.json`` (mode 0600: it holds private keys, as an HSM
would) and reloads it on start, so a restarted vault keeps its keys.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from testbed.jwks import b64url, b64url_decode

FILE_NAME = "keys.json"
KEY_TYPES = ("RSA", "RSA-HSM")
KEY_SIZES = (2048, 3072, 4096)
KEY_OPS = ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey", "import", "export")
DEFAULT_KEY_OPS = ("encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey")
NAME_RE = re.compile(r"^[0-9A-Za-z-]{1,127}$")
DEFAULT_POLICY_CONTENT_TYPE = "application/json; charset=utf-8"
RECOVERY_LEVEL = "Recoverable+Purgeable"
RECOVERABLE_DAYS = 90


@dataclass(frozen=True)
class StoredPolicy:
    """A release policy as the vault keeps it: the client's bytes, verbatim."""

    data: bytes
    content_type: str = DEFAULT_POLICY_CONTENT_TYPE
    immutable: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"contentType": self.content_type, "data": b64url(self.data),
                "immutable": self.immutable}


@dataclass(frozen=True)
class KeyVersion:
    name: str
    version: str
    kty: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    key_ops: tuple[str, ...]
    enabled: bool = True
    exportable: bool = False
    created: int = 0
    updated: int = 0
    not_before: int | None = None
    expires: int | None = None
    tags: tuple[tuple[str, str], ...] = ()
    release_policy: StoredPolicy | None = None

    def kid(self, vault_url: str) -> str:
        return f"{vault_url}/keys/{self.name}/{self.version}"

    def public_jwk(self, vault_url: str) -> dict[str, Any]:
        numbers = self.private_key.public_key().public_numbers()
        n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
        e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
        return {"kid": self.kid(vault_url), "kty": self.kty, "key_ops": list(self.key_ops),
                "n": b64url(n), "e": b64url(e)}

    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "enabled": self.enabled, "created": self.created, "updated": self.updated,
            "recoveryLevel": RECOVERY_LEVEL, "recoverableDays": RECOVERABLE_DAYS,
            "exportable": self.exportable,
        }
        if self.not_before is not None:
            attrs["nbf"] = self.not_before
        if self.expires is not None:
            attrs["exp"] = self.expires
        return attrs

    def bundle(self, vault_url: str) -> dict[str, Any]:
        """The KeyBundle Key Vault returns for this version."""
        out: dict[str, Any] = {"key": self.public_jwk(vault_url), "attributes": self.attributes()}
        if self.tags:
            out["tags"] = dict(self.tags)
        if self.release_policy is not None:
            out["release_policy"] = self.release_policy.to_wire()
        return out

    def pkcs8_der(self) -> bytes:
        return self.private_key.private_bytes(serialization.Encoding.DER,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())

    def to_json(self) -> dict[str, Any]:
        pem = self.private_key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption())
        return {
            "name": self.name, "version": self.version, "kty": self.kty,
            "private_key": pem.decode("ascii"), "key_ops": list(self.key_ops),
            "enabled": self.enabled, "exportable": self.exportable, "created": self.created,
            "updated": self.updated, "not_before": self.not_before, "expires": self.expires,
            "tags": dict(self.tags),
            "release_policy": None if self.release_policy is None else {
                "data": b64url(self.release_policy.data),
                "content_type": self.release_policy.content_type,
                "immutable": self.release_policy.immutable,
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyVersion:
        key = serialization.load_pem_private_key(data["private_key"].encode("ascii"), None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"key {data['name']}/{data['version']}: not an RSA key")
        rp = data.get("release_policy")
        policy = None if rp is None else StoredPolicy(
            b64url_decode(rp["data"]), rp["content_type"], bool(rp["immutable"]))
        return cls(
            name=data["name"], version=data["version"], kty=data["kty"], private_key=key,
            key_ops=tuple(data["key_ops"]), enabled=bool(data["enabled"]),
            exportable=bool(data["exportable"]), created=int(data["created"]),
            updated=int(data["updated"]), not_before=data.get("not_before"),
            expires=data.get("expires"), tags=tuple(sorted(data.get("tags", {}).items())),
            release_policy=policy,
        )


def generate(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


class KeyStore:
    """Every key version, in creation order per name; persisted when given a directory."""

    def __init__(self, directory: Path | None = None) -> None:
        self.path = None if directory is None else directory / FILE_NAME
        self._keys: dict[str, list[KeyVersion]] = {}
        if self.path is not None and self.path.exists():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            for item in data.get("keys", []):
                kv = KeyVersion.from_json(item)
                self._keys.setdefault(kv.name.lower(), []).append(kv)

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"keys": [v.to_json() for versions in self._keys.values()
                                for v in versions]}, fh)
        os.replace(tmp, self.path)

    def add(self, name: str, kty: str, private_key: rsa.RSAPrivateKey, *,
            key_ops: tuple[str, ...] = DEFAULT_KEY_OPS, enabled: bool = True,
            exportable: bool = False, not_before: int | None = None,
            expires: int | None = None, tags: dict[str, str] | None = None,
            release_policy: StoredPolicy | None = None) -> KeyVersion:
        """Store ``private_key`` as a new (the newest) version of ``name``."""
        now = int(time.time())
        kv = KeyVersion(
            name=name, version=secrets.token_hex(16), kty=kty, private_key=private_key,
            key_ops=key_ops, enabled=enabled, exportable=exportable, created=now, updated=now,
            not_before=not_before, expires=expires, tags=tuple(sorted((tags or {}).items())),
            release_policy=release_policy,
        )
        self._keys.setdefault(name.lower(), []).append(kv)
        self._save()
        return kv

    def update(self, kv: KeyVersion, **changes: Any) -> KeyVersion:
        """Replace attributes of one stored version (tests use it to disable a key)."""
        versions = self._keys[kv.name.lower()]
        index = next(i for i, v in enumerate(versions) if v.version == kv.version)
        new = replace(versions[index], updated=int(time.time()), **changes)
        versions[index] = new
        self._save()
        return new

    def get(self, name: str, version: str | None = None) -> KeyVersion | None:
        """One version of ``name``; the newest when ``version`` is empty or None.

        Names and versions compare case-insensitively, as Key Vault's do.
        """
        versions = self._keys.get(name.lower())
        if not versions:
            return None
        if not version:
            return versions[-1]
        return next((v for v in versions if v.version == version.lower()), None)

    def names(self) -> list[str]:
        return sorted(versions[0].name for versions in self._keys.values())
