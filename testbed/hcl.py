"""Azure's HCL attestation report (the blob at vTPM NV index 0x01400001): layout, build, parse.

Byte layout, little-endian (shared/reference/azure-protocols.md §1)::

    0x000  4     signature "HCLA"
    0x004  4     version
    0x008  4     report_size = 0x4D4 + variable_data_size (bytes used; the NV index is padded)
    0x00C  4     request_type (2 = AK certificate request)
    0x010  16    status (u32) + 3 reserved u32
    0x020  1184  hardware report: SEV-SNP ATTESTATION_REPORT (testbed/snp.py)
    0x4C0  4     data_size = 20 + variable_data_size
    0x4C4  4     version (1)
    0x4C8  4     report_type (2 = SNP)
    0x4CC  4     report_data_hash_type (1 = SHA-256)
    0x4D0  4     variable_data_size
    0x4D4  var   runtime data: UTF-8 JSON ("runtime claims")

Binding: with hash type 1, ``REPORT_DATA[0:32] = SHA-256(runtime JSON bytes as stored)`` and
``REPORT_DATA[32:64]`` is zero. The runtime JSON carries the AK public key (``HCLAkPub``), which
is how the vTPM's attestation key is tied to the hardware-signed report.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass, replace

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from testbed import snp

HCL_SIGNATURE = b"HCLA"
HCL_VERSION = 2
REQUEST_TYPE_KEY_RELEASE = 1
REQUEST_TYPE_AK_CERT = 2
HEADER_SIZE = 0x20
HW_REPORT_OFFSET = 0x20
HW_REPORT_SIZE = 1184
VAR_HEADER_OFFSET = 0x4C0
VAR_HEADER_SIZE = 20
VAR_HEADER_VERSION = 1
RUNTIME_DATA_OFFSET = 0x4D4
REPORT_TYPE_SNP = 2
REPORT_TYPE_TDX = 4
HASH_TYPE_SHA256 = 1
HASH_TYPE_SHA384 = 2
HASH_TYPE_SHA512 = 3
USER_DATA_SIZE = 64  # bytes a guest writes to NV 0x01400002
NV_MAX_SIZE = 2048  # the largest NV index this libtpms allows; the report must fit in it

_HEADER = struct.Struct("<4sIII I12x")
_VAR_HEADER = struct.Struct("<IIIII")
_HASHES = {
    HASH_TYPE_SHA256: hashlib.sha256,
    HASH_TYPE_SHA384: hashlib.sha384,
    HASH_TYPE_SHA512: hashlib.sha512,
}

assert _HEADER.size == HEADER_SIZE  # noqa: S101 - layout self-check at import
assert HW_REPORT_OFFSET + HW_REPORT_SIZE == VAR_HEADER_OFFSET  # noqa: S101
assert VAR_HEADER_OFFSET + _VAR_HEADER.size == RUNTIME_DATA_OFFSET  # noqa: S101


class HclReportError(ValueError):
    """An HCL report is malformed or cannot be built; ``reason`` is a stable slug."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class HclReport:
    """One HCL report, as stored (before the NV index's padding)."""

    hw_report: bytes
    runtime_data: bytes
    version: int = HCL_VERSION
    request_type: int = REQUEST_TYPE_AK_CERT
    status: int = 0
    report_type: int = REPORT_TYPE_SNP
    hash_type: int = HASH_TYPE_SHA256
    var_version: int = VAR_HEADER_VERSION

    @property
    def report_size(self) -> int:
        return RUNTIME_DATA_OFFSET + len(self.runtime_data)

    def encode(self) -> bytes:
        if len(self.hw_report) != HW_REPORT_SIZE:
            raise HclReportError(
                f"hardware report must be {HW_REPORT_SIZE} bytes, got {len(self.hw_report)}",
                reason="hcl-hw-report-size",
            )
        var_size = len(self.runtime_data)
        try:
            header = _HEADER.pack(
                HCL_SIGNATURE, self.version, self.report_size, self.request_type, self.status
            )
            var_header = _VAR_HEADER.pack(
                VAR_HEADER_SIZE + var_size,
                self.var_version,
                self.report_type,
                self.hash_type,
                var_size,
            )
        except struct.error as exc:
            raise HclReportError(
                f"HCL report field out of range: {exc}", reason="hcl-field"
            ) from exc
        return header + self.hw_report + var_header + self.runtime_data


