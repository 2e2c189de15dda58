"""A strict stand-in for NVIDIA's ``nvattest`` CLI (1.2.x), bound to one testbed directory.

``python -m testbed up`` writes ``DIR/bin/nvattest``, which runs :func:`main` with this testbed's
directory. It keeps the real tool's contract (``shared/reference/nvidia-attestation.md`` §1;
``NVIDIA/attestation-sdk``: ``nv-attestation-cli/src/attest.cpp``, ``nv-attestation-sdk-cpp/src/
gpu/{nvml_client,evidence,verify}.cpp``, ``src/{nv_http,nv_ocsp,rim}.cpp``, ``error.h``), because
its caller (attestd's nvattest adapter) depends on it:

- the command line of :mod:`testbed.nvattest_cli` (CLI11's errors and exit codes included);
- evidence from the driver the way the SDK's NVML collector gets it: the NVML library is loaded
  (``CONFINFER_NVML_LIBRARY``, else ``DIR/gpu/lib/libnvidia-ml.so.1``) and ``nvmlInit_v2``,
  ``nvmlSystemGetConfComputeState``/``Settings``, ``nvmlDeviceGetCount_v2``,
  ``nvmlDeviceGetHandleByIndex_v2``, ``nvmlDeviceGetArchitecture``, ``nvmlDeviceGetUUID``,
  ``nvmlDeviceGetConfComputeGpuAttestationReport`` (the caller's 32-byte nonce) and
  ``nvmlDeviceGetConfComputeGpuCertificate`` are called;
- the local verifier's checks in its order: the attestation certificate chain parses, the report
  signature (ECDSA P-384/SHA-384 by the chain's leaf), the SPDM structure, the nonce echo, the
  chain up to the GPU root (``DIR/gpu/nvidia-root.pem``, the testbed's DEVICE_ROOT_CERT) and its
  OCSP status, the driver and VBIOS RIMs (the testbed's RIM is
  ``DIR/gpu/reference-measurements.json``), the measurements;
- ``--format json``: exactly the real document (keys sorted, 4-space indent), the per-GPU claims
  v3 and the detached EAT (unsigned ``alg: none`` JWTs, submods digests over the per-GPU JWT
  strings); the real result codes and messages; the exit status is the result code modulo 256.

Fault knobs (testbed.faults), each consumed once per run that reaches it: ``nvattest`` with
``inject`` (``nonce-mismatch``: the report is asked for another nonce, as a replay;
``bad-signature``: one report byte flipped before verification; ``ocsp-revoked``: the
responder says the attestation certificate is revoked; ``ocsp-nonce-mismatch``: its answers
carry another nonce, as a cache would) and/or ``latency_s``; ``nvattest-ocsp`` and
``nvattest-rim`` with ``down`` (unreachable), ``status`` (the HTTP status answered) and
``latency_s``. Each run appends one JSON line to ``DIR/run/nvattest.log`` (argv with the service
key replaced by its length, the ``NVAT_*`` variables set).
"""

from __future__ import annotations

import base64
import ctypes
import datetime as dt
import hashlib
import itertools
import json
import os
import secrets
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from xml.etree import ElementTree

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from testbed import nvattest_cli as cli
from testbed.faults import Fault, Faults

VERSION = "1.2.2"
LOG_FILE = "nvattest.log"
FAULT = "nvattest"
FAULT_RIM = "nvattest-rim"
FAULT_OCSP = "nvattest-ocsp"
INJECTIONS = ("nonce-mismatch", "bad-signature", "ocsp-revoked", "ocsp-nonce-mismatch")
LIBRARY_ENV = "CONFINFER_NVML_LIBRARY"
STATE_ENV = "CONFINFER_TESTBED_GPU_STATE"
ISSUER = "NVAT-LOCAL-VERIFIER"
SUBJECT = "NVIDIA-PLATFORM-ATTESTATION"
CLAIMS_VERSION = "3.0"
EAT_LIFETIME_S = 3600
OEM_ID = "5703"  # NVIDIA's FirmwareManufacturerId in its RIMs
NONCE_SIZE = 32
SIGNATURE_SIZE = 96
DIGEST_SIZE = 48
VBIOS_BLOCKS = range(1, 5)  # the testbed's VBIOS RIM covers blocks 1-4, the driver RIM 5-8

