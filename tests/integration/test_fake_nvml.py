"""The fake NVML library through ctypes with the real nvml.h struct layouts."""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from testbed import gpu as fakegpu

pytestmark = pytest.mark.integration

SUCCESS = 0
ERROR_UNINITIALIZED = 1
ERROR_INVALID_ARGUMENT = 2
ERROR_NOT_SUPPORTED = 3
ERROR_NO_PERMISSION = 4
ERROR_NOT_FOUND = 6
ERROR_INSUFFICIENT_SIZE = 7
ERROR_DRIVER_NOT_LOADED = 9
ERROR_GPU_IS_LOST = 15
ERROR_ARGUMENT_VERSION_MISMATCH = 25
ERROR_GPU_NOT_FOUND = 28
ERROR_UNKNOWN = 999


class SystemState(ctypes.Structure):
    _fields_ = [
        ("environment", ctypes.c_uint),
        ("ccFeature", ctypes.c_uint),
        ("devToolsMode", ctypes.c_uint),
    ]


class SystemCaps(ctypes.Structure):
    _fields_ = [("cpuCaps", ctypes.c_uint), ("gpusCaps", ctypes.c_uint)]


class Settings(ctypes.Structure):
    _fields_ = [
        ("version", ctypes.c_uint),
        ("environment", ctypes.c_uint),
        ("ccFeature", ctypes.c_uint),
        ("devToolsMode", ctypes.c_uint),
        ("multiGpuMode", ctypes.c_uint),
    ]


SETTINGS_V1 = ctypes.sizeof(Settings) | (1 << 24)


class Certificate(ctypes.Structure):
    _fields_ = [
        ("certChainSize", ctypes.c_uint),
        ("attestationCertChainSize", ctypes.c_uint),
        ("certChain", ctypes.c_ubyte * 0x1000),
        ("attestationCertChain", ctypes.c_ubyte * 0x1400),
    ]


class AttestationReport(ctypes.Structure):
    _fields_ = [
        ("isCecAttestationReportPresent", ctypes.c_uint),
        ("attestationReportSize", ctypes.c_uint),
        ("cecAttestationReportSize", ctypes.c_uint),
        ("nonce", ctypes.c_ubyte * 0x20),
        ("attestationReport", ctypes.c_ubyte * 0x2000),
        ("cecAttestationReport", ctypes.c_ubyte * 0x1000),
    ]


Device = ctypes.c_void_p


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    path = fakegpu.build_library(tmp_path_factory.mktemp("nvml-lib"))
    lib = ctypes.CDLL(str(path))
    lib.nvmlErrorString.restype = ctypes.c_char_p
    lib.nvmlErrorString.argtypes = [ctypes.c_int]
    lib.nvmlDeviceGetHandleByUUID.argtypes = [ctypes.c_char_p, ctypes.POINTER(Device)]
    for name in ("nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetVbiosVersion"):
        getattr(lib, name).argtypes = [Device, ctypes.c_char_p, ctypes.c_uint]
    lib.nvmlDeviceGetArchitecture.argtypes = [Device, ctypes.POINTER(ctypes.c_uint)]
    lib.nvmlDeviceGetConfComputeGpuAttestationReport.argtypes = [
        Device,
        ctypes.POINTER(AttestationReport),
    ]
    lib.nvmlDeviceGetConfComputeGpuCertificate.argtypes = [Device, ctypes.POINTER(Certificate)]
    return lib


@pytest.fixture
def gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> fakegpu.FakeGpu:
    provisioned = fakegpu.provision(tmp_path / "gpu", build=False)
    monkeypatch.setenv(fakegpu.STATE_ENV, str(provisioned.state_file))
    return provisioned


@pytest.fixture
def nvml(library: ctypes.CDLL, gpu: fakegpu.FakeGpu) -> Iterator[ctypes.CDLL]:
    assert library.nvmlInit_v2() == SUCCESS
    yield library
    assert library.nvmlShutdown() == SUCCESS


def handle(lib: ctypes.CDLL, index: int = 0) -> Device:
    dev = Device()
    assert lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(dev)) == SUCCESS
    return dev


def text(lib: ctypes.CDLL, fn: str, dev: Device, size: int = 96) -> str:
    buf = ctypes.create_string_buffer(size)
    rc = getattr(lib, fn)(dev, buf, size)
    assert rc == SUCCESS, lib.nvmlErrorString(rc)
    return buf.value.decode()


def cc_state(lib: ctypes.CDLL) -> tuple[int, int, int]:
    st = SystemState()
    assert lib.nvmlSystemGetConfComputeState(ctypes.byref(st)) == SUCCESS
    return st.environment, st.ccFeature, st.devToolsMode