def parse_hcl_report(data: bytes) -> HclReport:
    """Parse an HCL report; bytes after ``report_size`` (the NV index's padding) are ignored."""
    if len(data) < RUNTIME_DATA_OFFSET:
        raise HclReportError(
            f"HCL report truncated: {len(data)} bytes, the fixed part alone is "
            f"{RUNTIME_DATA_OFFSET}",
            reason="hcl-truncated",
        )
    signature, version, report_size, request_type, status = _HEADER.unpack_from(data)
    if signature != HCL_SIGNATURE:
        raise HclReportError("not an HCL report (signature is not HCLA)", reason="hcl-signature")
    data_size, var_version, report_type, hash_type, var_size = _VAR_HEADER.unpack_from(
        data, VAR_HEADER_OFFSET
    )
    if data_size != VAR_HEADER_SIZE + var_size:
        raise HclReportError(
            f"HCL data_size {data_size} does not match variable_data_size {var_size} + 20",
            reason="hcl-inconsistent",
        )
    if report_size != RUNTIME_DATA_OFFSET + var_size:
        raise HclReportError(
            f"HCL report_size {report_size} does not match variable_data_size {var_size}",
            reason="hcl-inconsistent",
        )
    if report_size > len(data):
        raise HclReportError(
            f"HCL report truncated: report_size {report_size}, only {len(data)} bytes",
            reason="hcl-truncated",
        )
    return HclReport(
        hw_report=bytes(data[HW_REPORT_OFFSET:VAR_HEADER_OFFSET]),
        runtime_data=bytes(data[RUNTIME_DATA_OFFSET:report_size]),
        version=version,
        request_type=request_type,
        status=status,
        report_type=report_type,
        hash_type=hash_type,
        var_version=var_version,
    )


def report_data_binding(runtime_data: bytes, hash_type: int = HASH_TYPE_SHA256) -> bytes:
    """The 64-byte REPORT_DATA that binds ``runtime_data``: its hash, zero-padded."""
    try:
        digest = _HASHES[hash_type](runtime_data).digest()
    except KeyError:
        raise HclReportError(
            f"unknown report_data_hash_type {hash_type}", reason="hcl-hash-type"
        ) from None
    return digest.ljust(64, b"\0")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def runtime_claims(ak_public: rsa.RSAPublicKey, vm_id: str, user_data: bytes | None) -> bytes:
    """The runtime JSON, compact, as the testbed stores it (one key, as older Azure images had).

    ``user_data`` (the 64 bytes last written to NV 0x01400002) appears as uppercase hex.
    """
    numbers = ak_public.public_numbers()
    modulus = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    exponent = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
    claims: dict[str, object] = {
        "keys": [
            {
                "kid": "HCLAkPub",
                "key_ops": ["sign"],
                "kty": "RSA",
                "e": _b64url(exponent),
                "n": _b64url(modulus),
            }
        ],
        "vm-configuration": {
            "console-enabled": False,
            "secure-boot": True,
            "tpm-enabled": True,
            "vmUniqueId": vm_id,
        },
    }
    if user_data is not None:
        if len(user_data) != USER_DATA_SIZE:
            raise HclReportError(
                f"user data must be {USER_DATA_SIZE} bytes, got {len(user_data)}",
                reason="hcl-user-data-size",
            )
        claims["user-data"] = user_data.hex().upper()
    return json.dumps(claims, separators=(",", ":")).encode("utf-8")


def build_hcl_report(
    *,
    ak_public: rsa.RSAPublicKey,
    vm_id: str,
    vcek_key: ec.EllipticCurvePrivateKey,
    user_data: bytes | None = None,
) -> bytes:
    """A freshly signed HCL report of the testbed CVM, unpadded; at most ``NV_MAX_SIZE`` bytes.

    What the paravisor does on Azure: runtime JSON -> REPORT_DATA = SHA-256(JSON) || zeros ->
    the "hardware" signs an SNP report over it (here with the testbed VCEK) -> HCL envelope.
    """
    runtime = runtime_claims(ak_public, vm_id, user_data)
    template = snp.testbed_guest_report(vm_id, vcek_key.public_key())
    report = replace(template, report_data=report_data_binding(runtime)).signed(vcek_key)
    encoded = HclReport(hw_report=report.encode(), runtime_data=runtime).encode()
    if len(encoded) > NV_MAX_SIZE:
        raise HclReportError(
            f"HCL report is {len(encoded)} bytes, more than the NV limit {NV_MAX_SIZE}",
            reason="hcl-too-large",
        )
    return encoded