# nvat_rc_t (nvat.h.in) and nvat_rc_to_string (error.h to_string).
RC_OK = 0
RC_INTERNAL_ERROR = 2
RC_BAD_ARGUMENT = 4
RC_RP_POLICY_MISMATCH = 11
RC_OVERALL_RESULT_FALSE = 12
RC_RIM_FORBIDDEN = 101
RC_RIM_INTERNAL_ERROR = 102
RC_RIM_NOT_FOUND = 104
RC_OCSP_SERVER_ERROR = 202
RC_OCSP_FORBIDDEN = 205
RC_POLICY_EVALUATION_ERROR = 301
RC_NVML_INIT_FAILED = 500
RC_NVML_ERROR = 501
RC_GPU_ARCHITECTURE_NOT_SUPPORTED = 502
RC_GPU_EVIDENCE_INVALID = 503
RC_GPU_EVIDENCE_NONCE_MISMATCH = 504
RC_GPU_EVIDENCE_INVALID_SIGNATURE = 508
RC_GPU_MODE_NOT_SUPPORTED = 509
RC_NSCQ_INIT_FAILED = 600  # [U] the numeric value; the name is the SDK's
RC_CERT_CHAIN_VERIFICATION_FAILURE = 802
RESULT_MESSAGES: dict[int, str] = {
    0: "Ok",
    1: "Unknown",
    2: "Internal Error",
    3: "Not initialized",
    4: "Bad Argument",
    5: "Allocation Failed",
    6: "Feature is not enabled",
    7: "XML Initialization Failed",
    10: "LibXml2 Error",
    11: "Relying Party Policy Mismatch",
    12: "Overall Attestation Result is False",
    13: "JSON Serialization Error",
    14: "Cache Object Not Found",
    101: "RIM Forbidden",
    102: "RIM Internal Error",
    103: "RIM Connection Error",
    104: "RIM Not Found",
    105: "RIM Invalid Signature",
    106: "RIM Invalid Schema",
    107: "RIM Measurement Not Found",
    108: "RIM Measurement Conflict",
    201: "OCSP Invalid Response",
    202: "OCSP Server Error",
    203: "OCSP Invalid Request",
    204: "OCSP Status Not Good",
    205: "OCSP Forbidden",
    301: "Policy Evaluation Error",
    401: "SPDM Parse Error",
    402: "SPDM Opaque Data Parse Error",
    403: "SPDM Measurement Record Parse Error",
    404: "SPDM Request Parse Error",
    405: "SPDM Field Not Found",
    500: "NVML Initialization Failed",
    501: "NVML Error",
    502: "GPU Architecture Not Supported",
    503: "GPU Evidence Invalid",
    504: "GPU Evidence Nonce Mismatch",
    505: "GPU Evidence Driver RIM Version Mismatch",
    506: "GPU Evidence VBios RIM Version Mismatch",
    507: "GPU Evidence FWID Mismatch",
    508: "GPU Evidence Invalid Signature",
    509: "GPU is neither in CC nor in PPCIe mode",
    510: "GPU FW version exceeds SDK support",
    600: "NSCQ Initialization Failed",
    700: "NRAS Attestation Error",
    701: "NRAS Token Invalid",
    702: "NRAS Forbidden",
    800: "Certificate FWID Not Found",
    801: "Certificate Not Found",
    802: "Certificate Chain Verification Failure",
}
# Codes after which the document carries claims and the detached EAT (attest.cpp to_json).
RC_WITH_CLAIMS = (RC_OK, RC_RP_POLICY_MISMATCH, RC_OVERALL_RESULT_FALSE)

NVML_ARCH_HOPPER, NVML_ARCH_BLACKWELL = 9, 10
NVML_CC_FEATURE_ENABLED = 1
NVML_MULTIGPU_PROTECTED_PCIE = 1


def result_message(rc: int) -> str:
    return RESULT_MESSAGES.get(rc, "Undefined")


def exit_status(rc: int) -> int:
    """``main`` returns the uint16 nvat_rc_t; the kernel keeps its low 8 bits."""
    return rc % 256


class NvatError(Exception):
    """A failed step: the nvat_rc_t it ends the run with, and the SDK's log line."""

    def __init__(self, rc: int, message: str) -> None:
        super().__init__(message)
        self.rc = rc
        self.message = message


# --- logging ---------------------------------------------------------------------------------

LEVELS = ("trace", "debug", "info", "warn", "error", "off")


@dataclass
class Log:
    """spdlog on stderr, at or above ``level``."""

    stream: TextIO
    level: str = "info"

    def emit(self, level: str, message: str) -> None:
        if self.level == "off" or LEVELS.index(level) < LEVELS.index(self.level):
            return
        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        shown = "warning" if level == "warn" else level
        self.stream.write(f"[{stamp}] [nvattest] [{shown}] {message}\n")

    def debug(self, message: str) -> None:
        self.emit("debug", message)

    def info(self, message: str) -> None:
        self.emit("info", message)

    def error(self, message: str) -> None:
        self.emit("error", message)


# --- NVML (nvml.h layouts) -------------------------------------------------------------------


class _CcState(ctypes.Structure):
    _fields_ = [
        ("environment", ctypes.c_uint),
        ("ccFeature", ctypes.c_uint),
        ("devToolsMode", ctypes.c_uint),
    ]


class _CcSettings(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("environment", ctypes.c_uint),
        ("ccFeature", ctypes.c_uint),
        ("devToolsMode", ctypes.c_uint),
        ("multiGpuMode", ctypes.c_uint),
    ]


class _Certificate(ctypes.Structure):
    _fields_ = [
        ("certChainSize", ctypes.c_uint),
        ("attestationCertChainSize", ctypes.c_uint),
        ("certChain", ctypes.c_ubyte * 0x1000),
        ("attestationCertChain", ctypes.c_ubyte * 0x1400),
    ]


class _Report(ctypes.Structure):
    _fields_ = [
        ("isCecAttestationReportPresent", ctypes.c_uint),
        ("attestationReportSize", ctypes.c_uint),
        ("cecAttestationReportSize", ctypes.c_uint),
        ("nonce", ctypes.c_ubyte * NONCE_SIZE),
        ("attestationReport", ctypes.c_ubyte * 0x2000),
        ("cecAttestationReport", ctypes.c_ubyte * 0x1000),
    ]


SETTINGS_V1 = ctypes.sizeof(_CcSettings) | (1 << 24)
UUID_BUFFER_SIZE = 80
# Every symbol the SDK's collector loads (nvml_client.cpp load_all_symbols), less
# nvmlDeviceGetBoardId, which the testbed's library does not export: the board id is 0 here.
REQUIRED_SYMBOLS = (
    "nvmlInit_v2",
    "nvmlShutdown",
    "nvmlErrorString",
    "nvmlSystemGetConfComputeState",
    "nvmlSystemGetConfComputeSettings",
    "nvmlSystemGetDriverVersion",
    "nvmlDeviceGetCount_v2",
    "nvmlDeviceGetHandleByIndex_v2",
    "nvmlDeviceGetConfComputeGpuCertificate",
    "nvmlDeviceGetConfComputeGpuAttestationReport",
    "nvmlDeviceGetVbiosVersion",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetArchitecture",
)