# ---- the report as a verifier reads it (layout: header comment of fake_nvml.c) -------------


@dataclass
class ParsedReport:
    request_nonce: bytes
    measurements: dict[int, bytes]
    responder_nonce: bytes
    opaque: dict[int, bytes]
    body: bytes
    signature: bytes


def parse_report(raw: bytes) -> ParsedReport:
    assert raw[0:4] == bytes([0x11, 0xE0, 0x01, 0xFF])
    request_nonce = raw[4:36]
    assert raw[37:41] == bytes([0x11, 0x60, 0x00, 0x00])
    blocks = raw[41]
    record_len = int.from_bytes(raw[42:45], "little")
    record = raw[45 : 45 + record_len]
    measurements: dict[int, bytes] = {}
    off = 0
    for _ in range(blocks):
        index, spec, size = struct.unpack_from("<BBH", record, off)
        assert spec == 1
        _value_type, value_size = struct.unpack_from("<BH", record, off + 4)
        assert size == 3 + value_size
        measurements[index] = record[off + 7 : off + 7 + value_size]
        off += 4 + size
    assert off == record_len
    pos = 45 + record_len
    responder_nonce = raw[pos : pos + 32]
    opaque_len = int.from_bytes(raw[pos + 32 : pos + 34], "little")
    opaque_raw = raw[pos + 34 : pos + 34 + opaque_len]
    opaque: dict[int, bytes] = {}
    o = 0
    while o < opaque_len:
        kind, size = struct.unpack_from("<HH", opaque_raw, o)
        opaque[kind] = opaque_raw[o + 4 : o + 4 + size]
        o += 4 + size
    body_end = pos + 34 + opaque_len
    assert len(raw) == body_end + 96
    return ParsedReport(
        request_nonce, measurements, responder_nonce, opaque, raw[:body_end], raw[body_end:]
    )


def verify_report(report: ParsedReport, leaf: x509.Certificate) -> None:
    r = int.from_bytes(report.signature[:48], "big")
    s = int.from_bytes(report.signature[48:], "big")
    key = leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(encode_dss_signature(r, s), report.body, ec.ECDSA(hashes.SHA384()))


def fetch_report(lib: ctypes.CDLL, dev: Device, nonce: bytes) -> tuple[int, AttestationReport]:
    out = AttestationReport()
    ctypes.memmove(out.nonce, nonce, 32)
    rc = lib.nvmlDeviceGetConfComputeGpuAttestationReport(dev, ctypes.byref(out))
    return rc, out


def fetch_chain(lib: ctypes.CDLL, dev: Device) -> list[x509.Certificate]:
    cert = Certificate()
    assert lib.nvmlDeviceGetConfComputeGpuCertificate(dev, ctypes.byref(cert)) == SUCCESS
    pem = bytes(cert.attestationCertChain[: cert.attestationCertChainSize])
    return x509.load_pem_x509_certificates(pem)


# ---- tests ------------------------------------------------------------------------------------


