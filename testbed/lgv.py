"""A strict stand-in for NVIDIA's legacy Python local GPU verifier (LGV) in its own venv.

``python -m testbed up`` writes ``DIR/lgv``, a virtualenv whose ``bin/python`` is this testbed's
interpreter and whose site-packages hold a stand-in ``verifier`` package (and the dist-info of
``nv-local-gpu-verifier`` 2.7.3), bound to the testbed in ``DIR``. A ``.pth`` file puts the
testbed and this interpreter's libraries (cryptography) on its path; the ``-I`` flag its callers
use does not change that. The package keeps the Python API of the real wheel
(``verifier/cc_admin.py``, ``cc_admin_utils.py``, ``nvml/__init__.py``, ``config.py``,
``utils/claims_utils.py``), because attestd's LGV runner depends on it:

- ``cc_admin.collect_gpu_evidence_local(nonce_hex, ppcie_mode=True, no_gpu_mode=False)`` gets
  each GPU's evidence from the NVML library (``CONFINFER_NVML_LIBRARY``, else
  ``DIR/gpu/lib/libnvidia-ml.so.1``) with the caller's 32-byte nonce; it raises ``Exception(
  "Error occurred while collecting GPU evidence")`` from the cause, as the real one does;
- ``cc_admin.attest(arguments, nonce_hex, evidence_list) -> (bool, detached_eat)`` reads the
  options the real one reads (a missing key fails the run), refuses local RIM files and
  ``test_no_gpu``, verifies in the real order (architecture, report parsed, attestation
  certificate chain to the testbed's GPU root and its OCSP status, the report's nonce, its
  signature, the driver and VBIOS RIMs from the RIM service with their OCSP status, the
  measurements), catches its own exceptions (logged with ``event_log.exception``) and returns the
  claims (2.0 or 3.0, as ``claims_version`` asks) in HS256 JWTs signed with ``"secret"``; the
  overall token lists each GPU token by the SHA-256 of ``json.dumps`` of its claims before the
  time claims. The overall result is kept as the real one computes it, a later GPU's exception
  included (it does not clear an earlier GPU's success);
- ``user_mode`` false sets the GPU ready state through NVML, as the real one does;
- the RIM service and the OCSP responder are ``CcAdminUtils.fetch_rim_file`` and
  ``.send_ocsp_request``: the testbed's reference measurements (``DIR/gpu/reference-
  measurements.json``) and a responder that answers for the testbed's chains. They fail the way
  ``urllib`` does (``URLError``, ``HTTPError``, wrapped as the real code wraps them);
- importing it logs to stdout and (re)creates ``./verifier.log``, as the real ``config.py`` does.

Fault knobs (testbed.faults), the stand-in nvattest's, since they model the GPU and NVIDIA's
services whichever verifier asks: ``nvattest`` (``inject`` ``nonce-mismatch``, ``bad-signature``,
``ocsp-revoked``, ``ocsp-nonce-mismatch``; ``latency_s`` before the evidence is collected),
``nvattest-rim`` and ``nvattest-ocsp`` (``down``, ``status``, ``latency_s``), each taken once per
run that reaches it.
"""

from __future__ import annotations

import base64
import ctypes
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import platform
import secrets
import shutil
import string
import sys
import sysconfig
import time
import urllib.error
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

from cryptography import x509

from testbed import nvattest
from testbed.faults import Fault

PACKAGE_VERSION = "2.7.3"
VERIFIER_VERSION = "1.3.0"  # verifier/__about__.py of that wheel
VENV_DIR = "lgv"
ENV_NAME = "CONFINFER_TESTBED_LGV_VENV"
ISSUER = "LOCAL_GPU_VERIFIER"
SUBJECT = "NVIDIA-PLATFORM-ATTESTATION"
HS256_KEY = b"secret"  # the LGV's own, public: its tokens are no trust boundary
NONCE_SIZE = 32
DEFAULT_RIM_URL = "https://rim.attestation.nvidia.com/v1/rim/"
DEFAULT_OCSP_URL = "https://ocsp.ndis.nvidia.com/"
NVML_ARCHES = (nvattest.NVML_ARCH_HOPPER, nvattest.NVML_ARCH_BLACKWELL)

info_log = logging.getLogger("gpu-verifier-info")
event_log = logging.getLogger("gpu-verifier-event")


# --- the LGV's exceptions (verifier/exceptions/__init__.py) ------------------------------------


class Error(Exception):
    """Base of the LGV's errors."""


class AttestationReportError(Error):
    pass


class SignatureVerificationError(AttestationReportError):
    pass


