"""Secure Key Release: from an attested vTPM to the model's key-encryption key (KEK).

The flow::

    vTPM evidence --MAA--> token naming the PCR-bound ephemeral key (TpmEphemeralEncryptionKey)
    token --Key Vault release--> signed JWS whose key_hsm blob is
        RSA-OAEP(ephemeral key, K_aes) || AES-KWP(K_aes, PKCS#8 DER of the KEK)
    vTPM RSA_Decrypt (OAEP, hash by algorithm) -> K_aes -> RFC 5649 unwrap -> KEK private key

The RSA part can only be decrypted inside this vTPM and only while PCRs 0-7 hold the values
that were attested. Every intermediate secret (``K_aes``, the PKCS#8 DER) lives in a bytearray
that is zeroed as soon as it has been used; none is ever logged. Step timings (names and
durations only) are recorded for benchmarks and debug logs.
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import json
import logging
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from confinfer.closable import Closable
from confinfer.config import Config
from confinfer.errors import (
    AttestationError,
    ConfinferError,
    KeyReleaseError,
    KeyUnwrapError,
    PolicyError,
    Reason,
    UsageError,
)
from confinfer.keyvault import KeyId, ReleasedKey, release_key, release_policy
from confinfer.token import decode_b64url

if TYPE_CHECKING:
    import requests

    from confinfer.maa import AttestationResult
    from confinfer.tpm import Vtpm

LOG = logging.getLogger(__name__)

# OAEP hash (and MGF1 hash) the RSA part of the transfer blob is encrypted with, by algorithm.
OAEP_HASHES: Mapping[str, str] = {
    "CKM_RSA_AES_KEY_WRAP": "sha1",
    "RSA_AES_KEY_WRAP_256": "sha256",
    "RSA_AES_KEY_WRAP_384": "sha384",
}

# Modulus size of the vTPM's RSA-2048 transfer key, when the token does not tell.
DEFAULT_TRANSFER_KEY_BYTES = 256
# RFC 5649 §3: the alternative initial value's constant half.
_KWP_AIV = bytes.fromhex("A65959A6")

# Step names, in flow order (bench/skr.py prints them in this order).
STEPS = (
    "tpm",  # ephemeral key, certify, quote, NV and PCR reads
    "imds-thim",  # the VCEK chain from IMDS
    "maa",  # MAA guest attestation round trip and token decryption/verification
    "imds-token",  # managed-identity access token for Key Vault
    "keyvault-release",  # the release call and JWS verification
    "tpm-decrypt",  # RSA-OAEP of the transfer blob in the vTPM
    "unwrap",  # AES-KWP unwrap and PKCS#8 parse of the KEK
)


class OaepDecryptor(Protocol):
    """Decrypts with the vTPM's ephemeral transfer key (confinfer.tpm.Vtpm is one)."""

    def decrypt_oaep(self, ciphertext: bytes, hash_name: str) -> bytearray: ...


@dataclass
class Timings:
    """Durations of the flow's steps, in seconds, in the order they ran."""

    steps: list[tuple[str, float]] = field(default_factory=list)

    def record(self, name: str, seconds: float) -> None:
        self.steps.append((name, seconds))

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, time.perf_counter() - start)

    def totals(self) -> dict[str, float]:
        """Seconds per step name (repeated steps summed), in first-seen order."""
        out: dict[str, float] = {}
        for name, seconds in self.steps:
            out[name] = out.get(name, 0.0) + seconds
        return out

    def log(self) -> None:
        if LOG.isEnabledFor(logging.DEBUG):
            LOG.debug(
                "skr timings: %s",
                " ".join(f"{k}={v * 1000:.1f}ms" for k, v in self.totals().items()),
            )


class KekPrivateKey(Closable):
    """The released KEK. It only unwraps DEKs; :meth:`close` drops it.

    The private key lives in OpenSSL memory, which OpenSSL clears when the key is freed
    (``RSA_free`` clears the private components); :meth:`close` drops our only reference.
    """

    def __init__(self, key: rsa.RSAPrivateKey, kid: str) -> None:
        self._key: rsa.RSAPrivateKey | None = key
        self.kid = kid

    @property
    def key_size(self) -> int:
        return self._require().key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._require().public_key()

    def _require(self) -> rsa.RSAPrivateKey:
        if self._key is None:
            raise KeyUnwrapError("the released KEK has already been dropped", reason=Reason.KEK_CLOSED)
        return self._key

    def unwrap_dek(self, wrapped: bytes) -> bytearray:
        """RSA-OAEP-256 (MGF1-SHA-256, no label) unwrap of a DEK; KeyUnwrapError if it fails.

        The library hands the plaintext back as immutable ``bytes``; it is copied into the
        bytearray returned (which the caller zeroes) and the immutable copy dropped at once.
        """
        key = self._require()
        try:
            dek = key.decrypt(
                bytes(wrapped),
                padding.OAEP(
                    mgf=padding.MGF1(algorithm=hashes.SHA256()),
                    algorithm=hashes.SHA256(),
                    label=None,
                ),
            )
        except ValueError:
            raise KeyUnwrapError(
                f"the wrapped DEK does not unwrap with the released KEK {self.kid}",
                reason=Reason.KEY_UNWRAP,
                hint="the package was sealed for another key (check its key id) or is damaged",
            ) from None
        return bytearray(dek)

    def close(self) -> None:
        self._key = None