@dataclass(frozen=True)
class GpuEvidence:
    """What the collector hands the verifier for one GPU."""

    index: int
    uuid: str
    architecture: int
    report: bytes
    cert_chain: bytes  # PEM, leaf first
    nonce: bytes  # the nonce the verifier expects (the caller's)


class Nvml:
    """The NVML library, loaded with ctypes; every call checked."""

    def __init__(self, library: Path) -> None:
        try:
            self.lib = ctypes.CDLL(str(library))
        except OSError as exc:
            raise NvatError(RC_NVML_INIT_FAILED, f"Failed to load NVML library: {exc}") from None
        missing = [name for name in REQUIRED_SYMBOLS if not hasattr(self.lib, name)]
        if missing:
            raise NvatError(
                RC_NVML_INIT_FAILED, f"Failed to load required NVML symbols: {', '.join(missing)}"
            )
        self.lib.nvmlErrorString.restype = ctypes.c_char_p
        self.lib.nvmlErrorString.argtypes = [ctypes.c_int]

    def error_string(self, rc: int) -> str:
        text = self.lib.nvmlErrorString(rc)
        return text.decode("ascii", "replace") if isinstance(text, bytes) else str(rc)

    def call(self, name: str, *args: Any) -> int:
        function = getattr(self.lib, name)
        function.restype = ctypes.c_int
        rc: int = function(*args)
        return rc

    def check(self, name: str, what: str, *args: Any) -> None:
        rc = self.call(name, *args)
        if rc != 0:
            raise NvatError(RC_NVML_ERROR, f"{what}: {self.error_string(rc)} (NVML code {rc})")


def collect_nvml(
    library: Path, nonce: bytes, *, ask_nonce: bytes | None = None
) -> list[GpuEvidence]:
    """collect_evidence_nvml: the evidence of every GPU, in NVML index order. ``ask_nonce`` is
    what is passed to the driver (the ``nonce-mismatch`` fault); ``nonce`` what is expected."""
    nvml = Nvml(library)
    rc = nvml.call("nvmlInit_v2")
    if rc != 0:
        raise NvatError(
            RC_NVML_INIT_FAILED,
            f"Failed to initialize NVML: {nvml.error_string(rc)} (NVML code {rc})",
        )
    try:
        state = _CcState()
        nvml.check("nvmlSystemGetConfComputeState", "CC feature error", ctypes.byref(state))
        settings = _CcSettings(version=SETTINGS_V1)
        nvml.check(
            "nvmlSystemGetConfComputeSettings", "PPCIe feature error", ctypes.byref(settings)
        )
        cc = state.ccFeature == NVML_CC_FEATURE_ENABLED
        ppcie = settings.multiGpuMode == NVML_MULTIGPU_PROTECTED_PCIE
        if not cc and not ppcie:
            raise NvatError(
                RC_GPU_MODE_NOT_SUPPORTED,
                "GPU must be running in CC or PPCIe mode to collect evidence through NVML",
            )
        count = ctypes.c_uint(0)
        nvml.check("nvmlDeviceGetCount_v2", "Failed to get NVML device count", ctypes.byref(count))
        if count.value == 0:
            raise NvatError(RC_NVML_ERROR, "No GPUs available")
        if len(nonce) != NONCE_SIZE:
            raise NvatError(
                RC_NVML_ERROR,
                f"Provided nonce size ({len(nonce)}) does not match required size ({NONCE_SIZE}).",
            )
        out = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            nvml.check(
                "nvmlDeviceGetHandleByIndex_v2",
                f"Failed to get handle for GPU index {index}",
                ctypes.c_uint(index),
                ctypes.byref(handle),
            )
            arch = ctypes.c_uint(0xFFFFFFFF)
            nvml.check(
                "nvmlDeviceGetArchitecture",
                "Failed to get GPU architecture",
                handle,
                ctypes.byref(arch),
            )
            uuid_buf = ctypes.create_string_buffer(UUID_BUFFER_SIZE)
            nvml.check(
                "nvmlDeviceGetUUID",
                "Failed to get UUID",
                handle,
                uuid_buf,
                ctypes.c_uint(UUID_BUFFER_SIZE),
            )
            report = _Report()
            ctypes.memmove(report.nonce, ask_nonce or nonce, NONCE_SIZE)
            nvml.check(
                "nvmlDeviceGetConfComputeGpuAttestationReport",
                "Failed to fetch attestation report",
                handle,
                ctypes.byref(report),
            )
            size = min(report.attestationReportSize, ctypes.sizeof(report.attestationReport))
            if size == 0:
                raise NvatError(RC_NVML_ERROR, "Fetched attestation report is empty.")
            cert = _Certificate()
            nvml.check(
                "nvmlDeviceGetConfComputeGpuCertificate",
                "Failed to get GPU certificate",
                handle,
                ctypes.byref(cert),
            )
            chain_size = min(
                cert.attestationCertChainSize, ctypes.sizeof(cert.attestationCertChain)
            )
            out.append(
                GpuEvidence(
                    index=index,
                    uuid=uuid_buf.value.decode("ascii", "replace"),
                    architecture=arch.value,
                    report=bytes(report.attestationReport[:size]),
                    cert_chain=bytes(cert.attestationCertChain[:chain_size]),
                    nonce=nonce,
                )
            )
        return out
    finally:
        nvml.call("nvmlShutdown")


# --- the attestation report ------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    """A parsed report (the SPDM GET_MEASUREMENTS request and response, fake_nvml.c layout)."""

    request_nonce: bytes
    blocks: dict[int, bytes]
    opaque: dict[int, bytes]

    def text(self, kind: int) -> str:
        value = self.opaque.get(kind)
        if value is None:
            raise NvatError(RC_GPU_EVIDENCE_INVALID, f"opaque data field {kind} not found")
        return value.rstrip(b"\0").decode("ascii", "replace")

    @property
    def driver_version(self) -> str:
        return self.text(3)

    @property
    def uuid(self) -> str:
        return self.text(4)

    @property
    def vbios_version(self) -> str:
        return self.text(6).upper()