class ParsingError(AttestationReportError):
    pass


class CertChainVerificationFailureError(AttestationReportError):
    pass


class NonceMismatchError(AttestationReportError):
    pass


class PynvmlError(Error):
    pass


class AttestationReportFetchError(PynvmlError):
    pass


class UnsupportedGpuArchitectureError(PynvmlError):
    pass


class NoGpuFoundError(PynvmlError):
    pass


class RIMError(Error):
    pass


class RIMFetchError(RIMError):
    pass


class RIMSchemaValidationError(RIMError):
    pass


class RIMVerificationFailureError(RIMError):
    pass


class VerifierError(Error):
    pass


class InvalidNonceError(Error):
    pass


class InvalidClaimsVersionError(Error):
    pass


class NVMLError(Exception):
    """pynvml's error: an NVML return code."""

    def __init__(self, value: int, text: str) -> None:
        super().__init__(text)
        self.value = value


# --- binding and settings --------------------------------------------------------------------

_bed: nvattest.Bed | None = None
_faults: dict[str, Fault | None] = {}


def bind(directory: str | Path) -> None:
    """Bind the stand-in to its testbed; set the loggers up as the real ``config.py`` does."""
    global _bed
    if _bed is not None:
        return
    _bed = nvattest.Bed(Path(directory))
    info_log.setLevel(logging.INFO)
    info_log.addHandler(logging.StreamHandler(sys.stdout))
    log_path = Path.cwd() / "verifier.log"
    log_path.unlink(missing_ok=True)
    event_log.setLevel(logging.DEBUG)
    event_log.addHandler(logging.FileHandler(log_path))
    event_log.info(f"Verifier version: {VERIFIER_VERSION}")


def bed() -> nvattest.Bed:
    if _bed is None:
        raise Error("the testbed's LGV is not bound to a testbed (import verifier first)")
    return _bed


def fault(name: str) -> Fault | None:
    """The knob ``name`` for this run: taken once, its latency slept once."""
    if name not in _faults:
        taken = bed().faults.take(name)
        _faults[name] = taken
        if taken is not None and taken.latency_s > 0:
            time.sleep(taken.latency_s)
    return _faults[name]


def _inject() -> str | None:
    knob = fault(nvattest.FAULT)
    return knob.inject if knob is not None else None


class BaseSettings:
    """The LGV's process-wide settings (class attributes, as in the real ``config.py``)."""

    SIZE_OF_NONCE_IN_BYTES = NONCE_SIZE
    SIZE_OF_NONCE_IN_HEX_STR = 2 * NONCE_SIZE
    MAX_NVML_TIME_DELAY = 30
    MAX_NETWORK_TIME_DELAY = 10
    OCSP_URL = os.environ.get("NV_OCSP_URL", DEFAULT_OCSP_URL)
    RIM_SERVICE_BASE_URL = os.environ.get("NV_RIM_URL", DEFAULT_RIM_URL)
    OCSP_NONCE_DISABLED = False
    CLAIMS_VERSION = "2.0"
    allow_hold_cert = False
    service_key: str | None = None

    @classmethod
    def set_ocsp_url(cls, url: object) -> None:
        if not isinstance(url, str):
            raise ValueError("Incorrect data type for the URL.")
        if not url:
            raise ValueError("OCSP URL is empty")
        cls.OCSP_URL = url if url.endswith("/") else url + "/"

    @classmethod
    def set_rim_service_base_url(cls, url: object) -> None:
        if not isinstance(url, str):
            raise ValueError("Incorrect data type for the URL.")
        if not url:
            raise ValueError("RIM URL is empty")
        cls.RIM_SERVICE_BASE_URL = url if url.endswith("/") else url + "/"

    @classmethod
    def set_service_key(cls, key: object) -> None:
        if not isinstance(key, str):
            raise ValueError("Incorrect data type for the service_key.")
        cls.service_key = key


HopperSettings = BaseSettings


# --- NVML (verifier/nvml/__init__.py) ----------------------------------------------------------


@dataclass
class GpuInfo:
    """One GPU's evidence, as the real ``NvmlHandler`` instance holds it."""

    evidence: nvattest.GpuEvidence
    report: bytes

    def get_uuid(self) -> str:
        return self.evidence.uuid

    def get_gpu_architecture(self) -> int:
        return self.evidence.architecture

    def get_attestation_report(self) -> bytes:
        return self.report

    def get_attestation_cert_chain(self) -> bytes:
        return self.evidence.cert_chain

    def _opaque(self, what: str) -> str:
        try:
            report = nvattest.parse_report(self.report)
            return report.driver_version if what == "driver" else report.vbios_version
        except nvattest.NvatError:
            return ""

    def get_driver_version(self) -> str:
        return self._opaque("driver")

    def get_vbios_version(self) -> str:
        return self._opaque("vbios")