def unwrap_dek(kek: KekPrivateKey, wrapped_dek: bytes) -> bytearray:
    """Unwrap a model DEK with the released KEK (RSA-OAEP-256). The caller zeroes the result."""
    return kek.unwrap_dek(wrapped_dek)


def zero(buf: bytearray) -> None:
    """Overwrite a secret in place."""
    buf[:] = bytes(len(buf))


# --- the transfer blob ------------------------------------------------------------------------


def _blob_invalid(message: str) -> KeyReleaseError:
    return KeyReleaseError(
        f"the released key's transfer blob is invalid: {message}", reason=Reason.TRANSFER_BLOB_INVALID
    )


@dataclass(frozen=True)
class TransferBlob:
    """The decoded ``key_hsm``: the algorithm named in its header (if any) and the ciphertext."""

    enc: str | None
    ciphertext: bytes


def parse_transfer_blob(key_hsm: str) -> TransferBlob:
    """Decode ``key_hsm``: base64url JSON ``{"header": {...,"enc"}, "ciphertext": b64url}``."""
    try:
        blob = json.loads(decode_b64url(key_hsm))
    except (ValueError, UnicodeDecodeError):
        raise _blob_invalid("key_hsm is not base64url-encoded JSON") from None
    if not isinstance(blob, dict) or not isinstance(blob.get("ciphertext"), str):
        raise _blob_invalid("key_hsm has no ciphertext")
    try:
        ciphertext = decode_b64url(blob["ciphertext"])
    except ValueError:
        raise _blob_invalid("the ciphertext is not base64url") from None
    header = blob.get("header")
    enc = header.get("enc") if isinstance(header, dict) else None
    return TransferBlob(enc=enc if isinstance(enc, str) else None, ciphertext=ciphertext)


def aes_kwp_unwrap(key: bytearray | bytes, wrapped: bytes) -> bytearray:
    """RFC 5649 AES Key Wrap with Padding, unwrap, into a bytearray the caller zeroes.

    Same result as ``cryptography``'s ``aes_key_unwrap_with_padding`` (the tests hold it to
    that), but every intermediate semiblock stays in buffers we own and zero, where the
    library's returns immutable ``bytes`` that cannot be wiped. Raises KeyReleaseError
    (``transfer-blob-invalid``) on any integrity failure, without saying which check failed.
    """
    n = len(wrapped) // 8 - 1
    if len(wrapped) % 8 or n < 1 or len(key) not in (16, 24, 32):
        raise _blob_invalid("the wrapped key material has an impossible length")
    # ECB is the single-block AES primitive RFC 3394/5649 key wrap is defined over.
    decryptor = Cipher(algorithms.AES(key), modes.ECB()).decryptor()  # noqa: S305
    buf = bytearray(wrapped)  # A || R[1] || ... || R[n], unwrapped in place
    block = bytearray(16)
    out = bytearray(32)  # update_into wants room for one more block than it writes
    view, bview, oview = memoryview(buf), memoryview(block), memoryview(out)
    try:
        if n == 1:
            decryptor.update_into(buf, out)
            view[:] = oview[:16]
        else:
            for j in range(5, -1, -1):
                for i in range(n, 0, -1):
                    t = n * j + i
                    a = int.from_bytes(view[0:8], "big") ^ t
                    bview[0:8] = a.to_bytes(8, "big")
                    bview[8:16] = view[8 * i : 8 * i + 8]
                    decryptor.update_into(block, out)
                    view[0:8] = oview[0:8]
                    view[8 * i : 8 * i + 8] = oview[8:16]
        mli = int.from_bytes(view[4:8], "big")
        ok = hmac.compare_digest(bytes(view[0:4]), _KWP_AIV)
        ok &= 8 * (n - 1) < mli <= 8 * n
        if ok:
            ok &= not any(view[8 + mli :])
        if not ok:
            raise _blob_invalid("the AES key-wrap integrity check failed")
        return buf[8 : 8 + mli]
    finally:
        decryptor.finalize()
        view.release()
        bview.release()
        oview.release()
        zero(buf)
        zero(block)
        zero(out)


