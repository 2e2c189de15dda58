"""The testbed's HCL report and SNP report: layout, binding, signatures, parser round trips."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given
from hypothesis import strategies as st

from testbed import hcl, snp

pytestmark = pytest.mark.unit

VCEK = ec.generate_private_key(ec.SECP384R1())
AK = rsa.generate_private_key(public_exponent=65537, key_size=2048)
VM_ID = "6F0A1C2E-3B4D-4E5F-8A9B-0C1D2E3F4A5B"


def u32(n: int = 2**32 - 1) -> st.SearchStrategy[int]:
    return st.integers(min_value=0, max_value=n)


hcl_reports = st.builds(
    hcl.HclReport,
    hw_report=st.binary(min_size=hcl.HW_REPORT_SIZE, max_size=hcl.HW_REPORT_SIZE),
    runtime_data=st.binary(max_size=2048),
    version=u32(),
    request_type=u32(),
    status=u32(),
    report_type=u32(),
    hash_type=u32(),
    var_version=u32(),
)


@given(report=hcl_reports, padding=st.binary(max_size=600))
def test_hcl_round_trip(report: hcl.HclReport, padding: bytes) -> None:
    encoded = report.encode()
    assert len(encoded) == report.report_size == hcl.RUNTIME_DATA_OFFSET + len(report.runtime_data)
    assert hcl.parse_hcl_report(encoded) == report
    assert hcl.parse_hcl_report(encoded + padding) == report  # the NV index is padded


@given(report=hcl_reports, data=st.data())
def test_hcl_truncation_is_detected(report: hcl.HclReport, data: st.DataObject) -> None:
    encoded = report.encode()
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(hcl.HclReportError) as err:
        hcl.parse_hcl_report(encoded[:cut])
    assert err.value.reason == "hcl-truncated"


def test_hcl_layout_offsets() -> None:
    hw = bytes(range(256)) * 4 + bytes(hcl.HW_REPORT_SIZE - 1024)
    report = hcl.HclReport(hw_report=hw, runtime_data=b'{"a":1}')
    raw = report.encode()
    assert raw[0:4] == b"HCLA"
    assert struct.unpack_from("<III", raw, 4) == (2, hcl.RUNTIME_DATA_OFFSET + 7, 2)
    assert raw[0x20 : 0x20 + 1184] == hw
    assert struct.unpack_from("<IIIII", raw, 0x4C0) == (27, 1, 2, 1, 7)
    assert raw[0x4D4:] == b'{"a":1}'


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda raw: b"HCLB" + raw[4:], "hcl-signature"),
        (lambda raw: raw[:0x4C0] + struct.pack("<I", 99) + raw[0x4C4:], "hcl-inconsistent"),
        (lambda raw: raw[:8] + struct.pack("<I", 5000) + raw[12:], "hcl-inconsistent"),
        (lambda raw: raw[:100], "hcl-truncated"),
    ],
)
def test_hcl_malformed_reports_are_refused(mutate: Callable[[bytes], bytes], reason: str) -> None:
    raw = hcl.HclReport(hw_report=bytes(hcl.HW_REPORT_SIZE), runtime_data=b"{}").encode()
    with pytest.raises(hcl.HclReportError) as err:
        hcl.parse_hcl_report(mutate(raw))
    assert err.value.reason == reason


def test_hcl_hw_report_must_be_1184_bytes() -> None:
    with pytest.raises(hcl.HclReportError) as err:
        hcl.HclReport(hw_report=bytes(1024), runtime_data=b"{}").encode()
    assert err.value.reason == "hcl-hw-report-size"


def test_runtime_claims_shape() -> None:
    user_data = hashlib.sha512(b"claims").digest()
    claims = json.loads(hcl.runtime_claims(AK.public_key(), VM_ID, user_data))
    (key,) = claims["keys"]
    assert key == {
        "kid": "HCLAkPub",
        "key_ops": ["sign"],
        "kty": "RSA",
        "e": "AQAB",
        "n": key["n"],
    }
    padded = key["n"] + "=" * (-len(key["n"]) % 4)
    assert int.from_bytes(base64.urlsafe_b64decode(padded), "big") == (
        AK.public_key().public_numbers().n
    )
    assert claims["vm-configuration"] == {
        "console-enabled": False,
        "secure-boot": True,
        "tpm-enabled": True,
        "vmUniqueId": VM_ID,
    }
    assert claims["user-data"] == user_data.hex().upper()
    assert "user-data" not in json.loads(hcl.runtime_claims(AK.public_key(), VM_ID, None))


def test_runtime_claims_refuse_user_data_of_wrong_size() -> None:
    with pytest.raises(hcl.HclReportError) as err:
        hcl.runtime_claims(AK.public_key(), VM_ID, bytes(32))
    assert err.value.reason == "hcl-user-data-size"


def test_report_data_binding() -> None:
    runtime = b'{"keys":[]}'
    assert hcl.report_data_binding(runtime) == hashlib.sha256(runtime).digest() + bytes(32)
    assert hcl.report_data_binding(runtime, hcl.HASH_TYPE_SHA512) == (
        hashlib.sha512(runtime).digest()
    )
    with pytest.raises(hcl.HclReportError) as err:
        hcl.report_data_binding(runtime, 7)
    assert err.value.reason == "hcl-hash-type"


@pytest.mark.parametrize("user_data", [None, bytes(range(64))])
def test_built_report_is_bound_signed_and_fits(user_data: bytes | None) -> None:
    raw = hcl.build_hcl_report(
        ak_public=AK.public_key(), vm_id=VM_ID, vcek_key=VCEK, user_data=user_data
    )
    assert len(raw) <= hcl.NV_MAX_SIZE
    report = hcl.parse_hcl_report(raw)
    assert (report.request_type, report.report_type, report.hash_type) == (2, 2, 1)
    snp.verify_report_signature(report.hw_report, VCEK.public_key())
    parsed = snp.parse_report(report.hw_report)
    assert parsed.report_data == hashlib.sha256(report.runtime_data).digest() + bytes(32)
    assert report.hw_report[0x50:0x70] == hashlib.sha256(report.runtime_data).digest()
    assert report.hw_report[0x90:0xC0] == snp.TESTBED_MEASUREMENT
    claims = json.loads(report.runtime_data)
    assert claims.get("user-data") == (user_data.hex().upper() if user_data else None)


def test_snp_signature_is_little_endian_r_s_over_first_0x2a0_bytes() -> None:
    report = snp.testbed_guest_report(VM_ID, VCEK.public_key()).signed(VCEK)
    raw = report.encode()
    assert len(raw) == snp.REPORT_SIZE == 0x4A0
    r = int.from_bytes(raw[0x2A0:0x2E8], "little")
    s = int.from_bytes(raw[0x2E8:0x330], "little")
    assert raw[0x330:] == bytes(0x4A0 - 0x330)
    # checked here with cryptography directly, independent of verify_report_signature
    VCEK.public_key().verify(encode_dss_signature(r, s), raw[:0x2A0], ec.ECDSA(hashes.SHA384()))


def test_snp_field_offsets() -> None:
    report = replace(
        snp.testbed_guest_report(VM_ID, VCEK.public_key()),
        report_data=b"\x11" * 64,
        host_data=b"\x22" * 32,
        chip_id=b"\x33" * 64,
    )
    raw = report.encode()
    assert struct.unpack_from("<IIQ", raw, 0) == (2, 1, snp.TESTBED_POLICY)
    assert struct.unpack_from("<II", raw, 0x30) == (0, 1)  # vmpl, signature_algo
    assert raw[0x50:0x90] == b"\x11" * 64
    assert raw[0x90:0xC0] == snp.TESTBED_MEASUREMENT
    assert raw[0xC0:0xE0] == b"\x22" * 32
    assert raw[0x1A0:0x1E0] == b"\x33" * 64
    assert snp.TcbVersion.from_u64(struct.unpack_from("<Q", raw, 0x180)[0]) == snp.TESTBED_TCB
    assert report.smt_allowed and not report.is_debuggable and not report.migration_allowed


def test_snp_tampering_and_wrong_key_fail() -> None:
    raw = snp.testbed_guest_report(VM_ID, VCEK.public_key()).signed(VCEK).encode()
    tampered = raw[:0x90] + bytes([raw[0x90] ^ 1]) + raw[0x91:]
    with pytest.raises(snp.InvalidReportSignature) as err:
        snp.verify_report_signature(tampered, VCEK.public_key())
    assert err.value.reason == "snp-signature"
    other = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(snp.InvalidReportSignature):
        snp.verify_report_signature(raw, other.public_key())
    unsigned = snp.testbed_guest_report(VM_ID, VCEK.public_key())
    with pytest.raises(snp.InvalidReportSignature):
        snp.verify_report_signature(unsigned, VCEK.public_key())


def test_snp_refuses_wrong_size_algo_and_curve() -> None:
    with pytest.raises(snp.SnpReportError) as err:
        snp.parse_report(bytes(1000))
    assert err.value.reason == "snp-size"
    report = snp.testbed_guest_report(VM_ID, VCEK.public_key())
    with pytest.raises(snp.SnpReportError) as err:
        replace(report, signature_algo=2).signed(VCEK)
    assert err.value.reason == "snp-signature-algo"
    with pytest.raises(snp.SnpReportError) as err:
        report.signed(ec.generate_private_key(ec.SECP256R1()))
    assert err.value.reason == "snp-signing-key"
    raw = replace(report.signed(VCEK), signature_algo=2).encode()
    with pytest.raises(snp.SnpReportError) as err:
        snp.verify_report_signature(raw, VCEK.public_key())
    assert err.value.reason == "snp-signature-algo"


tcb = st.builds(snp.TcbVersion, *(st.integers(0, 255) for _ in range(4)))
snp_reports = st.builds(
    snp.SnpReport,
    version=u32(),
    guest_svn=u32(),
    policy=st.integers(0, 2**64 - 1),
    family_id=st.binary(min_size=16, max_size=16),
    image_id=st.binary(min_size=16, max_size=16),
    vmpl=u32(),
    signature_algo=u32(),
    current_tcb=tcb,
    platform_info=st.integers(0, 2**64 - 1),
    key_info=u32(),
    report_data=st.binary(min_size=64, max_size=64),
    measurement=st.binary(min_size=48, max_size=48),
    host_data=st.binary(min_size=32, max_size=32),
    id_key_digest=st.binary(min_size=48, max_size=48),
    author_key_digest=st.binary(min_size=48, max_size=48),
    report_id=st.binary(min_size=32, max_size=32),
    report_id_ma=st.binary(min_size=32, max_size=32),
    reported_tcb=tcb,
    chip_id=st.binary(min_size=64, max_size=64),
    committed_tcb=tcb,
    current_build=st.integers(0, 255),
    current_minor=st.integers(0, 255),
    current_major=st.integers(0, 255),
    committed_build=st.integers(0, 255),
    committed_minor=st.integers(0, 255),
    committed_major=st.integers(0, 255),
    launch_tcb=tcb,
    signature_r=st.integers(0, 2**576 - 1),
    signature_s=st.integers(0, 2**576 - 1),
)


@given(report=snp_reports)
def test_snp_round_trip(report: snp.SnpReport) -> None:
    raw = report.encode()
    assert len(raw) == snp.REPORT_SIZE
    assert snp.parse_report(raw) == report


@pytest.mark.parametrize(
    "changes",
    [
        {"report_data": bytes(65)},
        {"measurement": bytes(47)},
        {"vmpl": 2**32},
        {"signature_r": 2**576},
    ],
)
def test_snp_field_out_of_range_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(snp.SnpReportError) as err:
        replace(snp.SnpReport(), **changes).encode()  # type: ignore[arg-type]
    assert err.value.reason == "snp-field"