class NvmlHandler:
    """The LGV's NVML calls, on the testbed's NVML library."""

    _nvml: nvattest.Nvml | None = None

    @classmethod
    def init_nvml(cls) -> None:
        os.environ.setdefault(nvattest.STATE_ENV, str(bed().gpu / "state"))
        try:
            nvml = nvattest.Nvml(bed().library)
        except nvattest.NvatError:
            raise NVMLError(12, "NVML Shared Library Not Found") from None
        rc = nvml.call("nvmlInit_v2")
        if rc != 0:
            raise NVMLError(rc, nvml.error_string(rc))
        cls._nvml = nvml

    @classmethod
    def _lib(cls) -> nvattest.Nvml:
        if cls._nvml is None:
            raise NVMLError(1, "Uninitialized")
        return cls._nvml

    @classmethod
    def _check(cls, name: str, *args: Any) -> None:
        nvml = cls._lib()
        rc = nvml.call(name, *args)
        if rc != 0:
            raise NVMLError(rc, nvml.error_string(rc))

    @classmethod
    def _state(cls) -> Any:
        state = nvattest._CcState()
        cls._check("nvmlSystemGetConfComputeState", ctypes.byref(state))
        return state

    @classmethod
    def is_cc_enabled(cls) -> bool:
        return bool(cls._state().ccFeature != 0)

    @classmethod
    def is_cc_dev_mode(cls) -> bool:
        return bool(cls._state().devToolsMode != 0)

    @classmethod
    def is_ppcie_mode_enabled(cls) -> bool:
        settings = nvattest._CcSettings(version=nvattest.SETTINGS_V1)
        cls._check("nvmlSystemGetConfComputeSettings", ctypes.byref(settings))
        return bool(settings.multiGpuMode == nvattest.NVML_MULTIGPU_PROTECTED_PCIE)

    @classmethod
    def get_gpu_ready_state(cls) -> int:
        value = ctypes.c_uint(0)
        cls._check("nvmlSystemGetConfComputeGpusReadyState", ctypes.byref(value))
        return int(value.value)

    @classmethod
    def set_gpu_ready_state(cls, state: bool) -> None:
        cls._check("nvmlSystemSetConfComputeGpusReadyState", ctypes.c_uint(1 if state else 0))


def init_nvml(ppcie_mode: bool) -> None:
    """cc_admin.init_nvml: NVML up, CC or PPCIe on (PPCIe refused in standalone mode)."""
    try:
        NvmlHandler.init_nvml()
        cc, ppcie = NvmlHandler.is_cc_enabled(), NvmlHandler.is_ppcie_mode_enabled()
        if not cc and not ppcie:
            raise Exception(  # the LGV raises a bare Exception here
                "System must be running in either confidential compute mode or PPCIE mode "
                "to perform attestation"
            )
        if ppcie and ppcie_mode:
            raise Exception("Attestation in standalone mode is not supported for PPCIE system")
    except Exception as error:
        raise Exception(
            f"Error occurred while initializing the NVML library due to {error}"
        ) from error


def collect_gpu_evidence(
    nonce: str, no_gpu_mode: bool = False, ppcie_mode: bool = True
) -> list[GpuInfo]:
    """One :class:`GpuInfo` per GPU, each report asked for ``nonce``."""
    _faults.clear()
    try:
        if no_gpu_mode:
            raise Error("the testbed's LGV has no test_no_gpu mode")
        fault(nvattest.FAULT)
        init_nvml(ppcie_mode)
        nonce_bytes = CcAdminUtils.validate_and_extract_nonce(nonce)
        asked = secrets.token_bytes(NONCE_SIZE) if _inject() == "nonce-mismatch" else None
        try:
            evidence = nvattest.collect_nvml(bed().library, nonce_bytes, ask_nonce=asked)
        except nvattest.NvatError as exc:
            if exc.message == "No GPUs available":
                raise NoGpuFoundError("No GPU found") from exc
            raise AttestationReportFetchError(
                "\tSomething went wrong while fetching the attestation report from the gpu."
            ) from NVMLError(15, exc.message)
        out = []
        for item in evidence:
            report = item.report
            if _inject() == "bad-signature":
                flip = nvattest.REQUEST_LENGTH + 8 + 7  # a byte of measurement block 1
                report = report[:flip] + bytes([report[flip] ^ 0x01]) + report[flip + 1 :]
            out.append(GpuInfo(item, report))
        info_log.info(f"Number of GPUs available : {len(out)}")
        return out
    except Exception as error:
        info_log.error(error)
        raise Exception("Error occurred while collecting GPU evidence") from error