def _released_public_n(released: ReleasedKey) -> int | None:
    n = released.key.get("n")
    if not isinstance(n, str):
        return None
    try:
        return int.from_bytes(decode_b64url(n), "big")
    except ValueError:
        return None


def unwrap_transfer_blob(
    released: ReleasedKey,
    algorithm: str,
    decryptor: OaepDecryptor,
    *,
    transfer_key_bytes: int = DEFAULT_TRANSFER_KEY_BYTES,
    timings: Timings | None = None,
) -> KekPrivateKey:
    """Turn a verified release into the KEK: TPM OAEP decrypt, AES-KWP unwrap, PKCS#8 parse."""
    timings = timings if timings is not None else Timings()
    kty = released.key.get("kty")
    if kty not in ("RSA", "RSA-HSM"):
        raise KeyReleaseError(
            f"the released key {released.kid} is {kty!r}, not an RSA key that can unwrap DEKs",
            reason=Reason.KEK_NOT_RSA,
        )
    blob = parse_transfer_blob(released.key_hsm)
    # The blob's own header (covered by Key Vault's signature) wins over what we asked for.
    enc = blob.enc if blob.enc is not None and blob.enc in OAEP_HASHES else algorithm
    if enc not in OAEP_HASHES:
        raise _blob_invalid(f"unknown wrapping algorithm {enc!r}")
    if len(blob.ciphertext) <= transfer_key_bytes + 8:
        raise _blob_invalid("the ciphertext is too short")
    rsa_part = blob.ciphertext[:transfer_key_bytes]
    wrapped = blob.ciphertext[transfer_key_bytes:]

    with timings.step("tpm-decrypt"):
        aes_key = decryptor.decrypt_oaep(rsa_part, OAEP_HASHES[enc])
    der = bytearray()
    try:
        with timings.step("unwrap"):
            der = aes_kwp_unwrap(aes_key, wrapped)
            try:
                key = serialization.load_der_private_key(der, password=None)
            except (ValueError, TypeError):
                raise _blob_invalid("the unwrapped key is not a PKCS#8 private key") from None
    finally:
        zero(aes_key)
        zero(der)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyReleaseError(
            f"the released key {released.kid} is not an RSA key that can unwrap DEKs",
            reason=Reason.KEK_NOT_RSA,
        )
    expected_n = _released_public_n(released)
    if expected_n is not None and key.public_key().public_numbers().n != expected_n:
        raise KeyReleaseError(
            f"the private key in the transfer blob is not the released key {released.kid}",
            reason=Reason.RELEASE_KEY_MISMATCH,
        )
    return KekPrivateKey(key, released.kid)


# --- the whole flow ---------------------------------------------------------------------------


def transfer_key_bytes(claims: Mapping[str, Any]) -> int:
    """Modulus size of the key Key Vault wraps to: the token's first RSA encryption key."""
    runtime = claims.get("x-ms-runtime")
    keys = runtime.get("keys") if isinstance(runtime, dict) else None
    if isinstance(keys, list):
        for jwk in keys:
            if not isinstance(jwk, dict) or jwk.get("kty") != "RSA":
                continue
            ops = jwk.get("key_ops")
            if (isinstance(ops, list) and "encrypt" in ops) or jwk.get("use") == "enc" or (
                jwk.get("key_use") == "enc"
            ):
                try:
                    return len(decode_b64url(str(jwk.get("n", "")))) or DEFAULT_TRANSFER_KEY_BYTES
                except ValueError:
                    break
    return DEFAULT_TRANSFER_KEY_BYTES


def check_token_fresh(claims: Mapping[str, Any], now: dt.datetime | None = None) -> None:
    """Refuse a token that has expired before it is spent on a release."""
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise AttestationError("the MAA token has no exp claim", reason=Reason.TOKEN_MALFORMED)
    moment = (now or dt.datetime.now(dt.UTC)).timestamp()
    if exp <= moment:
        expired = dt.datetime.fromtimestamp(exp, dt.UTC).isoformat(timespec="seconds")
        raise AttestationError(
            f"the MAA token expired at {expired}; Key Vault would refuse it",
            reason=Reason.TOKEN_EXPIRED,
            hint="attest again (is the VM's clock right?)",
        )