REQUEST_LENGTH = 37


def parse_report(data: bytes) -> Report:
    """The SPDM 1.1 request and response of a report (its signature excluded); raises
    NvatError(503) for anything malformed."""

    def bad(why: str) -> NvatError:
        return NvatError(RC_GPU_EVIDENCE_INVALID, f"Failed to parse SPDM report: {why}")

    body = data[:-SIGNATURE_SIZE]
    if len(body) < REQUEST_LENGTH + 8 or body[0] != 0x11 or body[1] != 0xE0:
        raise bad("not an SPDM 1.1 GET_MEASUREMENTS request")
    nonce = body[4 : 4 + NONCE_SIZE]
    at = REQUEST_LENGTH
    if body[at] != 0x11 or body[at + 1] != 0x60:
        raise bad("not an SPDM 1.1 MEASUREMENTS response")
    count = body[at + 4]
    record_length = int.from_bytes(body[at + 5 : at + 8], "little")
    at += 8
    record = body[at : at + record_length]
    if len(record) != record_length:
        raise bad("measurement record truncated")
    blocks: dict[int, bytes] = {}
    pos = 0
    while pos < record_length:
        if pos + 4 > record_length:
            raise bad("measurement block header truncated")
        index, _spec, size = struct.unpack_from("<BBH", record, pos)
        block = record[pos + 4 : pos + 4 + size]
        if len(block) != size or size < 3:
            raise bad(f"measurement block {index} truncated")
        value_size = int.from_bytes(block[1:3], "little")
        value = block[3 : 3 + value_size]
        if len(value) != value_size or index in blocks:
            raise bad(f"measurement block {index} malformed")
        blocks[index] = value
        pos += 4 + size
    if len(blocks) != count:
        raise bad("measurement block count mismatch")
    at += record_length + NONCE_SIZE
    if at + 2 > len(body):
        raise bad("opaque data length missing")
    opaque_length = int.from_bytes(body[at : at + 2], "little")
    at += 2
    opaque_bytes = body[at : at + opaque_length]
    if len(opaque_bytes) != opaque_length or at + opaque_length != len(body):
        raise bad("opaque data length does not match the report size")
    opaque: dict[int, bytes] = {}
    pos = 0
    while pos < opaque_length:
        if pos + 4 > opaque_length:
            raise bad("opaque field header truncated")
        kind, size = struct.unpack_from("<HH", opaque_bytes, pos)
        value = opaque_bytes[pos + 4 : pos + 4 + size]
        if len(value) != size:
            raise bad(f"opaque field {kind} truncated")
        opaque[kind] = value
        pos += 4 + size
    return Report(request_nonce=nonce, blocks=blocks, opaque=opaque)


def load_chain(pem: bytes) -> list[x509.Certificate]:
    """X509CertChain::create_from_cert_chain_str: a parse failure is an internal error."""
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise NvatError(
            RC_INTERNAL_ERROR, "Failed to parse attestation certificate chain"
        ) from None
    if not chain:
        raise NvatError(RC_INTERNAL_ERROR, "Failed to parse attestation certificate chain")
    return chain


def verify_signature(report: bytes, leaf: x509.Certificate) -> None:
    """ECDSA P-384 over SHA-384 of everything before the 96-byte raw r||s signature."""
    key = leaf.public_key()
    if len(report) <= SIGNATURE_SIZE or not isinstance(key, ec.EllipticCurvePublicKey):
        raise NvatError(
            RC_GPU_EVIDENCE_INVALID_SIGNATURE, "Failed to verify attestation report signature"
        )
    body, raw = report[:-SIGNATURE_SIZE], report[-SIGNATURE_SIZE:]
    half = SIGNATURE_SIZE // 2
    signature = encode_dss_signature(
        int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    )
    try:
        key.verify(signature, body, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise NvatError(
            RC_GPU_EVIDENCE_INVALID_SIGNATURE, "Failed to verify attestation report signature"
        ) from None


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def verify_chain(
    chain: Sequence[x509.Certificate], root: x509.Certificate, now: dt.datetime
) -> dict[str, Any]:
    """The chain up to ``root`` (every link signed by the next; the last is the root or issued
    by it): raises NvatError(802) when it does not verify. Returns the ``{cert}`` claims before
    OCSP: ``x-nvidia-cert-status`` and the earliest expiry."""
    links = list(chain)
    if links[-1].fingerprint(hashes.SHA256()) != root.fingerprint(hashes.SHA256()):
        links.append(root)
    for child, parent in itertools.pairwise(links):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature):
            raise NvatError(
                RC_CERT_CHAIN_VERIFICATION_FAILURE,
                f"certificate {child.subject.rfc4514_string()} is not issued by "
                f"{parent.subject.rfc4514_string()}",
            ) from None
    status = "valid"
    if any(now > c.not_valid_after_utc for c in links):
        status = "expired"
    elif any(now < c.not_valid_before_utc for c in links):
        status = "invalid"
    return {
        "x-nvidia-cert-expiration-date": _iso(min(c.not_valid_after_utc for c in chain)),
        "x-nvidia-cert-status": status,
    }


# --- collateral (the testbed's RIM and OCSP, behind the fault knobs) --------------------------