def test_without_a_state_file_the_driver_is_not_loaded(
    library: ctypes.CDLL, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(fakegpu.STATE_ENV, raising=False)
    assert library.nvmlInit_v2() == ERROR_DRIVER_NOT_LOADED
    monkeypatch.setenv(fakegpu.STATE_ENV, str(tmp_path / "missing"))
    assert library.nvmlInitWithFlags(0) == ERROR_DRIVER_NOT_LOADED
    count = ctypes.c_uint()
    assert library.nvmlDeviceGetCount_v2(ctypes.byref(count)) == ERROR_UNINITIALIZED
    assert library.nvmlShutdown() == ERROR_UNINITIALIZED
    assert library.nvmlErrorString(ERROR_GPU_IS_LOST) == b"GPU is lost"
    assert library.nvmlErrorString(ERROR_DRIVER_NOT_LOADED) == b"Driver Not Loaded"


def test_identity_and_buffer_sizes(nvml: ctypes.CDLL, gpu: fakegpu.FakeGpu) -> None:
    state = gpu.state()
    buf = ctypes.create_string_buffer(80)
    assert nvml.nvmlSystemGetDriverVersion(buf, 80) == SUCCESS
    assert buf.value.decode() == state.driver
    assert nvml.nvmlSystemGetDriverVersion(buf, 4) == ERROR_INSUFFICIENT_SIZE
    count = ctypes.c_uint()
    assert nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == SUCCESS
    assert count.value == 1
    dev = handle(nvml)
    assert text(nvml, "nvmlDeviceGetName", dev) == "NVIDIA H100 NVL"
    uuid = text(nvml, "nvmlDeviceGetUUID", dev)
    assert uuid == state.uuids[0]
    assert text(nvml, "nvmlDeviceGetVbiosVersion", dev, 32) == state.vbios
    arch = ctypes.c_uint()
    assert nvml.nvmlDeviceGetArchitecture(dev, ctypes.byref(arch)) == SUCCESS
    assert arch.value == 9  # NVML_DEVICE_ARCH_HOPPER
    by_uuid = Device()
    assert nvml.nvmlDeviceGetHandleByUUID(uuid.encode(), ctypes.byref(by_uuid)) == SUCCESS
    assert by_uuid.value == dev.value
    assert nvml.nvmlDeviceGetHandleByUUID(b"GPU-nope", ctypes.byref(by_uuid)) == ERROR_NOT_FOUND
    other = Device()
    assert nvml.nvmlDeviceGetHandleByIndex_v2(1, ctypes.byref(other)) == ERROR_INVALID_ARGUMENT
    small = ctypes.create_string_buffer(8)
    assert nvml.nvmlDeviceGetUUID(dev, small, 8) == ERROR_INSUFFICIENT_SIZE
    assert nvml.nvmlDeviceGetName(Device(12345), small, 8) == ERROR_INVALID_ARGUMENT


def test_init_is_reference_counted(library: ctypes.CDLL, gpu: fakegpu.FakeGpu) -> None:
    assert library.nvmlInit_v2() == SUCCESS
    assert library.nvmlInitWithFlags(0) == SUCCESS
    assert library.nvmlShutdown() == SUCCESS
    count = ctypes.c_uint()
    assert library.nvmlDeviceGetCount_v2(ctypes.byref(count)) == SUCCESS
    assert library.nvmlShutdown() == SUCCESS
    assert library.nvmlDeviceGetCount_v2(ctypes.byref(count)) == ERROR_UNINITIALIZED


def test_cc_state_follows_the_state_file(nvml: ctypes.CDLL, gpu: fakegpu.FakeGpu) -> None:
    assert cc_state(nvml) == (2, 1, 0)  # PRODUCTION, CC on, DevTools off
    caps = SystemCaps()
    assert nvml.nvmlSystemGetConfComputeCapabilities(ctypes.byref(caps)) == SUCCESS
    assert (caps.cpuCaps, caps.gpusCaps) == (4, 1)  # AMD SNP vTOM, CC capable
    fakegpu.apply_action(gpu.state_file, "devtools-on")
    assert cc_state(nvml) == (2, 1, 1)
    fakegpu.apply_action(gpu.state_file, "cc-off")
    assert cc_state(nvml) == (2, 0, 0)
    fakegpu.apply_action(gpu.state_file, "cc-on")
    fakegpu.apply_action(gpu.state_file, "devtools-off")
    gpu.update(env="simulation", multigpu="ppcie")
    assert cc_state(nvml) == (1, 1, 0)
    settings = Settings(version=SETTINGS_V1)
    assert nvml.nvmlSystemGetConfComputeSettings(ctypes.byref(settings)) == SUCCESS
    assert (
        settings.environment,
        settings.ccFeature,
        settings.devToolsMode,
        settings.multiGpuMode,
    ) == (1, 1, 0, 1)
    stale = Settings(version=SETTINGS_V1 - 4)
    assert (
        nvml.nvmlSystemGetConfComputeSettings(ctypes.byref(stale))
        == ERROR_ARGUMENT_VERSION_MISMATCH
    )


def test_ready_state_persists_into_the_state_file(nvml: ctypes.CDLL, gpu: fakegpu.FakeGpu) -> None:
    ready = ctypes.c_uint(7)
    assert nvml.nvmlSystemGetConfComputeGpusReadyState(ctypes.byref(ready)) == SUCCESS
    assert ready.value == 0
    rc = nvml.nvmlSystemSetConfComputeGpusReadyState(1)
    if os.geteuid() != 0:
        assert rc == ERROR_NO_PERMISSION
        gpu.update(setter="any")
        rc = nvml.nvmlSystemSetConfComputeGpusReadyState(1)
    assert rc == SUCCESS
    assert gpu.state().ready is True
    assert "ready=1" in gpu.state_file.read_text().splitlines()
    assert nvml.nvmlSystemGetConfComputeGpusReadyState(ctypes.byref(ready)) == SUCCESS
    assert ready.value == 1
    assert nvml.nvmlSystemSetConfComputeGpusReadyState(2) == ERROR_INVALID_ARGUMENT
    assert nvml.nvmlSystemSetConfComputeGpusReadyState(0) == SUCCESS
    assert gpu.state().ready is False
    fakegpu.apply_action(gpu.state_file, "cc-off")
    assert nvml.nvmlSystemSetConfComputeGpusReadyState(1) == ERROR_NOT_SUPPORTED


def test_attestation_report_echoes_the_nonce_and_verifies(
    nvml: ctypes.CDLL, gpu: fakegpu.FakeGpu
) -> None:
    dev = handle(nvml)
    nonce = secrets.token_bytes(32)
    rc, out = fetch_report(nvml, dev, nonce)
    assert rc == SUCCESS
    assert out.isCecAttestationReportPresent == 0
    raw = bytes(out.attestationReport[: out.attestationReportSize])
    assert raw[4:36] == nonce
    report = parse_report(raw)
    assert report.request_nonce == nonce
    chain = fetch_chain(nvml, dev)
    verify_report(report, chain[0])
    state = gpu.state()
    assert report.opaque[3] == state.driver.encode() + b"\0"
    assert report.opaque[4] == state.uuids[0].encode() + b"\0"
    assert report.opaque[6] == state.vbios.encode() + b"\0"
    golden = json.loads(gpu.reference.read_text())["measurements"]
    assert {str(i): v.hex() for i, v in report.measurements.items()} == golden
    # a second report: fresh responder nonce, new signature, same measurements
    _, again = fetch_report(nvml, dev, nonce)
    second = parse_report(bytes(again.attestationReport[: again.attestationReportSize]))
    assert second.responder_nonce != report.responder_nonce
    assert second.measurements == report.measurements
    # a flipped bit anywhere in the body breaks the signature
    tampered = bytearray(raw)
    tampered[10] ^= 1
    with pytest.raises(InvalidSignature):
        verify_report(parse_report(bytes(tampered)), chain[0])


def test_measurements_track_driver_devtools_and_tamper(
    nvml: ctypes.CDLL, gpu: fakegpu.FakeGpu
) -> None:
    dev = handle(nvml)
    nonce = bytes(32)

    def measured() -> dict[int, str]:
        rc, out = fetch_report(nvml, dev, nonce)
        assert rc == SUCCESS
        raw = bytes(out.attestationReport[: out.attestationReportSize])
        return {i: v.hex() for i, v in parse_report(raw).measurements.items()}

    golden = fakegpu.reference_measurements(gpu.state().driver, gpu.state().vbios)
    assert measured() == golden
    fakegpu.apply_action(gpu.state_file, "devtools-on")
    differs = {i for i, v in measured().items() if v != golden[i]}
    assert differs == {8}
    fakegpu.apply_action(gpu.state_file, "devtools-off")
    gpu.update(tamper=3)
    assert {i for i, v in measured().items() if v != golden[i]} == {3}
    gpu.update(tamper=0, driver="555.42.02")
    assert {i for i, v in measured().items() if v != golden[i]} == {5, 6, 7}
    assert measured() == fakegpu.reference_measurements("555.42.02", gpu.state().vbios)


def test_certificate_chains_lead_to_the_testbed_root(
    nvml: ctypes.CDLL, gpu: fakegpu.FakeGpu
) -> None:
    dev = handle(nvml)
    cert = Certificate()
    assert nvml.nvmlDeviceGetConfComputeGpuCertificate(dev, ctypes.byref(cert)) == SUCCESS
    device_chain = x509.load_pem_x509_certificates(bytes(cert.certChain[: cert.certChainSize]))
    attestation = fetch_chain(nvml, dev)
    root = x509.load_pem_x509_certificate(gpu.root_cert.read_bytes())
    assert len(attestation) == 4 and len(device_chain) == 3
    assert attestation[1:] == device_chain
    assert attestation[-1] == root
    for child, parent in itertools.pairwise(attestation):
        child.verify_directly_issued_by(parent)
    root.verify_directly_issued_by(root)
    key = attestation[0].public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"


def test_cc_off_refuses_evidence(nvml: ctypes.CDLL, gpu: fakegpu.FakeGpu) -> None:
    dev = handle(nvml)
    fakegpu.apply_action(gpu.state_file, "cc-off")
    rc, _ = fetch_report(nvml, dev, bytes(32))
    assert rc == ERROR_NOT_SUPPORTED
    cert = Certificate()
    assert nvml.nvmlDeviceGetConfComputeGpuCertificate(dev, ctypes.byref(cert)) == (
        ERROR_NOT_SUPPORTED
    )


def test_lost_gpu(nvml: ctypes.CDLL, library: ctypes.CDLL, gpu: fakegpu.FakeGpu) -> None:
    dev = handle(nvml)
    gpu.update(ready=True)
    fakegpu.apply_action(gpu.state_file, "lose")
    buf = ctypes.create_string_buffer(96)
    assert nvml.nvmlDeviceGetUUID(dev, buf, 96) == ERROR_GPU_IS_LOST
    rc, _ = fetch_report(nvml, dev, bytes(32))
    assert rc == ERROR_GPU_IS_LOST
    fresh = Device()
    assert nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(fresh)) == ERROR_GPU_IS_LOST
    # init still works on a machine whose GPU fell off the bus
    assert library.nvmlInit_v2() == SUCCESS
    assert library.nvmlShutdown() == SUCCESS
    count = ctypes.c_uint()
    assert nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == SUCCESS
    state = fakegpu.apply_action(gpu.state_file, "restore")
    assert state.ready is False  # a reset scrubs the CC ready state
    assert text(nvml, "nvmlDeviceGetUUID", dev) == state.uuids[0]