def new_nonce() -> str:
    """A fresh release nonce; Key Vault echoes it in the signed answer."""
    return base64.urlsafe_b64encode(secrets.token_bytes(18)).decode("ascii")


class _TimedVtpm:
    """Delegates to a Vtpm and adds the time spent in each of its calls to one step."""

    def __init__(self, inner: Vtpm, timings: Timings, step: str) -> None:
        self._inner = inner
        self._timings = timings
        self._step = step

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            with self._timings.step(self._step):
                return attr(*args, **kwargs)

        return timed


def _timed_session(timings: Timings) -> requests.Session:
    """A requests session that records IMDS THIM exchanges as ``imds-thim``."""
    import requests

    from confinfer import maa

    class TimedSession(requests.Session):
        def request(  # type: ignore[override]
            self, method: str, url: str, *args: Any, **kwargs: Any
        ) -> requests.Response:
            if maa.THIM_PATH not in url:
                return super().request(method, url, *args, **kwargs)
            with timings.step("imds-thim"):
                return super().request(method, url, *args, **kwargs)

    return TimedSession()


def attest_for_release(
    cfg: Config, vtpm: Vtpm, timings: Timings | None = None
) -> AttestationResult:
    """MAA guest attestation for a key release.

    Records ``tpm`` (vTPM calls), ``imds-thim`` (the VCEK chain) and ``maa`` (the rest: the
    attestation round trip, token decryption and verification against the JWKS).
    """
    from confinfer import maa

    timings = timings if timings is not None else Timings()
    inner = Timings()
    start = time.perf_counter()
    with _timed_session(inner) as session:
        result = maa.attest(cast("Vtpm", _TimedVtpm(vtpm, inner, "tpm")), cfg, session=session)
    spent = inner.totals()
    for name in ("tpm", "imds-thim"):
        timings.record(name, spent.get(name, 0.0))
    timings.record("maa", time.perf_counter() - start - sum(spent.values()))
    return result


def explain_refusal(
    exc: KeyReleaseError, cfg: Config, key_id: KeyId, claims: Mapping[str, Any]
) -> KeyReleaseError:
    """Add which claim failed, by evaluating the key's release policy locally when readable."""
    policy_json = release_policy(cfg, key_id)
    if policy_json is None:
        return exc
    from confinfer import policy

    issuer = claims.get("iss")
    try:
        policy.evaluate(policy_json, dict(claims), str(issuer) if issuer else "")
    except PolicyError as local:
        return KeyReleaseError(
            f"{exc.message} (local check of the key's release policy: {local.message})",
            reason=exc.reason,
            details={**exc.details, **local.details},
            hint=exc.hint,
        )
    except ConfinferError:
        return exc
    return exc


def release_kek(
    cfg: Config,
    key_id: str | KeyId,
    vtpm: Vtpm,
    *,
    algorithm: str | None = None,
    nonce: str | None = None,
    timings: Timings | None = None,
    attestation: AttestationResult | None = None,
) -> KekPrivateKey:
    """Attest, release ``key_id`` from Key Vault, decrypt it in ``vtpm``: the KEK.

    ``algorithm`` defaults to ``cfg.skr_algorithm``; ``nonce`` to a fresh random one (Key
    Vault must echo it). ``attestation`` reuses a result from :func:`attest_for_release`.
    """
    kid = key_id if isinstance(key_id, KeyId) else KeyId.parse(key_id)
    alg = algorithm or cfg.skr_algorithm
    if alg not in OAEP_HASHES:
        raise UsageError(
            f"unknown key-release algorithm {alg!r}; expected one of {', '.join(OAEP_HASHES)}",
            reason=Reason.USAGE,
        )
    timings = timings if timings is not None else Timings()
    start = time.perf_counter()
    try:
        result = attestation or attest_for_release(cfg, vtpm, timings)
        check_token_fresh(result.claims)
        try:
            released = release_key(
                cfg, kid, result.token, algorithm=alg,
                nonce=nonce if nonce is not None else new_nonce(), on_step=timings.record,
            )
        except KeyReleaseError as exc:
            if exc.reason == Reason.RELEASE_REFUSED:
                raise explain_refusal(exc, cfg, kid, result.claims) from None
            raise
        kek = unwrap_transfer_blob(
            released, alg, vtpm,
            transfer_key_bytes=transfer_key_bytes(result.claims), timings=timings,
        )
    finally:
        timings.record("total", time.perf_counter() - start)
        timings.log()
    LOG.info("released KEK %s (%s)", kek.kid, alg)
    return kek
