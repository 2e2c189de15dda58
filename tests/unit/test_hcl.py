"""HCL report parsing and the REPORT_DATA binding, on reports built from the documented layout."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confinfer import hcl
from confinfer.errors import AttestationError

pytestmark = pytest.mark.unit

RUNTIME: dict[str, Any] = {
    "keys": [{"kid": "HCLAkPub", "key_ops": ["sign"], "kty": "RSA", "e": "AQAB", "n": "u1Zz"}],
    "vm-configuration": {
        "console-enabled": False,
        "secure-boot": True,
        "tpm-enabled": True,
        "vmUniqueId": "6E9A7C8D-0000-4000-8000-0123456789AB",
    },
    "user-data": "AB" * 64,
}
_HASH = {1: hashlib.sha256, 2: hashlib.sha384, 3: hashlib.sha512}


def build(
    runtime: bytes,
    *,
    hash_type: int = 1,
    report_type: int = 2,
    pad: int = 2600,
    report_data: bytes | None = None,
) -> bytes:
    snp = bytearray(os.urandom(1184))
    if report_data is None:
        digest = _HASH[hash_type](runtime).digest() if hash_type in _HASH else b""
        report_data = digest + bytes(64 - len(digest))
    snp[0x50:0x90] = report_data
    igvm = struct.pack("<IIIII", 20 + len(runtime), 1, report_type, hash_type, len(runtime))
    size = 0x20 + 1184 + 20 + len(runtime)
    header = b"HCLA" + struct.pack("<III", 2, size, 2) + bytes(16)
    report = header + bytes(snp) + igvm + runtime
    return report + bytes(max(0, pad - len(report)))


def invalid(raw: bytes, reason: str = "hcl-report-invalid") -> AttestationError:
    with pytest.raises(AttestationError) as err:
        hcl.parse(raw).check_binding()
    assert err.value.reason == reason
    return err.value


def test_parses_fields_and_ignores_padding() -> None:
    runtime = json.dumps(RUNTIME).encode()
    raw = build(runtime)
    report = hcl.parse(raw)
    assert len(report.raw) == 0x4D4 + len(runtime) == hcl.report_size(raw)
    assert report.version == 2 and report.request_type == 2
    assert report.report_type == hcl.REPORT_TYPE_SNP and report.report_type_name == "snp"
    assert report.runtime_data == runtime
    assert report.runtime_claims["vm-configuration"]["secure-boot"] is True
    assert report.snp_report == raw[0x20:0x4C0]
    assert report.report_data == raw[0x70:0xB0]
    assert report.measurement == raw[0xB0:0xE0]
    assert report.user_data == b"\xab" * 64
    key = report.runtime_key("HCLAkPub")
    assert key is not None and key["n"] == "u1Zz"
    assert report.runtime_key("HCLEkPub") is None
    report.check_binding()


@pytest.mark.parametrize("hash_type", [1, 2, 3])
def test_binding_for_each_hash_type(hash_type: int) -> None:
    hcl.parse(build(json.dumps(RUNTIME).encode(), hash_type=hash_type)).check_binding()


def test_binding_is_over_the_exact_bytes() -> None:
    runtime = json.dumps(RUNTIME).encode()
    other = json.dumps(RUNTIME, indent=1).encode()  # same JSON, other bytes
    wrong = hashlib.sha256(other).digest() + bytes(32)
    invalid(build(runtime, report_data=wrong), "hcl-report-binding")
    # SHA-256 binding requires zeros after the digest.
    tail = hashlib.sha256(runtime).digest() + b"\x01" + bytes(31)
    invalid(build(runtime, report_data=tail), "hcl-report-binding")
    # SHA-512 of the data is not what hash type 1 means.
    invalid(build(runtime, report_data=hashlib.sha512(runtime).digest()), "hcl-report-binding")


def test_unknown_hash_type_is_unsupported() -> None:
    invalid(build(b"{}", hash_type=0, report_data=bytes(64)), "hcl-report-unsupported")


def test_older_runtime_without_user_data() -> None:
    runtime = json.dumps(
        {
            "keys": [
                {"kid": "HCLAkPub", "key_ops": ["encrypt"], "kty": "RSA", "e": "AQAB", "n": "AQ"}
            ],
            "vm-configuration": {"current-time": 1},
        }
    ).encode()
    report = hcl.parse(build(runtime))
    assert report.user_data is None
    report.check_binding()


def test_nul_padded_runtime_json_parses_and_binds() -> None:
    runtime = json.dumps(RUNTIME).encode() + b"\0\0\0"
    report = hcl.parse(build(runtime))
    assert report.runtime_claims["user-data"] == "AB" * 64
    report.check_binding()


def test_tdx_report_is_not_an_snp_report() -> None:
    report = hcl.parse(build(b"{}", report_type=4))
    assert report.report_type_name == "tdx"
    with pytest.raises(AttestationError) as err:
        _ = report.snp_report
    assert err.value.reason == "hcl-report-unsupported"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda r: b"XCLA" + r[4:],
        lambda r: r[:8] + struct.pack("<I", 100) + r[12:],  # size below the header
        lambda r: r[:8] + struct.pack("<I", len(r) + 1) + r[12:],  # size past the data
        lambda r: r[:0x4C0] + struct.pack("<I", 7) + r[0x4C4:],  # data size mismatch
        lambda r: r[:0x4D0] + struct.pack("<I", 4000) + r[0x4D4:],  # runtime past the size
        lambda r: r[:16],
        lambda r: b"",
    ],
)
def test_malformed_reports(mutate: Any) -> None:
    invalid(mutate(build(json.dumps(RUNTIME).encode(), pad=0)))


@pytest.mark.parametrize("runtime", [b"not json", b"[1,2]", b"\xff\xfe", b'"text"'])
def test_runtime_must_be_a_json_object(runtime: bytes) -> None:
    invalid(build(runtime))


def test_user_data_must_be_hex() -> None:
    report = hcl.parse(build(json.dumps({"user-data": "zz"}).encode()))
    with pytest.raises(AttestationError):
        _ = report.user_data


json_objects = st.dictionaries(
    st.text(max_size=8),
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
    max_size=5,
)


@settings(max_examples=100)
@given(json_objects, st.integers(min_value=0, max_value=300))
def test_roundtrip_any_runtime(claims: dict[str, Any], pad: int) -> None:
    runtime = json.dumps(claims).encode()
    raw = build(runtime, pad=0) + bytes(pad)
    report = hcl.parse(raw)
    assert report.runtime_claims == claims
    report.check_binding()


@settings(max_examples=300)
@given(st.binary(max_size=1600), st.integers(min_value=0, max_value=1500))
def test_hostile_bytes_only_raise_attestation_errors(noise: bytes, cut: int) -> None:
    good = build(json.dumps(RUNTIME).encode(), pad=0)
    for raw in (noise, b"HCLA" + noise, good[:cut] + noise[: len(good) - cut]):
        try:
            hcl.parse(raw).check_binding()
        except AttestationError as exc:
            assert exc.reason.startswith("hcl-report-")