def test_gpu_count(library: ctypes.CDLL, gpu: fakegpu.FakeGpu) -> None:
    gpu.update(gpus=0)
    assert library.nvmlInit_v2() == ERROR_GPU_NOT_FOUND
    assert library.nvmlInitWithFlags(1) == SUCCESS  # NVML_INIT_FLAG_NO_GPUS
    count = ctypes.c_uint(9)
    assert library.nvmlDeviceGetCount_v2(ctypes.byref(count)) == SUCCESS
    assert count.value == 0
    gpu.update(gpus=2)
    second = handle(library, 1)
    first = handle(library, 0)
    uuids = {text(library, "nvmlDeviceGetUUID", d) for d in (first, second)}
    assert uuids == set(gpu.state().uuids[:2])
    rc, out = fetch_report(library, second, bytes(range(32)))
    assert rc == SUCCESS
    report = parse_report(bytes(out.attestationReport[: out.attestationReportSize]))
    assert report.opaque[4] == gpu.state().uuids[1].encode() + b"\0"
    gpu.update(gpus=1)
    buf = ctypes.create_string_buffer(96)
    assert library.nvmlDeviceGetUUID(second, buf, 96) == ERROR_GPU_IS_LOST
    assert library.nvmlShutdown() == SUCCESS


def test_malformed_state_is_an_unknown_error(nvml: ctypes.CDLL, gpu: fakegpu.FakeGpu) -> None:
    good = gpu.state_file.read_text()
    gpu.state_file.write_text(good + "cc=maybe\n")
    count = ctypes.c_uint()
    assert nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == ERROR_UNKNOWN
    gpu.state_file.write_text(good)
    assert nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == SUCCESS


