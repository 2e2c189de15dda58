"""AMD SEV-SNP ATTESTATION_REPORT: byte layout, the testbed guest's report, signing and checking.

The layout is the one in AMD's SEV-SNP firmware ABI specification (report version 2), 0x4A0
bytes, little-endian. The signature covers bytes ``[0, 0x2A0)``; with ``signature_algo`` 1 it is
ECDSA P-384 over SHA-384, stored as ``r`` (72 bytes) then ``s`` (72 bytes), each little-endian
and zero-extended, in the 0x200-byte signature area at 0x2A0. The testbed's "chip" signs with
``trust.vcek``; a verifier checks with the VCEK certificate's public key.

Offsets used by verifiers elsewhere: REPORT_DATA at 0x50 (64 bytes), MEASUREMENT at 0x90
(48 bytes), HOST_DATA at 0xC0 (32 bytes).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field, replace

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

REPORT_SIZE = 0x4A0  # 1184 bytes
SIGNED_SIZE = 0x2A0  # the signature covers bytes [0, SIGNED_SIZE)
SIGNATURE_OFFSET = 0x2A0
SIGNATURE_COMPONENT_SIZE = 72  # r and s, each little-endian, zero-extended
REPORT_DATA_OFFSET = 0x50
MEASUREMENT_OFFSET = 0x90
HOST_DATA_OFFSET = 0xC0

REPORT_VERSION = 2
SIG_ALGO_ECDSA_P384_SHA384 = 1

# Guest policy bits (SEV-SNP ABI, GUEST_POLICY).
POLICY_SMT = 1 << 16
POLICY_RESERVED_ONE = 1 << 17  # must be set
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20

# PLATFORM_INFO bits.
PLATFORM_SMT_EN = 1 << 0
PLATFORM_TSME_EN = 1 << 1

# The testbed guest's fixed launch measurement (what an IGVM image digest would be on Azure).
TESTBED_MEASUREMENT = hashlib.sha384(b"confinfer testbed CVM launch measurement v1").digest()
TESTBED_ID_KEY_DIGEST = hashlib.sha384(b"confinfer testbed IGVM id key").digest()
TESTBED_AUTHOR_KEY_DIGEST = hashlib.sha384(b"confinfer testbed IGVM author key").digest()
TESTBED_POLICY = POLICY_RESERVED_ONE | POLICY_SMT | 0x1F  # ABI 0.31, SMT allowed, no debug

# struct layout of the signed body, in order. "x" fields are reserved and always zero here.
_BODY = struct.Struct(
    "<"
    "I"  # 0x000 version
    "I"  # 0x004 guest_svn
    "Q"  # 0x008 policy
    "16s"  # 0x010 family_id
    "16s"  # 0x020 image_id
    "I"  # 0x030 vmpl
    "I"  # 0x034 signature_algo
    "Q"  # 0x038 current_tcb
    "Q"  # 0x040 platform_info
    "I"  # 0x048 key_info (author_key_en, mask_chip_key, signing_key)
    "4x"  # 0x04C reserved
    "64s"  # 0x050 report_data
    "48s"  # 0x090 measurement
    "32s"  # 0x0C0 host_data
    "48s"  # 0x0E0 id_key_digest
    "48s"  # 0x110 author_key_digest
    "32s"  # 0x140 report_id
    "32s"  # 0x160 report_id_ma
    "Q"  # 0x180 reported_tcb
    "24x"  # 0x188 reserved
    "64s"  # 0x1A0 chip_id
    "Q"  # 0x1E0 committed_tcb
    "BBBx"  # 0x1E8 current build, minor, major, reserved
    "BBBx"  # 0x1EC committed build, minor, major, reserved
    "Q"  # 0x1F0 launch_tcb
    "168x"  # 0x1F8 reserved up to the signature
)
assert _BODY.size == SIGNED_SIZE  # noqa: S101 - layout self-check at import
_FIXED_FIELDS = {
    "family_id": 16,
    "image_id": 16,
    "report_data": 64,
    "measurement": 48,
    "host_data": 32,
    "id_key_digest": 48,
    "author_key_digest": 48,
    "report_id": 32,
    "report_id_ma": 32,
    "chip_id": 64,
}


class SnpReportError(ValueError):
    """A report is malformed or does not verify; ``reason`` is a stable slug."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidReportSignature(SnpReportError):
    """The report's signature does not verify against the given VCEK public key."""

    def __init__(self) -> None:
        super().__init__("SNP report signature does not verify", reason="snp-signature")


