"""The HCL report: what Azure's paravisor stores in the vTPM at NV index 0x01400001.

Layout (little-endian): a 32-byte header (``HCLA`` signature, version, report size, request
type, status), the 1184-byte hardware report (an AMD SEV-SNP ATTESTATION_REPORT), then the
IGVM request data: a 20-byte header (data size, version, report type, hash type, variable data
size) followed by the runtime claims as UTF-8 JSON.

The SNP report's REPORT_DATA binds the runtime claims: its first bytes are the hash (SHA-256 for
hash type 1) of the runtime JSON exactly as stored, the rest zero. :meth:`HclReport.check_binding`
checks that on the client side, as a sanity check before sending evidence anywhere; the
attestation service checks it again, with the report's signature, for real.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from confinfer.errors import AttestationError, Reason

SIGNATURE = b"HCLA"
HEADER_SIZE = 0x20
HW_REPORT_SIZE = 1184
IGVM_HEADER_SIZE = 20
RUNTIME_OFFSET = HEADER_SIZE + HW_REPORT_SIZE + IGVM_HEADER_SIZE  # 0x4D4

# IGVM report types (0x4C8).
REPORT_TYPE_VBS = 1
REPORT_TYPE_SNP = 2
REPORT_TYPE_TRUSTED_LAUNCH = 3
REPORT_TYPE_TDX = 4
_REPORT_TYPE_NAMES = {
    REPORT_TYPE_VBS: "vbs",
    REPORT_TYPE_SNP: "snp",
    REPORT_TYPE_TRUSTED_LAUNCH: "trusted-launch",
    REPORT_TYPE_TDX: "tdx",
}

# REPORT_DATA hash algorithms (0x4CC).
_HASHES = {1: "sha256", 2: "sha384", 3: "sha512"}

# Inside the SNP ATTESTATION_REPORT.
SNP_REPORT_DATA = slice(0x50, 0x90)
SNP_MEASUREMENT = slice(0x90, 0xC0)

USER_DATA_SIZE = 64


def _invalid(message: str) -> AttestationError:
    return AttestationError(f"HCL report: {message}", reason=Reason.HCL_REPORT_INVALID)


@dataclass(frozen=True)
class HclReport:
    """A parsed HCL report. ``raw`` is exactly ``report_size`` bytes."""

    raw: bytes
    version: int
    request_type: int
    hardware_report: bytes
    report_type: int
    hash_type: int
    runtime_data: bytes
    runtime_claims: Mapping[str, Any] = field(repr=False)

    @property
    def report_type_name(self) -> str:
        return _REPORT_TYPE_NAMES.get(self.report_type, f"unknown({self.report_type})")

    @property
    def snp_report(self) -> bytes:
        """The SEV-SNP ATTESTATION_REPORT (1184 bytes); refuses other isolation types."""
        if self.report_type != REPORT_TYPE_SNP:
            raise AttestationError(
                f"HCL report carries a {self.report_type_name} report, not SEV-SNP",
                reason=Reason.HCL_REPORT_UNSUPPORTED,
            )
        return self.hardware_report

    @property
    def report_data(self) -> bytes:
        """The 64-byte REPORT_DATA of the SNP report."""
        return self.snp_report[SNP_REPORT_DATA]

    @property
    def measurement(self) -> bytes:
        """The 48-byte launch MEASUREMENT of the SNP report."""
        return self.snp_report[SNP_MEASUREMENT]

    @property
    def user_data(self) -> bytes | None:
        """The 64 bytes last written to NV 0x01400002, as echoed in the runtime claims."""
        value = self.runtime_claims.get("user-data")
        if value is None:
            return None
        if not isinstance(value, str):
            raise _invalid("runtime claim 'user-data' is not a string")
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise _invalid("runtime claim 'user-data' is not hex") from None

    def runtime_key(self, kid: str) -> Mapping[str, Any] | None:
        """The runtime JWK with this ``kid`` (``HCLAkPub``, ``HCLEkPub``), if present."""
        keys = self.runtime_claims.get("keys")
        if not isinstance(keys, list):
            return None
        for key in keys:
            if isinstance(key, Mapping) and key.get("kid") == kid:
                return key
        return None

    def check_binding(self) -> None:
        """REPORT_DATA must be H(runtime JSON) followed by zeros; raise if it is not."""
        name = _HASHES.get(self.hash_type)
        if name is None:
            raise AttestationError(
                f"HCL report: unsupported REPORT_DATA hash type {self.hash_type}",
                reason=Reason.HCL_REPORT_UNSUPPORTED,
            )
        digest = hashlib.new(name, self.runtime_data).digest()
        expected = digest + bytes(64 - len(digest))
        if not hmac.compare_digest(self.report_data, expected):
            raise AttestationError(
                "HCL report: REPORT_DATA does not bind the runtime claims",
                reason=Reason.HCL_REPORT_BINDING,
                hint="the vTPM's report is inconsistent; read it again after a refresh",
            )


def report_size(raw: bytes) -> int:
    """The used length of a (padded) HCL report, from its header; raises if implausible."""
    if len(raw) < HEADER_SIZE or raw[:4] != SIGNATURE:
        raise _invalid("missing the 'HCLA' signature")
    (size,) = struct.unpack_from("<I", raw, 8)
    if size < RUNTIME_OFFSET or size > len(raw):
        raise _invalid(f"report size {size} is outside 0x{RUNTIME_OFFSET:X}..{len(raw)}")
    return int(size)


def parse(raw: bytes) -> HclReport:
    """Parse an HCL report (padding after ``report_size`` is ignored)."""
    size = report_size(raw)
    data = bytes(raw[:size])
    version, _size, request_type = struct.unpack_from("<III", data, 4)
    hardware_report = data[HEADER_SIZE : HEADER_SIZE + HW_REPORT_SIZE]
    base = HEADER_SIZE + HW_REPORT_SIZE
    data_size, _igvm_version, report_type, hash_type, var_size = struct.unpack_from(
        "<IIIII", data, base
    )
    if data_size != IGVM_HEADER_SIZE + var_size:
        raise _invalid(f"data size {data_size} does not match variable data size {var_size} + 20")
    if RUNTIME_OFFSET + var_size > size:
        raise _invalid(f"runtime data ({var_size} bytes) runs past the report size {size}")
    runtime_data = data[RUNTIME_OFFSET : RUNTIME_OFFSET + var_size]
    try:
        # Some paravisor versions pad the JSON with NULs; the hash covers them, JSON does not.
        claims = json.loads(runtime_data.rstrip(b"\0").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _invalid("runtime data is not UTF-8 JSON") from None
    if not isinstance(claims, dict):
        raise _invalid("runtime data is not a JSON object")
    return HclReport(
        raw=data,
        version=version,
        request_type=request_type,
        hardware_report=hardware_report,
        report_type=report_type,
        hash_type=hash_type,
        runtime_data=runtime_data,
        runtime_claims=claims,
    )