def test_state_parser_is_strict() -> None:
    with pytest.raises(fakegpu.GpuError) as info:
        fakegpu.GpuState.parse("cc=on\nfrobnicate=1\n")
    assert info.value.reason == "gpu-state-invalid"
    with pytest.raises(fakegpu.GpuError):
        fakegpu.GpuState.parse("gpus=9\n")
    with pytest.raises(fakegpu.GpuError):
        fakegpu.GpuState.parse("env=staging\n")
    state = fakegpu.GpuState(uuids=("GPU-a", "GPU-b"), ready=True)
    assert fakegpu.GpuState.parse(state.render()) == state


def test_library_is_rebuilt_only_when_a_source_is_newer(tmp_path: Path) -> None:
    sources = tmp_path / "src"
    sources.mkdir()
    for path in fakegpu.SOURCE_DIR.iterdir():
        if path.suffix in (".c", ".h"):
            (sources / path.name).write_bytes(path.read_bytes())
    lib = fakegpu.build_library(tmp_path / "lib", source_dir=sources)
    built = lib.stat().st_mtime_ns
    assert fakegpu.build_library(tmp_path / "lib", source_dir=sources).stat().st_mtime_ns == built
    header = sources / "fake_nvml.h"
    os.utime(header, ns=(built + 10**9, built + 10**9))
    rebuilt = fakegpu.build_library(tmp_path / "lib", source_dir=sources).stat().st_mtime_ns
    assert rebuilt != built
    broken = sources / "state.c"
    broken.write_text("this is not C\n")
    os.utime(broken, ns=(rebuilt + 2 * 10**9, rebuilt + 2 * 10**9))
    with pytest.raises(fakegpu.GpuError) as info:
        fakegpu.build_library(tmp_path / "lib", source_dir=sources)
    assert info.value.reason == "gpu-build-failed"
    assert lib.stat().st_mtime_ns == rebuilt  # the old library is left in place