@dataclass(frozen=True)
class TcbVersion:
    """TCB_VERSION (Milan/Genoa layout): SVNs of the bootloader, PSP OS, SNP firmware, microcode."""

    boot_loader: int = 0
    tee: int = 0
    snp: int = 0
    microcode: int = 0

    def to_u64(self) -> int:
        raw = bytes([self.boot_loader, self.tee, 0, 0, 0, 0, self.snp, self.microcode])
        return int.from_bytes(raw, "little")

    @classmethod
    def from_u64(cls, value: int) -> TcbVersion:
        raw = value.to_bytes(8, "little")
        return cls(boot_loader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])


TESTBED_TCB = TcbVersion(boot_loader=3, tee=0, snp=8, microcode=115)


@dataclass(frozen=True)
class SnpReport:
    """One ATTESTATION_REPORT. ``signature_r``/``signature_s`` are 0 until signed."""

    version: int = REPORT_VERSION
    guest_svn: int = 0
    policy: int = TESTBED_POLICY
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    vmpl: int = 0
    signature_algo: int = SIG_ALGO_ECDSA_P384_SHA384
    current_tcb: TcbVersion = field(default_factory=TcbVersion)
    platform_info: int = 0
    key_info: int = 0  # bit 0 author_key_en, bit 1 mask_chip_key, bits 2-4 signing_key (0 VCEK)
    report_data: bytes = bytes(64)
    measurement: bytes = bytes(48)
    host_data: bytes = bytes(32)
    id_key_digest: bytes = bytes(48)
    author_key_digest: bytes = bytes(48)
    report_id: bytes = bytes(32)
    report_id_ma: bytes = bytes(32)
    reported_tcb: TcbVersion = field(default_factory=TcbVersion)
    chip_id: bytes = bytes(64)
    committed_tcb: TcbVersion = field(default_factory=TcbVersion)
    current_build: int = 0
    current_minor: int = 0
    current_major: int = 0
    committed_build: int = 0
    committed_minor: int = 0
    committed_major: int = 0
    launch_tcb: TcbVersion = field(default_factory=TcbVersion)
    signature_r: int = 0
    signature_s: int = 0

    @property
    def is_debuggable(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def migration_allowed(self) -> bool:
        return bool(self.policy & POLICY_MIGRATE_MA)

    @property
    def smt_allowed(self) -> bool:
        return bool(self.policy & POLICY_SMT)

    def body(self) -> bytes:
        """The signed part, bytes [0, 0x2A0)."""
        for name, size in _FIXED_FIELDS.items():
            if len(getattr(self, name)) != size:
                raise SnpReportError(
                    f"SNP report field {name} must be {size} bytes", reason="snp-field"
                )
        try:
            return _BODY.pack(
                self.version,
                self.guest_svn,
                self.policy,
                self.family_id,
                self.image_id,
                self.vmpl,
                self.signature_algo,
                self.current_tcb.to_u64(),
                self.platform_info,
                self.key_info,
                self.report_data,
                self.measurement,
                self.host_data,
                self.id_key_digest,
                self.author_key_digest,
                self.report_id,
                self.report_id_ma,
                self.reported_tcb.to_u64(),
                self.chip_id,
                self.committed_tcb.to_u64(),
                self.current_build,
                self.current_minor,
                self.current_major,
                self.committed_build,
                self.committed_minor,
                self.committed_major,
                self.launch_tcb.to_u64(),
            )
        except struct.error as exc:
            raise SnpReportError(
                f"SNP report field out of range: {exc}", reason="snp-field"
            ) from exc

    def encode(self) -> bytes:
        """The full 0x4A0-byte report, signature area included."""
        width = SIGNATURE_COMPONENT_SIZE
        if self.signature_r >= 1 << (8 * width) or self.signature_s >= 1 << (8 * width):
            raise SnpReportError("SNP signature component too large", reason="snp-field")
        signature = self.signature_r.to_bytes(width, "little") + self.signature_s.to_bytes(
            width, "little"
        )
        return self.body() + signature.ljust(REPORT_SIZE - SIGNED_SIZE, b"\0")

    def signed(self, vcek_key: ec.EllipticCurvePrivateKey) -> SnpReport:
        """This report signed by ``vcek_key`` (ECDSA P-384, SHA-384 over the body)."""
        if self.signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
            raise SnpReportError(
                f"unsupported signature_algo {self.signature_algo}", reason="snp-signature-algo"
            )
        if not isinstance(vcek_key.curve, ec.SECP384R1):
            raise SnpReportError("the VCEK must be a P-384 key", reason="snp-signing-key")
        der = vcek_key.sign(self.body(), ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        return replace(self, signature_r=r, signature_s=s)


def parse_report(data: bytes) -> SnpReport:
    """Parse exactly one 0x4A0-byte report. Does not check the signature."""
    if len(data) != REPORT_SIZE:
        raise SnpReportError(
            f"SNP report must be {REPORT_SIZE} bytes, got {len(data)}", reason="snp-size"
        )
    (
        version,
        guest_svn,
        policy,
        family_id,
        image_id,
        vmpl,
        signature_algo,
        current_tcb,
        platform_info,
        key_info,
        report_data,
        measurement,
        host_data,
        id_key_digest,
        author_key_digest,
        report_id,
        report_id_ma,
        reported_tcb,
        chip_id,
        committed_tcb,
        current_build,
        current_minor,
        current_major,
        committed_build,
        committed_minor,
        committed_major,
        launch_tcb,
    ) = _BODY.unpack_from(data)
    width = SIGNATURE_COMPONENT_SIZE
    sig = data[SIGNATURE_OFFSET:]
    return SnpReport(
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=family_id,
        image_id=image_id,
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb=TcbVersion.from_u64(current_tcb),
        platform_info=platform_info,
        key_info=key_info,
        report_data=report_data,
        measurement=measurement,
        host_data=host_data,
        id_key_digest=id_key_digest,
        author_key_digest=author_key_digest,
        report_id=report_id,
        report_id_ma=report_id_ma,
        reported_tcb=TcbVersion.from_u64(reported_tcb),
        chip_id=chip_id,
        committed_tcb=TcbVersion.from_u64(committed_tcb),
        current_build=current_build,
        current_minor=current_minor,
        current_major=current_major,
        committed_build=committed_build,
        committed_minor=committed_minor,
        committed_major=committed_major,
        launch_tcb=TcbVersion.from_u64(launch_tcb),
        signature_r=int.from_bytes(sig[:width], "little"),
        signature_s=int.from_bytes(sig[width : 2 * width], "little"),
    )


def verify_report_signature(
    report: bytes | SnpReport, vcek_public: ec.EllipticCurvePublicKey
) -> None:
    """Check the report's ECDSA P-384/SHA-384 signature; raise ``SnpReportError`` if it fails.

    Given bytes, the signature is checked over those exact bytes [0, 0x2A0); given an
    ``SnpReport``, over its canonical encoding (reserved fields zero).
    """
    raw = report.encode() if isinstance(report, SnpReport) else bytes(report)
    parsed = parse_report(raw)
    if parsed.signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
        raise SnpReportError(
            f"unsupported signature_algo {parsed.signature_algo}", reason="snp-signature-algo"
        )
    if not isinstance(vcek_public.curve, ec.SECP384R1):
        raise SnpReportError("the VCEK must be a P-384 key", reason="snp-signing-key")
    signature = encode_dss_signature(parsed.signature_r, parsed.signature_s)
    try:
        vcek_public.verify(signature, raw[:SIGNED_SIZE], ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise InvalidReportSignature() from None


def testbed_guest_report(vm_id: str, vcek_public: ec.EllipticCurvePublicKey) -> SnpReport:
    """The unsigned report of the testbed CVM, ``report_data`` zero.

    Everything is fixed or derived, so that every report this "VM" produces carries the same
    identity: ``report_id`` from the VM id (a guest's report id is stable for its lifetime) and
    ``chip_id`` from the VCEK public key (one chip, one VCEK).
    """
    vcek_point = vcek_public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return SnpReport(
        guest_svn=1,
        policy=TESTBED_POLICY,
        family_id=bytes.fromhex("01") + bytes(15),
        image_id=bytes.fromhex("02") + bytes(15),
        vmpl=0,
        current_tcb=TESTBED_TCB,
        platform_info=PLATFORM_SMT_EN | PLATFORM_TSME_EN,
        measurement=TESTBED_MEASUREMENT,
        id_key_digest=TESTBED_ID_KEY_DIGEST,
        author_key_digest=TESTBED_AUTHOR_KEY_DIGEST,
        report_id=hashlib.sha256(b"report-id:" + vm_id.encode()).digest(),
        report_id_ma=b"\xff" * 32,  # no migration agent
        reported_tcb=TESTBED_TCB,
        chip_id=hashlib.sha512(b"chip-id:" + vcek_point).digest(),
        committed_tcb=TESTBED_TCB,
        current_build=21,
        current_minor=55,
        current_major=1,
        committed_build=21,
        committed_minor=55,
        committed_major=1,
        launch_tcb=TESTBED_TCB,
    )
