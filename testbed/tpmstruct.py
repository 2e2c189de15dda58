"""TPM 2.0 wire structures a verifier reads: TPM2B_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE.

Big-endian, as marshalled by a TPM (TPM 2.0 Library, Part 2 "Structures"). Parsing is strict:
every length is checked and a structure must use all of its bytes. Names follow Part 1 §16:
``nameAlg || H_nameAlg(marshalled TPMT_PUBLIC)``. Only what a guest-attestation verifier needs
is modelled: RSA objects, quote and certify attestations, RSA/ECDSA signatures.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import rsa

TPM_GENERATED_VALUE = 0xFF544347
TPM_CC_POLICY_PCR = 0x0000017F


class Alg(enum.IntEnum):
    """TPM_ALG_ID values used here (Part 2 §6.3)."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    KEYEDHASH = 0x0008
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CFB = 0x0043


class StAttest(enum.IntEnum):
    """TPMI_ST_ATTEST values (Part 2 §6.9)."""

    NV = 0x8014
    COMMAND_AUDIT = 0x8015
    SESSION_AUDIT = 0x8016
    CERTIFY = 0x8017
    QUOTE = 0x8018
    TIME = 0x8019
    CREATION = 0x801A
    NV_DIGEST = 0x801C


class ObjectAttr(enum.IntFlag):
    """TPMA_OBJECT bits (Part 2 §8.3)."""

    FIXED_TPM = 1 << 1
    ST_CLEAR = 1 << 2
    FIXED_PARENT = 1 << 4
    SENSITIVE_DATA_ORIGIN = 1 << 5
    USER_WITH_AUTH = 1 << 6
    ADMIN_WITH_POLICY = 1 << 7
    NO_DA = 1 << 10
    ENCRYPTED_DUPLICATION = 1 << 11
    RESTRICTED = 1 << 16
    DECRYPT = 1 << 17
    SIGN_ENCRYPT = 1 << 18


_HASHES: dict[int, str] = {
    Alg.SHA1: "sha1",
    Alg.SHA256: "sha256",
    Alg.SHA384: "sha384",
    Alg.SHA512: "sha512",
}


class TpmFormatError(ValueError):
    """Bytes that are not the TPM structure they claim to be; the message says what is wrong."""


def alg_name(alg: int) -> str:
    try:
        return Alg(alg).name
    except ValueError:
        return f"0x{alg:04x}"


def digest(alg: int, data: bytes) -> bytes:
    """H_alg(data) for a TPM hash algorithm."""
    name = _HASHES.get(alg)
    if name is None:
        raise TpmFormatError(f"hash algorithm {alg_name(alg)} is not supported")
    return hashlib.new(name, data).digest()