@dataclass(frozen=True)
class Rim:
    """The testbed's reference (``write_reference``): the golden values for one driver/VBIOS."""

    driver: str
    vbios: str
    measurements: dict[int, str]

    @classmethod
    def load(cls, path: Path) -> Rim:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                driver=str(data["driver"]),
                vbios=str(data["vbios"]),
                measurements={int(k): str(v).lower() for k, v in data["measurements"].items()},
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise NvatError(RC_RIM_NOT_FOUND, f"no RIM at {path}") from None


@dataclass
class Collateral:
    """RIM and OCSP as this run sees them: the reference file, the URLs and the armed faults."""

    reference: Path
    rim_url: str
    ocsp_url: str
    faults: Faults | None
    log: Log
    rim_dir: Path | None = None  # ``--rim-store dir``: RIM files, not the RIM service
    _taken: dict[str, Fault | None] = field(default_factory=dict)

    def fault(self, name: str) -> Fault | None:
        if name not in self._taken:
            self._taken[name] = self.faults.take(name) if self.faults else None
            fault = self._taken[name]
            if fault is not None and fault.latency_s > 0:
                time.sleep(fault.latency_s)
        return self._taken[name]

    @staticmethod
    def _reachable(url: str, fault: Fault | None, what: str) -> None:
        if not url.startswith(("http://", "https://")):
            # curl: unsupported protocol, a fatal libcurl error
            raise NvatError(
                RC_INTERNAL_ERROR, f"Fatal libcurl error code: Unsupported protocol ({url})"
            )
        if fault is not None and fault.down:
            raise NvatError(
                RC_INTERNAL_ERROR,
                f"Gave up HTTP request after 6 attempts for {what} {url}: "
                "Couldn't connect to server",
            )

    def ocsp(self, chain_name: str) -> dict[str, Any]:
        """The OCSP part of a ``{cert}`` claim for one chain."""
        fault = self.fault(FAULT_OCSP)
        self._reachable(self.ocsp_url, fault, "POST")
        if fault is not None and fault.status is not None and fault.status != 200:
            self.log.error(f"OCSP server returned HTTP status: {fault.status}")
            if fault.status in (401, 403):
                raise NvatError(RC_OCSP_FORBIDDEN, "OCSP forbidden")
            raise NvatError(RC_OCSP_SERVER_ERROR, "OCSP server error")
        inject = self.fault(FAULT)
        what = inject.inject if inject is not None else None
        revoked = what == "ocsp-revoked" and chain_name == "attestation-report"
        return {
            "x-nvidia-cert-ocsp-nonce-matches": what != "ocsp-nonce-mismatch",
            "x-nvidia-cert-ocsp-response-valid": True,
            "x-nvidia-cert-ocsp-status": "revoked" if revoked else "good",
            "x-nvidia-cert-revocation-reason": "keyCompromise" if revoked else None,
        }

    def rim(self, rim_id: str, want_version: str, kind: str) -> Rim:
        if self.rim_dir is not None:
            return self._rim_file(rim_id, want_version, kind)
        fault = self.fault(FAULT_RIM)
        url = f"{self.rim_url}/v1/rim/{rim_id}"
        self._reachable(self.rim_url, fault, "GET")
        if fault is not None and fault.status is not None and fault.status != 200:
            self.log.error(f"Non-200 response from {url}")
            if fault.status == 404:
                raise NvatError(RC_RIM_NOT_FOUND, f"RIM {rim_id} not found")
            if fault.status in (401, 403):
                raise NvatError(RC_RIM_FORBIDDEN, f"RIM {rim_id} forbidden")
            raise NvatError(RC_RIM_INTERNAL_ERROR, f"RIM service error for {rim_id}")
        rim = Rim.load(self.reference)
        have = rim.driver if kind == "driver" else rim.vbios
        if have.upper() != want_version.upper():
            self.log.error(f"Non-200 response from {url}")
            raise NvatError(RC_RIM_NOT_FOUND, f"RIM {rim_id} not found")
        return rim

    def _rim_file(self, rim_id: str, want_version: str, kind: str) -> Rim:
        """FilesystemRimStore: ``<rim-dir>/<rim id>.xml``, no RIM service, no RIM fault."""
        path = Path(self.rim_dir or ".") / f"{rim_id}.xml"
        try:
            # A file the operator put there, parsed by the standard library's expat.
            root = ElementTree.fromstring(path.read_bytes())  # noqa: S314
        except (OSError, ElementTree.ParseError):
            self.log.error(f"RIM file {path} not found or not XML")
            raise NvatError(RC_RIM_NOT_FOUND, f"RIM {rim_id} not found in {self.rim_dir}") from None
        version = root.get("version", "")
        measurements: dict[int, str] = {}
        for element in root.iter():
            if element.tag.rsplit("}", 1)[-1] == "Resource" and element.get("index"):
                measurements[int(element.get("index", "0"))] = element.get("Hash", "").lower()
        if version.upper() != want_version.upper() or not measurements:
            raise NvatError(RC_RIM_NOT_FOUND, f"RIM {rim_id} not found in {self.rim_dir}")
        other = "" if kind == "driver" else version
        return Rim(
            driver=version if kind == "driver" else other,
            vbios=version if kind == "vbios" else other,
            measurements=measurements,
        )


# --- claims and the detached EAT -------------------------------------------------------------


def _hex(data: bytes) -> str:
    return data.hex()


def mismatch_records(report: Report, rim: Rim) -> list[dict[str, Any]]:
    records = []
    for index in sorted(rim.measurements):
        golden = rim.measurements[index]
        runtime = report.blocks.get(index)
        if runtime is not None and _hex(runtime) == golden:
            continue
        records.append(
            {
                "goldenSize": len(golden) // 2,
                "goldenValue": golden,
                "index": index,
                "measurementSource": "Firmware" if index in VBIOS_BLOCKS else "Driver",
                "runtimeSize": len(runtime) if runtime is not None else 0,
                "runtimeValue": _hex(runtime) if runtime is not None else "",
            }
        )
    return records