def collect_gpu_evidence_local(
    nonce: str, ppcie_mode: bool = True, no_gpu_mode: bool = False
) -> list[GpuInfo]:
    return collect_gpu_evidence(nonce, no_gpu_mode, ppcie_mode)


# --- the RIM service and the OCSP responder (verifier/cc_admin_utils.py) -------------------------


@dataclass(frozen=True)
class OcspAnswer:
    status: str  # good | revoked
    revocation_reason: str | None
    nonce: bytes


def _reachable(url: str, knob: Fault | None) -> None:
    if not url.startswith(("http://", "https://")):
        raise urllib.error.URLError(f"unknown url type: {url}")
    if knob is not None and knob.down:
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))


def _http_error(url: str, status: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError(url, status, f"HTTP Error {status}", Message(), None)


class CcAdminUtils:
    """The LGV's helpers; its two network calls are the ones a caller may wrap."""

    @staticmethod
    def validate_and_extract_nonce(nonce_hex: str) -> bytes:
        if len(nonce_hex) == 2 * NONCE_SIZE and set(nonce_hex) <= set(string.hexdigits):
            return bytes.fromhex(nonce_hex)
        raise InvalidNonceError(
            "Invalid Nonce Size. The nonce should be 32 bytes in length represented as Hex String"
        )

    @staticmethod
    def fetch_rim_file(file_id: str) -> str:
        """The RIM with this id: the testbed's reference, if it is for that version."""
        url = BaseSettings.RIM_SERVICE_BASE_URL + file_id
        knob = fault(nvattest.FAULT_RIM)
        _reachable(BaseSettings.RIM_SERVICE_BASE_URL, knob)
        status = knob.status if knob is not None and knob.status is not None else 200
        reference = bed().reference
        try:
            text = reference.read_text(encoding="utf-8")
            rim = nvattest.Rim.load(reference)
        except (OSError, nvattest.NvatError):
            status = 404
        else:
            versions = {
                f"NV_GPU_DRIVER_GH100_{rim.driver}",
                f"NV_GPU_VBIOS_{rim.vbios.replace('.', '').upper()}",
            }
            if status == 200 and file_id not in versions:
                status = 404
        if status != 200:
            info_log.error("Could not fetch RIM file from RIM service with id : " + file_id)
            try:
                raise _http_error(url, status)
            except urllib.error.HTTPError as exc:
                raise RIMFetchError(
                    f"Unable to fetch RIM file from RIM service: {file_id}"
                ) from exc
        return text

    @staticmethod
    def send_ocsp_request(data: bytes) -> OcspAnswer:
        """The responder's answer for the chain and nonce in ``data``."""
        try:
            request = json.loads(data)
            knob = fault(nvattest.FAULT_OCSP)
            _reachable(BaseSettings.OCSP_URL, knob)
            if knob is not None and knob.status is not None and knob.status != 200:
                raise _http_error(BaseSettings.OCSP_URL, knob.status)
        except Exception as exc:
            raise Exception("OCSP request failed") from exc
        inject = _inject()
        revoked = inject == "ocsp-revoked" and request["chain"] == "attestation-report"
        nonce = bytes.fromhex(request["nonce"])
        return OcspAnswer(
            status="revoked" if revoked else "good",
            revocation_reason="key_compromise" if revoked else None,
            nonce=secrets.token_bytes(NONCE_SIZE) if inject == "ocsp-nonce-mismatch" else nonce,
        )


# --- verification (verifier/cc_admin.py attest) ------------------------------------------------


@dataclass
class ChainState:
    expiration: str | None = None
    status: str | None = None
    ocsp_status: str | None = None
    revocation_reason: str | None = None
    validated: bool | None = None


@dataclass
class GpuState:
    """What the checks of one GPU established (None: not reached)."""

    arch: bool | None = None
    driver_version: str | None = None
    vbios_version: str | None = None
    parsed: bool | None = None
    fwid_match: bool | None = None
    nonce_match: bool | None = None
    signature: bool | None = None
    report_chain: ChainState = field(default_factory=ChainState)
    rims: dict[str, dict[str, Any]] = field(default_factory=lambda: {"driver": {}, "vbios": {}})
    rim_chains: dict[str, ChainState] = field(
        default_factory=lambda: {"driver": ChainState(), "vbios": ChainState()}
    )
    no_conflict: bool | None = None
    measurements: bool | None = None

    def passed(self) -> bool:
        chains = [self.report_chain, *self.rim_chains.values()]
        rim_flags = ("fetched", "schema", "signature", "version", "available")
        return (
            self.arch is True
            and self.parsed is True
            and self.fwid_match is True
            and self.nonce_match is True
            and self.signature is True
            and all(c.validated and c.status == "valid" and c.ocsp_status == "good" for c in chains)
            and all(r.get(k) is True for r in self.rims.values() for k in rim_flags)
            and self.no_conflict is True
            and self.measurements is True
        )

    def claims(self, version: str) -> dict[str, Any]:
        """ClaimsUtils.get_current_gpu_claims."""
        measres = None if self.measurements is None else "success" if self.measurements else "fail"
        d, v = self.rims["driver"], self.rims["vbios"]
        if version == "3.0":

            def chain(c: ChainState) -> dict[str, Any]:
                return {
                    "x-nvidia-cert-expiration-date": c.expiration,
                    "x-nvidia-cert-status": c.status,
                    "x-nvidia-cert-ocsp-status": c.ocsp_status,
                    "x-nvidia-cert-revocation-reason": c.revocation_reason,
                }

            claims: dict[str, Any] = {
                "measres": measres,
                "x-nvidia-gpu-arch-check": self.arch,
                "x-nvidia-gpu-driver-version": self.driver_version,
                "x-nvidia-gpu-vbios-version": self.vbios_version,
                "x-nvidia-gpu-attestation-report-cert-chain": chain(self.report_chain),
                "x-nvidia-gpu-attestation-report-cert-chain-fwid-match": self.fwid_match,
                "x-nvidia-gpu-attestation-report-parsed": self.parsed,
                "x-nvidia-gpu-attestation-report-nonce-match": self.nonce_match,
                "x-nvidia-gpu-attestation-report-signature-verified": self.signature,
                "x-nvidia-gpu-driver-rim-fetched": d.get("fetched"),
                "x-nvidia-gpu-driver-rim-schema-validated": d.get("schema"),
                "x-nvidia-gpu-driver-rim-cert-chain": chain(self.rim_chains["driver"]),
                "x-nvidia-gpu-driver-rim-signature-verified": d.get("signature"),
                "x-nvidia-gpu-driver-rim-version-match": d.get("version"),
                "x-nvidia-gpu-driver-rim-measurements-available": d.get("available"),
                "x-nvidia-gpu-vbios-rim-fetched": v.get("fetched"),
                "x-nvidia-gpu-vbios-rim-schema-validated": v.get("schema"),
                "x-nvidia-gpu-vbios-rim-cert-chain": chain(self.rim_chains["vbios"]),
                "x-nvidia-gpu-vbios-rim-version-match": v.get("version"),
                "x-nvidia-gpu-vbios-rim-signature-verified": v.get("signature"),
                "x-nvidia-gpu-vbios-rim-measurements-available": v.get("available"),
                "x-nvidia-gpu-vbios-index-no-conflict": self.no_conflict,
            }
        else:  # 2.0: every unset value is false (or "fail", or "")
            claims = {
                "measres": measres or "fail",
                "x-nvidia-gpu-arch-check": self.arch or False,
                "x-nvidia-gpu-driver-version": self.driver_version or "",
                "x-nvidia-gpu-vbios-version": self.vbios_version or "",
                "x-nvidia-gpu-attestation-report-cert-chain-validated": bool(
                    self.report_chain.validated
                ),
                "x-nvidia-gpu-attestation-report-parsed": self.parsed or False,
                "x-nvidia-gpu-attestation-report-nonce-match": self.nonce_match or False,
                "x-nvidia-gpu-attestation-report-signature-verified": self.signature or False,
                "x-nvidia-gpu-driver-rim-fetched": d.get("fetched") or False,
                "x-nvidia-gpu-driver-rim-schema-validated": d.get("schema") or False,
                "x-nvidia-gpu-driver-rim-cert-validated": bool(self.rim_chains["driver"].validated),
                "x-nvidia-gpu-driver-rim-signature-verified": d.get("signature") or False,
                "x-nvidia-gpu-driver-rim-measurements-available": d.get("available") or False,
                "x-nvidia-gpu-vbios-rim-fetched": v.get("fetched") or False,
                "x-nvidia-gpu-vbios-rim-schema-validated": v.get("schema") or False,
                "x-nvidia-gpu-vbios-rim-cert-validated": bool(self.rim_chains["vbios"].validated),
                "x-nvidia-gpu-vbios-rim-signature-verified": v.get("signature") or False,
                "x-nvidia-gpu-vbios-rim-measurements-available": v.get("available") or False,
                "x-nvidia-gpu-vbios-index-no-conflict": self.no_conflict or False,
            }
        if measres == "success":
            claims["secboot"] = True
            claims["dbgstat"] = "disabled"
        return claims


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _ocsp(chain: ChainState, name: str) -> None:
    """The revocation status of one chain; raises CertChainVerificationFailureError."""
    nonce = secrets.token_bytes(NONCE_SIZE)
    answer: OcspAnswer = CcAdminUtils.send_ocsp_request(
        json.dumps({"chain": name, "nonce": nonce.hex()}).encode()
    )
    if not BaseSettings.OCSP_NONCE_DISABLED and not hmac.compare_digest(answer.nonce, nonce):
        info_log.error("\t\tThe nonce in the OCSP response message is not matching.")
        chain.status, chain.validated = "invalid", False
        raise CertChainVerificationFailureError(f"\t\t{name} certificate chain OCSP nonce mismatch")
    chain.ocsp_status = answer.status
    chain.revocation_reason = answer.revocation_reason
    hold = BaseSettings.allow_hold_cert and answer.revocation_reason == "certificate_hold"
    if answer.status != "good" and not hold:
        chain.status, chain.validated = "revoked", False
        raise CertChainVerificationFailureError(f"\t\t{name} certificate is revoked")
    chain.status, chain.validated = "valid", True


def _rim(kind: str, file_id: str, version: str, state: GpuState) -> nvattest.Rim:
    flags = state.rims[kind]
    content = CcAdminUtils.fetch_rim_file(file_id)
    flags["fetched"] = True
    try:
        data = json.loads(content)
        rim = nvattest.Rim(
            driver=str(data["driver"]),
            vbios=str(data["vbios"]),
            measurements={int(k): str(v).lower() for k, v in data["measurements"].items()},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        flags["schema"] = False
        raise RIMSchemaValidationError(f"{kind} RIM schema validation failed") from exc
    flags["schema"] = True
    chain = state.rim_chains[kind]
    chain.expiration = _iso(dt.datetime.now(dt.UTC) + dt.timedelta(days=365))
    _ocsp(chain, f"{kind}-rim")
    flags["signature"] = True
    have = rim.driver if kind == "driver" else rim.vbios
    flags["version"] = have.upper() == version.upper()
    if not flags["version"]:
        raise RIMVerificationFailureError(f"{kind} RIM version does not match")
    flags["available"] = bool(rim.measurements)
    return rim


def verify_gpu(gpu: GpuInfo, nonce: bytes, state: GpuState, marks: dict[str, list[Any]]) -> None:
    """One GPU, in the real verifier's order; a failed step marks its claim and raises."""
    if gpu.get_gpu_architecture() not in NVML_ARCHES:
        state.arch = False
        raise UnsupportedGpuArchitectureError("\tGPU architecture is not supported.")
    state.arch = True
    state.driver_version = gpu.get_driver_version()
    state.vbios_version = gpu.get_vbios_version().upper()
    report_bytes = gpu.get_attestation_report()
    try:
        report = nvattest.parse_report(report_bytes)
    except nvattest.NvatError as exc:
        raise ParsingError(exc.message) from None
    state.parsed = True
    try:
        chain = nvattest.load_chain(gpu.get_attestation_cert_chain())
    except nvattest.NvatError as exc:
        state.report_chain.status, state.report_chain.validated = "invalid", False
        raise CertChainVerificationFailureError(exc.message) from None
    if len(chain) > 1:
        names = chain[1].subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        marks["hwmodel"].append(str(names[0].value) if names else None)
    marks["ueid"].append(chain[0].serial_number)
    state.fwid_match = True  # the testbed's certificates carry no FWID extension
    try:
        root = x509.load_pem_x509_certificate(bed().root.read_bytes())
        verified = nvattest.verify_chain(chain, root, dt.datetime.now(dt.UTC))
    except (OSError, ValueError, nvattest.NvatError) as exc:
        state.report_chain.status, state.report_chain.validated = "invalid", False
        raise CertChainVerificationFailureError(
            "\t\tGPU attestation report certificate chain validation failed."
        ) from exc
    state.report_chain.expiration = verified["x-nvidia-cert-expiration-date"].rstrip("Z")
    if verified["x-nvidia-cert-status"] != "valid":
        state.report_chain.status = verified["x-nvidia-cert-status"]
        state.report_chain.validated = False
        raise CertChainVerificationFailureError("\t\tGPU attestation certificate not valid.")
    _ocsp(state.report_chain, "attestation-report")
    if report.request_nonce != nonce:
        state.nonce_match = False
        raise NonceMismatchError(
            "\t\tThe nonce in the SPDM GET MEASUREMENT request message is not matching with the "
            "generated nonce."
        )
    state.nonce_match = True
    try:
        nvattest.verify_signature(report_bytes, chain[0])
    except nvattest.NvatError:
        state.signature = False
        raise SignatureVerificationError(
            "\t\tAttestation report signature verification failed."
        ) from None
    state.signature = True
    driver = state.driver_version
    vbios = state.vbios_version
    driver_rim = _rim("driver", f"NV_GPU_DRIVER_GH100_{driver}", driver, state)
    marks["oemid"].append(nvattest.OEM_ID)
    vbios_rim = _rim("vbios", f"NV_GPU_VBIOS_{vbios.replace('.', '')}", vbios, state)
    state.no_conflict = True
    blocks = nvattest.VBIOS_BLOCKS
    golden = nvattest.Rim(
        driver=driver_rim.driver,
        vbios=vbios_rim.vbios,
        measurements={i: m for i, m in driver_rim.measurements.items() if i not in blocks}
        | {i: m for i, m in vbios_rim.measurements.items() if i in blocks},
    )
    mismatches = nvattest.mismatch_records(report, golden)
    for record in mismatches:
        info_log.info(f"\t\t\t{record['index']} [{record['measurementSource']}]")
    state.measurements = not mismatches


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hs256(payload: Mapping[str, Any]) -> str:
    """PyJWT's ``jwt.encode(payload, "secret", "HS256")``."""
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    body = _b64url(json.dumps(payload, separators=(",", ":")).encode())
    signature = hmac.new(HS256_KEY, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{_b64url(signature)}"


def detached_eat(
    result: bool, claims_list: list[dict[str, Any]], nonce: str, marks: dict[str, list[Any]]
) -> list[Any]:
    """ClaimsUtils.create_detached_eat_claims."""
    now = int(time.time())
    overall: dict[str, Any] = {
        "sub": SUBJECT,
        "nbf": now - 120,
        "exp": now + 3600,
        "iat": now,
        "jti": str(uuid.uuid4()),
        "x-nvidia-ver": BaseSettings.CLAIMS_VERSION,
        "iss": ISSUER,
        "x-nvidia-overall-att-result": result,
        "submods": {},
        "eat_nonce": nonce,
    }
    tokens: dict[str, str] = {}
    for i, claims in enumerate(claims_list):
        name = f"GPU-{i}"
        claims["eat_nonce"] = nonce
        claims["hwmodel"] = marks["hwmodel"][i] if i < len(marks["hwmodel"]) else None
        claims["ueid"] = str(marks["ueid"][i]) if i < len(marks["ueid"]) else ""
        claims["oemid"] = marks["oemid"][i] if i < len(marks["oemid"]) else None
        claims["iss"] = ISSUER
        digest = hashlib.sha256(json.dumps(claims).encode("utf-8")).hexdigest()
        overall["submods"][name] = ["DIGEST", ["SHA256", digest]]
        claims |= {"nbf": now - 120, "exp": now + 3600, "iat": now, "jti": str(uuid.uuid4())}
        tokens[name] = hs256(claims)
    return [["JWT", hs256(overall)], tokens]


def attest(
    arguments_as_dictionary: dict[str, Any], nonce: str, gpu_evidence_list: list[GpuInfo]
) -> tuple[bool, list[Any]]:
    """cc_admin.attest: ``(overall result, detached EAT)``."""
    args = arguments_as_dictionary
    overall = False
    claims_list: list[dict[str, Any]] = []
    marks: dict[str, list[Any]] = {"hwmodel": [], "ueid": [], "oemid": []}
    nonce_bytes = CcAdminUtils.validate_and_extract_nonce(nonce)
    state: GpuState | None = None
    try:
        BaseSettings.allow_hold_cert = args["allow_hold_cert"]
        BaseSettings.CLAIMS_VERSION = args.get("claims_version") or "2.0"
        if BaseSettings.CLAIMS_VERSION not in ("2.0", "3.0"):
            raise InvalidClaimsVersionError(
                f"Claims version is not supported: {BaseSettings.CLAIMS_VERSION}"
            )
        BaseSettings.OCSP_NONCE_DISABLED = args["ocsp_nonce_disabled"]
        if args["rim_service_url"] is not None:
            BaseSettings.set_rim_service_base_url(args["rim_service_url"])
        if args["ocsp_url"] is not None:
            BaseSettings.set_ocsp_url(args["ocsp_url"])
        if args["service_key"] is not None:
            BaseSettings.set_service_key(args["service_key"])
        if args["verbose"]:
            info_log.setLevel(logging.DEBUG)
        if args["driver_rim"] is not None or args["vbios_rim"] is not None or args["test_no_gpu"]:
            raise Error("the testbed's LGV takes its RIMs from the RIM service only")
        for i, gpu in enumerate(gpu_evidence_list):
            state = GpuState()
            info_log.info(f"Verifying GPU: {gpu.get_uuid()}")
            verify_gpu(gpu, nonce_bytes, state, marks)
            ok = state.passed()
            overall = ok if i == 0 else overall and ok
            claims_list.append(state.claims(BaseSettings.CLAIMS_VERSION))
            state = None
    except Exception as error:
        info_log.error(error)
        event_log.exception("GPU Attestation failed")
        if state is not None:
            claims_list.append(state.claims(BaseSettings.CLAIMS_VERSION))
    if not args.get("user_mode", False):
        devtools = NvmlHandler.is_cc_dev_mode()
        want = overall or devtools
        if bool(NvmlHandler.get_gpu_ready_state()) != want:
            NvmlHandler.set_gpu_ready_state(want)
    info_log.info("GPU Attestation is Successful." if overall else "GPU Attestation failed.")
    return overall, detached_eat(overall, claims_list, nonce, marks)


# --- the venv ----------------------------------------------------------------------------------

_SHIMS = {
    "__init__.py": (
        '"""Stand-in for nv-local-gpu-verifier (testbed/lgv.py), bound to {directory!r}."""\n'
        "from testbed import lgv as _standin\n\n_standin.bind({directory!r})\n"
    ),
    "__about__.py": f'__version__ = "{VERIFIER_VERSION}"\n',
    "config.py": (
        "from testbed.lgv import BaseSettings, HopperSettings, event_log, info_log\n\n"
        f'__version__ = "{VERIFIER_VERSION}"\n'
    ),
    "exceptions/__init__.py": (
        "from testbed.lgv import (\n    AttestationReportError, AttestationReportFetchError,\n"
        "    CertChainVerificationFailureError, Error, InvalidClaimsVersionError,\n"
        "    InvalidNonceError, NoGpuFoundError, NonceMismatchError, ParsingError, PynvmlError,\n"
        "    RIMError, RIMFetchError, RIMSchemaValidationError, RIMVerificationFailureError,\n"
        "    SignatureVerificationError, UnsupportedGpuArchitectureError, VerifierError,\n)\n"
    ),
    "nvml/__init__.py": "from testbed.lgv import NvmlHandler\n",
    "cc_admin_utils.py": "from testbed.lgv import CcAdminUtils\n",
    "cc_admin.py": (
        "from testbed.lgv import (\n    attest, collect_gpu_evidence, collect_gpu_evidence_local,"
        " init_nvml,\n)\n"
    ),
}
_METADATA = (
    "Metadata-Version: 2.1\nName: nv-local-gpu-verifier\nVersion: {version}\n"
    "Summary: testbed stand-in (testbed/lgv.py)\n"
)


def write_venv(directory: Path) -> Path:
    """``DIR/lgv``: the stand-in LGV's virtualenv, rewritten from scratch."""
    venv = directory / VENV_DIR
    shutil.rmtree(venv, ignore_errors=True)
    (venv / "bin").mkdir(parents=True, mode=0o700)
    base = Path(getattr(sys, "_base_executable", None) or sys.executable)
    (venv / "bin" / "python").symlink_to(base)
    (venv / "pyvenv.cfg").write_text(
        f"home = {base.parent}\ninclude-system-site-packages = false\n"
        f"version = {platform.python_version()}\n",
        encoding="utf-8",
    )
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = site / "site-packages"
    package_root = str(Path(__file__).resolve().parent.parent)
    libraries = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    (site / "verifier").mkdir(parents=True)
    (site / "confinfer-testbed-lgv.pth").write_text(
        "\n".join([package_root, *libraries]) + "\n", encoding="utf-8"
    )
    for name, text in _SHIMS.items():
        path = site / "verifier" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text.format(directory=str(directory)), encoding="utf-8")
    dist = site / f"nv_local_gpu_verifier-{PACKAGE_VERSION}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(_METADATA.format(version=PACKAGE_VERSION), encoding="utf-8")
    return venv