def digest_size(alg: int) -> int:
    return len(digest(alg, b""))


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int, field: str) -> bytes:
        if self.pos + n > len(self.data):
            raise TpmFormatError(
                f"{self.what} is truncated: {field} needs {n} bytes at offset {self.pos}, "
                f"{len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        value: int = struct.unpack(">H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack(">I", self.take(4, field))[0]
        return value

    def u64(self, field: str) -> int:
        value: int = struct.unpack(">Q", self.take(8, field))[0]
        return value

    def tpm2b(self, field: str) -> bytes:
        return self.take(self.u16(f"{field}.size"), field)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise TpmFormatError(
                f"{self.what} has {len(self.data) - self.pos} trailing bytes after offset "
                f"{self.pos}"
            )


# --- TPM2B_PUBLIC ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RsaPublic:
    """An RSA TPMT_PUBLIC, with the exact bytes it was parsed from (for its name)."""

    name_alg: int
    attributes: ObjectAttr
    auth_policy: bytes
    symmetric: int  # TPMT_SYM_DEF_OBJECT algorithm; NULL for signing and plain decrypt keys
    scheme: int  # TPMT_RSA_SCHEME scheme; NULL when the key allows any
    scheme_hash: int | None
    key_bits: int
    exponent: int  # effective exponent: a marshalled 0 means 65537
    modulus: bytes
    tpmt_public: bytes

    @property
    def name(self) -> bytes:
        return self.name_alg.to_bytes(2, "big") + digest(self.name_alg, self.tpmt_public)

    def public_key(self) -> rsa.RSAPublicKey:
        n = int.from_bytes(self.modulus, "big")
        return rsa.RSAPublicNumbers(self.exponent, n).public_key()

    def has(self, flags: ObjectAttr) -> bool:
        return self.attributes & flags == flags


def parse_public(data: bytes) -> RsaPublic:
    """Parse a marshalled TPM2B_PUBLIC holding an RSA key (and nothing after it)."""
    public, used = parse_public_prefix(data)
    if used != len(data):
        raise TpmFormatError(
            f"TPM2B_PUBLIC has {len(data) - used} trailing bytes after offset {used}"
        )
    return public


def parse_public_prefix(data: bytes) -> tuple[RsaPublic, int]:
    """Parse the TPM2B_PUBLIC (RSA) at the start of ``data``; returns it and its length.

    What follows it is the caller's business: a TPM2_ReadPublic response marshalled whole
    carries ``TPM2B_NAME name || TPM2B_NAME qualifiedName`` after it.
    """
    outer = _Reader(data, "TPM2B_PUBLIC")
    inner = outer.tpm2b("publicArea")
    if not inner:
        raise TpmFormatError("TPM2B_PUBLIC is empty (size 0)")
    return parse_tpmt_public(inner), outer.pos


def parse_tpmt_public(data: bytes) -> RsaPublic:
    """Parse a marshalled TPMT_PUBLIC holding an RSA key."""
    r = _Reader(data, "TPMT_PUBLIC")
    obj_type = r.u16("type")
    if obj_type != Alg.RSA:
        raise TpmFormatError(f"TPMT_PUBLIC type is {alg_name(obj_type)}, not RSA")
    name_alg = r.u16("nameAlg")
    if name_alg not in _HASHES:
        raise TpmFormatError(f"TPMT_PUBLIC nameAlg {alg_name(name_alg)} is not supported")
    attributes = ObjectAttr(r.u32("objectAttributes"))
    auth_policy = r.tpm2b("authPolicy")
    symmetric = r.u16("parameters.symmetric.algorithm")
    if symmetric != Alg.NULL:
        r.u16("parameters.symmetric.keyBits")
        r.u16("parameters.symmetric.mode")
    scheme = r.u16("parameters.scheme.scheme")
    scheme_hash: int | None = None
    if scheme in (Alg.RSASSA, Alg.RSAPSS, Alg.OAEP):
        scheme_hash = r.u16("parameters.scheme.details.hashAlg")
    elif scheme not in (Alg.NULL, Alg.RSAES):
        raise TpmFormatError(f"TPMT_PUBLIC RSA scheme {alg_name(scheme)} is not valid")
    key_bits = r.u16("parameters.keyBits")
    exponent = r.u32("parameters.exponent") or 65537
    modulus = r.tpm2b("unique.rsa")
    r.end()
    if len(modulus) * 8 != key_bits:
        raise TpmFormatError(
            f"TPMT_PUBLIC modulus is {len(modulus) * 8} bits but keyBits says {key_bits}"
        )
    return RsaPublic(
        name_alg=name_alg,
        attributes=attributes,
        auth_policy=auth_policy,
        symmetric=symmetric,
        scheme=scheme,
        scheme_hash=scheme_hash,
        key_bits=key_bits,
        exponent=exponent,
        modulus=modulus,
        tpmt_public=data,
    )


# --- TPMS_ATTEST ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a bank and the PCR indices selected in it."""

    hash_alg: int
    size_of_select: int
    pcrs: tuple[int, ...]


@dataclass(frozen=True)
class QuoteInfo:
    selections: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class CertifyInfo:
    name: bytes
    qualified_name: bytes


@dataclass(frozen=True)
class Attest:
    """A TPMS_ATTEST; ``quote`` or ``certify`` is set according to ``type``."""

    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    quote: QuoteInfo | None = None
    certify: CertifyInfo | None = None


def _pcr_selections(r: _Reader) -> tuple[PcrSelection, ...]:
    count = r.u32("pcrSelect.count")
    if count > 16:  # TPM implementations cap this at the number of banks
        raise TpmFormatError(f"{r.what} selects {count} PCR banks; at most 16 are possible")
    selections = []
    for i in range(count):
        hash_alg = r.u16(f"pcrSelect[{i}].hash")
        size = r.u8(f"pcrSelect[{i}].sizeofSelect")
        bitmap = r.take(size, f"pcrSelect[{i}].pcrSelect")
        pcrs = tuple(
            byte * 8 + bit for byte in range(size) for bit in range(8) if bitmap[byte] >> bit & 1
        )
        selections.append(PcrSelection(hash_alg, size, pcrs))
    return tuple(selections)


def parse_attest(data: bytes) -> Attest:
    """Parse a marshalled TPMS_ATTEST (the bytes a TPM signs for a quote or certify)."""
    r = _Reader(data, "TPMS_ATTEST")
    magic = r.u32("magic")
    if magic != TPM_GENERATED_VALUE:
        raise TpmFormatError(
            f"TPMS_ATTEST magic is 0x{magic:08x}, "
            f"not TPM_GENERATED_VALUE 0x{TPM_GENERATED_VALUE:08x}"
        )
    att_type = r.u16("type")
    qualified_signer = r.tpm2b("qualifiedSigner")
    extra_data = r.tpm2b("extraData")
    clock = r.u64("clockInfo.clock")
    reset_count = r.u32("clockInfo.resetCount")
    restart_count = r.u32("clockInfo.restartCount")
    safe = r.u8("clockInfo.safe")
    if safe not in (0, 1):
        raise TpmFormatError(f"TPMS_ATTEST clockInfo.safe is {safe}, not a TPMI_YES_NO")
    firmware_version = r.u64("firmwareVersion")
    quote = certify = None
    if att_type == StAttest.QUOTE:
        selections = _pcr_selections(r)
        quote = QuoteInfo(selections, r.tpm2b("attested.quote.pcrDigest"))
        r.end()
    elif att_type == StAttest.CERTIFY:
        name = r.tpm2b("attested.certify.name")
        certify = CertifyInfo(name, r.tpm2b("attested.certify.qualifiedName"))
        r.end()
    return Attest(
        type=att_type,
        qualified_signer=qualified_signer,
        extra_data=extra_data,
        clock=clock,
        reset_count=reset_count,
        restart_count=restart_count,
        safe=bool(safe),
        firmware_version=firmware_version,
        quote=quote,
        certify=certify,
    )


def attest_type_name(att_type: int) -> str:
    try:
        return f"TPM_ST_ATTEST_{StAttest(att_type).name}"
    except ValueError:
        return f"0x{att_type:04x}"


# --- TPMT_SIGNATURE -------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """A TPMT_SIGNATURE. RSA schemes fill ``sig``; ECDSA fills ``r`` and ``s``."""

    sig_alg: int
    hash_alg: int
    sig: bytes = b""
    r: bytes = b""
    s: bytes = b""


def parse_signature(data: bytes) -> Signature:
    """Parse a marshalled TPMT_SIGNATURE (RSASSA, RSAPSS or ECDSA)."""
    rd = _Reader(data, "TPMT_SIGNATURE")
    sig_alg = rd.u16("sigAlg")
    if sig_alg in (Alg.RSASSA, Alg.RSAPSS):
        hash_alg = rd.u16("signature.hash")
        out = Signature(sig_alg, hash_alg, sig=rd.tpm2b("signature.sig"))
    elif sig_alg == Alg.ECDSA:
        hash_alg = rd.u16("signature.hash")
        r = rd.tpm2b("signature.signatureR")
        out = Signature(sig_alg, hash_alg, r=r, s=rd.tpm2b("signature.signatureS"))
    else:
        raise TpmFormatError(f"TPMT_SIGNATURE algorithm {alg_name(sig_alg)} is not supported")
    rd.end()
    return out


# --- policy ---------------------------------------------------------------------------------


def marshal_pcr_selection(hash_alg: int, pcrs: tuple[int, ...], size_of_select: int = 3) -> bytes:
    """A TPML_PCR_SELECTION with one bank."""
    bitmap = bytearray(size_of_select)
    for pcr in pcrs:
        if pcr >= size_of_select * 8:
            raise TpmFormatError(f"PCR {pcr} does not fit a {size_of_select}-byte selection")
        bitmap[pcr // 8] |= 1 << (pcr % 8)
    return struct.pack(">IHB", 1, hash_alg, size_of_select) + bytes(bitmap)


def policy_pcr_digest(
    hash_alg: int, pcrs: tuple[int, ...], pcr_values: list[bytes], size_of_select: int = 3
) -> bytes:
    """The policy digest of a fresh session after TPM2_PolicyPCR over these PCR values.

    Part 3 §23.7: ``H(0...0 || TPM_CC_PolicyPCR || pcrs || H(PCR values concatenated))``.
    """
    selection = marshal_pcr_selection(hash_alg, pcrs, size_of_select)
    pcr_digest = digest(hash_alg, b"".join(pcr_values))
    start = bytes(digest_size(hash_alg))
    return digest(hash_alg, start + TPM_CC_POLICY_PCR.to_bytes(4, "big") + selection + pcr_digest)