def _cn(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


@dataclass(frozen=True)
class VerifyOptions:
    verify_rim_signatures: bool = True  # --no-verify-rim-signatures: the claims say false


def verify_gpu(
    evidence: GpuEvidence,
    root: x509.Certificate,
    collateral: Collateral,
    options: VerifyOptions,
    *,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The local verifier on one GPU's evidence (generate_claims_v3): its claims, or NvatError."""
    now = now or dt.datetime.now(dt.UTC)
    if evidence.architecture not in (NVML_ARCH_HOPPER, NVML_ARCH_BLACKWELL):
        raise NvatError(
            RC_GPU_ARCHITECTURE_NOT_SUPPORTED,
            f"Verifier does not support architecture: {evidence.architecture}",
        )
    chain = load_chain(evidence.cert_chain)
    report_bytes = evidence.report
    inject = collateral.fault(FAULT)
    if inject is not None and inject.inject == "bad-signature":
        flip = REQUEST_LENGTH + 8 + 7  # the first byte of measurement block 1's value
        report_bytes = (
            report_bytes[:flip] + bytes([report_bytes[flip] ^ 0x01]) + report_bytes[flip + 1 :]
        )
    verify_signature(report_bytes, chain[0])
    report = parse_report(report_bytes)
    driver, vbios = report.driver_version, report.vbios_version
    if report.request_nonce != evidence.nonce:
        raise NvatError(
            RC_GPU_EVIDENCE_NONCE_MISMATCH,
            f"Nonce mismatch. nonce_from_ar: {_hex(report.request_nonce)} "
            f"m_nonce: {_hex(evidence.nonce)}",
        )
    ar_chain = verify_chain(chain, root, now) | collateral.ocsp("attestation-report")
    device = chain[1] if len(chain) > 1 else chain[0]
    driver_rim = collateral.rim(f"NV_GPU_DRIVER_GH100_{driver}", driver, "driver")
    rim_chain = {
        "x-nvidia-cert-expiration-date": _iso(root.not_valid_after_utc),
        "x-nvidia-cert-status": "valid",
    }
    driver_rim_chain = rim_chain | collateral.ocsp("driver-rim")
    vbios_rim = collateral.rim(f"NV_GPU_VBIOS_{vbios.replace('.', '')}", vbios, "vbios")
    vbios_rim_chain = rim_chain | collateral.ocsp("vbios-rim")
    golden = Rim(
        driver=driver_rim.driver,
        vbios=vbios_rim.vbios,
        measurements={i: v for i, v in driver_rim.measurements.items() if i not in VBIOS_BLOCKS}
        | {i: v for i, v in vbios_rim.measurements.items() if i in VBIOS_BLOCKS},
    )
    mismatches = mismatch_records(report, golden)
    success = not mismatches
    return {
        "dbgstat": "disabled" if success else None,
        "eat_nonce": _hex(evidence.nonce),
        "hwmodel": _cn(device),
        "measres": "success" if success else "fail",
        "oemid": OEM_ID,
        "secboot": True if success else None,
        "ueid": str(device.serial_number),
        "x-nvidia-device-type": "gpu",
        "x-nvidia-gpu-arch-check": True,
        "x-nvidia-gpu-attestation-report-cert-chain": ar_chain,
        "x-nvidia-gpu-attestation-report-cert-chain-fwid-match": True,
        "x-nvidia-gpu-attestation-report-nonce-match": True,
        "x-nvidia-gpu-attestation-report-parsed": True,
        "x-nvidia-gpu-attestation-report-signature-verified": True,
        "x-nvidia-gpu-claims-version": CLAIMS_VERSION,
        "x-nvidia-gpu-driver-rim-cert-chain": driver_rim_chain,
        "x-nvidia-gpu-driver-rim-fetched": True,
        "x-nvidia-gpu-driver-rim-measurements-available": True,
        "x-nvidia-gpu-driver-rim-signature-verified": options.verify_rim_signatures,
        "x-nvidia-gpu-driver-rim-version-match": True,
        "x-nvidia-gpu-driver-version": driver,
        "x-nvidia-gpu-vbios-index-no-conflict": True,
        "x-nvidia-gpu-vbios-rim-cert-chain": vbios_rim_chain,
        "x-nvidia-gpu-vbios-rim-fetched": True,
        "x-nvidia-gpu-vbios-rim-measurements-available": True,
        "x-nvidia-gpu-vbios-rim-signature-verified": options.verify_rim_signatures,
        "x-nvidia-gpu-vbios-rim-version-match": True,
        "x-nvidia-gpu-vbios-version": vbios,
        "x-nvidia-mismatch-measurement-records": mismatches or None,
    }


CHAIN_CLAIMS = (
    "x-nvidia-gpu-attestation-report-cert-chain",
    "x-nvidia-gpu-driver-rim-cert-chain",
    "x-nvidia-gpu-vbios-rim-cert-chain",
)


def overall_result(claims: Sequence[Mapping[str, Any]]) -> bool:
    """The SDK's built-in overall-result policy (claims_evaluator.cpp)."""
    if not claims:
        return False
    for claim in claims:
        if claim.get("measres") != "success":
            return False
        for name in CHAIN_CLAIMS:
            chain = claim.get(name)
            if not isinstance(chain, Mapping):
                return False
            if (
                chain.get("x-nvidia-cert-status") != "valid"
                or chain.get("x-nvidia-cert-ocsp-status") != "good"
                or chain.get("x-nvidia-cert-ocsp-nonce-matches") is not True
                or chain.get("x-nvidia-cert-ocsp-response-valid") is not True
            ):
                return False
    return True


def _compact(data: Any) -> bytes:
    """nlohmann::json::dump(): compact, keys sorted, UTF-8."""
    return json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned_jwt(payload: Mapping[str, Any]) -> str:
    """A JWT with header ``{"alg":"none"}`` and an empty signature (local mode, no key)."""
    return f"{_b64url(_compact({'alg': 'none'}))}.{_b64url(_compact(payload))}."


def detached_eat(
    claims: Sequence[Mapping[str, Any]], nonce_hex: str, *, now: int | None = None
) -> list[Any]:
    """``[["JWT", <overall>], {"GPU-0": <jwt>, ...}]`` (claims.cpp get_detached_eat)."""
    iat = int(time.time()) if now is None else now
    submods: dict[str, str] = {}
    for index, claim in enumerate(claims):
        payload = dict(claim) | {
            "iat": iat,
            "exp": iat + EAT_LIFETIME_S,
            "jti": secrets.token_hex(32),
            "iss": ISSUER,
        }
        submods[f"GPU-{index}"] = unsigned_jwt(payload)
    overall = {
        "eat_nonce": nonce_hex,
        "exp": iat + EAT_LIFETIME_S,
        "iat": iat,
        "iss": ISSUER,
        "jti": secrets.token_hex(32),
        "sub": SUBJECT,
        "submods": {
            name: ["DIGEST", ["SHA256", hashlib.sha256(token.encode("ascii")).hexdigest()]]
            for name, token in submods.items()
        },
        "x-nvidia-overall-att-result": overall_result(claims),
        "x-nvidia-ver": CLAIMS_VERSION,
    }
    return [["JWT", unsigned_jwt(overall)], submods]


def attest_document(
    rc: int, claims: Sequence[Mapping[str, Any]] = (), eat: Any = None
) -> dict[str, Any]:
    """AttestOutput::to_json: claims and EAT only after 0, 11 or 12; else ``{}`` each."""
    with_claims = rc in RC_WITH_CLAIMS
    return {
        "claims": list(claims) if with_claims else {},
        "detached_eat": eat if with_claims and eat is not None else {},
        "result_code": rc,
        "result_message": result_message(rc),
    }


def render(document: Mapping[str, Any]) -> str:
    """``json.dump(4)`` and ``std::endl``."""
    return json.dumps(document, indent=4, sort_keys=True, ensure_ascii=False) + "\n"


# --- the run ---------------------------------------------------------------------------------


def parse_nonce(text: str) -> bytes:
    """nvat_nonce_from_hex: optional ``0x``, even length, hex, at least 32 bytes."""
    digits = text[2:] if text[:2] in ("0x", "0X") else text
    try:
        value = bytes.fromhex(digits) if len(digits) % 2 == 0 and digits.strip() == digits else None
    except ValueError:
        value = None
    if value is None or len(value) < NONCE_SIZE:
        raise NvatError(RC_BAD_ARGUMENT, f"invalid nonce {text!r}: need at least 32 bytes of hex")
    return value


@dataclass(frozen=True)
class Bed:
    """Where the stand-in finds its testbed."""

    directory: Path

    @property
    def gpu(self) -> Path:
        return self.directory / "gpu"

    @property
    def library(self) -> Path:
        return Path(os.environ.get(LIBRARY_ENV) or self.gpu / "lib" / "libnvidia-ml.so.1")

    @property
    def root(self) -> Path:
        return self.gpu / "nvidia-root.pem"

    @property
    def reference(self) -> Path:
        return self.gpu / "reference-measurements.json"

    @property
    def faults(self) -> Faults:
        return Faults(self.directory / "faults.json")

    @property
    def log_path(self) -> Path:
        return self.directory / "run" / LOG_FILE


def _log_run(bed: Bed, argv: Sequence[str]) -> None:
    shown = list(argv)
    for i, arg in enumerate(shown):
        if arg == "--service-key" and i + 1 < len(shown):
            shown[i + 1] = f"<{len(shown[i + 1])} chars>"
        elif arg.startswith("--service-key="):
            shown[i] = f"--service-key=<{len(arg) - len('--service-key=')} chars>"
    env = {
        k: (f"<{len(v)} chars>" if k == "NV_ATTESTATION_SERVICE_KEY" else v)
        for k, v in os.environ.items()
        if k.startswith("NVAT_") or k == "NV_ATTESTATION_SERVICE_KEY"
    }
    entry = {"time": round(time.time(), 3), "pid": os.getpid(), "argv": shown[1:], "env": env}
    try:
        bed.log_path.parent.mkdir(parents=True, exist_ok=True)
        with bed.log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only testbed directory: the run goes on, unlogged


CORELIB_REFUSED = (
    "The corelib evidence source is only supported with the collect-evidence subcommand."
)


def _collect(bed: Bed, opts: cli.Options, nonce: bytes, ask: bytes | None) -> list[GpuEvidence]:
    """The evidence the options select: NVML only (the testbed has no NSCQ, no corelib)."""
    if opts.text("device") == "nvswitch":
        raise NvatError(RC_NSCQ_INIT_FAILED, "Failed to load libnvidia-nscq (no NVSwitch here)")
    source = opts.text("gpu_evidence_source")
    if source == "corelib":
        raise NvatError(RC_BAD_ARGUMENT, CORELIB_REFUSED)
    if source == "file":
        return evidence_from_file(Path(opts.text("gpu_evidence_file")))
    # The library finds its state through this variable; the tool is bound to its testbed.
    os.environ.setdefault(STATE_ENV, str(bed.gpu / "state"))
    return collect_nvml(bed.library, nonce, ask_nonce=ask)


def evidence_from_file(path: Path) -> list[GpuEvidence]:
    """``--gpu-evidence-source file``: collect-evidence's ``evidences`` (or the document holding
    them), re-appraised; each evidence carries its own nonce (the SDK's from_json)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        items = data["evidences"] if isinstance(data, dict) else data
        out = []
        for index, item in enumerate(items):
            arch = {"HOPPER": NVML_ARCH_HOPPER, "BLACKWELL": NVML_ARCH_BLACKWELL}[
                str(item["arch"]).upper()
            ]
            out.append(
                GpuEvidence(
                    index=index,
                    uuid="",
                    architecture=arch,
                    report=base64.b64decode(item["evidence"], validate=True),
                    cert_chain=base64.b64decode(item["certificate"], validate=True),
                    nonce=bytes.fromhex(item["nonce"]),
                )
            )
    except (OSError, ValueError, KeyError, TypeError):
        raise NvatError(RC_BAD_ARGUMENT, f"cannot read GPU evidence from {path}") from None
    if not out:
        raise NvatError(RC_BAD_ARGUMENT, f"no GPU evidence in {path}")
    return out


def _nonce(opts: cli.Options) -> bytes:
    text = opts.text("nonce")
    return parse_nonce(text) if text else secrets.token_bytes(NONCE_SIZE)


def _asked(inject: Fault | None) -> bytes | None:
    """The nonce passed to the driver under the ``nonce-mismatch`` fault (a replayed report)."""
    if inject is not None and inject.inject == "nonce-mismatch":
        return secrets.token_bytes(NONCE_SIZE)
    return None


def run_attest(bed: Bed, opts: cli.Options, log: Log) -> dict[str, Any]:
    """``attest``: the document the real tool prints with ``--format json``."""
    try:
        if opts.text("relying_party_policy"):
            raise NvatError(
                RC_POLICY_EVALUATION_ERROR,
                "testbed nvattest: relying-party (Rego) policies are not evaluated by the stand-in",
            )
        nonce = _nonce(opts)
        collateral = Collateral(
            reference=bed.reference,
            rim_url=opts.text("rim_url").rstrip("/"),
            ocsp_url=opts.text("ocsp_url"),
            faults=bed.faults,
            log=log,
            rim_dir=Path(opts.text("rim_dir")) if opts.text("rim_store") == "dir" else None,
        )
        evidence = _collect(bed, opts, nonce, _asked(collateral.fault(FAULT)))
        if opts.text("verifier") == "remote":
            url = opts.text("nras_url").rstrip("/") + "/v4/attest/gpu"
            raise NvatError(
                RC_INTERNAL_ERROR,
                f"Gave up HTTP request after 6 attempts for POST {url} (no NRAS in the testbed)",
            )
        try:
            root = x509.load_pem_x509_certificate(bed.root.read_bytes())
        except (OSError, ValueError):
            raise NvatError(RC_INTERNAL_ERROR, f"cannot read the GPU root {bed.root}") from None
        verify = VerifyOptions(verify_rim_signatures=opts.switch("verify_rim_signatures"))
        claims = [verify_gpu(ev, root, collateral, verify) for ev in evidence]
    except NvatError as exc:
        log.error(exc.message)
        return attest_document(exc.rc)
    rc = RC_OK if overall_result(claims) else RC_OVERALL_RESULT_FALSE
    return attest_document(rc, claims, detached_eat(claims, _hex(evidence[0].nonce)))


def run_collect(bed: Bed, opts: cli.Options, log: Log) -> dict[str, Any]:
    """``collect-evidence``: ``{result_code, result_message, evidences}``."""
    try:
        nonce = _nonce(opts)
        evidence = _collect(bed, opts, nonce, _asked(bed.faults.take(FAULT)))
    except NvatError as exc:
        log.error(exc.message)
        return {"evidences": None, "result_code": exc.rc, "result_message": result_message(exc.rc)}
    return {
        "evidences": [
            {
                "arch": "HOPPER" if ev.architecture == NVML_ARCH_HOPPER else "BLACKWELL",
                "certificate": base64.b64encode(ev.cert_chain).decode("ascii"),
                "evidence": base64.b64encode(ev.report).decode("ascii"),
                "nonce": _hex(ev.nonce),
            }
            for ev in evidence
        ],
        "result_code": RC_OK,
        "result_message": result_message(RC_OK),
    }


def main(
    argv: Sequence[str] | None = None,
    *,
    testbed_dir: str | Path,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the stand-in with ``argv`` (``argv[0]`` the program name); returns its exit status."""
    argv = list(sys.argv if argv is None else argv)
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    bed = Bed(Path(testbed_dir))
    _log_run(bed, argv)
    try:
        opts = cli.parse(argv[1:])
    except cli.CliError as exc:
        err.write(f"{exc.message}\nRun with --help for more information.\n")
        return exc.exit_code
    if opts.help or opts.command is None:
        out.write(cli.HELP + "\n")
        return 0
    log = Log(err, opts.text("log_level"))
    if opts.command == "version":
        err.write(f"nvattest {VERSION} (linux/{os.uname().machine})\n")
        return 0
    if opts.command == "collect-evidence":
        document = run_collect(bed, opts, log)
    else:
        document = run_attest(bed, opts, log)
    rc = int(document["result_code"])
    if opts.text("format") == "json":
        out.write(render(document))
    elif rc == RC_OK:
        log.info(
            "GPU attestation was successful" if opts.command == "attest" else "Evidence collected"
        )
    else:
        log.emit("error", "GPU attestation failed!")
        log.emit("error", f"Error {rc:03d}: {result_message(rc)}")
    out.flush()
    return exit_status(rc)


if __name__ == "__main__":
    directory = os.environ.get("CONFINFER_TESTBED_DIR")
    if not directory:
        sys.stderr.write("testbed.nvattest: run DIR/bin/nvattest, or set CONFINFER_TESTBED_DIR\n")
        sys.exit(1)
    sys.exit(main(sys.argv, testbed_dir=directory))
