"""The testbed vTPM: provisioning like an Azure SEV-SNP CVM's vTPM, report refresh, PCR faults."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2B_NV_PUBLIC,
    TPMA_NV,
    TPMA_OBJECT,
    TPMS_ATTEST,
    TPMS_NV_PUBLIC,
    TCTILdr,
    TSS2_Exception,
)

from testbed import hcl, snp
from testbed.pki import Trust
from testbed.vtpm import (
    AK_CERT_INDEX,
    AK_HANDLE,
    HCL_REPORT_INDEX,
    USER_DATA_INDEX,
    Vtpm,
    VtpmError,
)

pytestmark = pytest.mark.integration

PCRS_0_7 = "sha256:0,1,2,3,4,5,6,7"


@pytest.fixture(scope="module")
def trust() -> Trust:
    return Trust.create()


@pytest.fixture
def vtpm(tmp_path: Path, trust: Trust) -> Iterator[Vtpm]:
    started = Vtpm.start(tmp_path / "vtpm", trust)
    try:
        yield started
    finally:
        started.stop()


@contextmanager
def esapi(vtpm: Vtpm) -> Iterator[Any]:
    ctx = ESAPI(TCTILdr.parse(vtpm.tcti))
    try:
        yield ctx
    finally:
        ctx.close()


def nv_read_all(ctx: Any, index: int) -> bytes:
    """Read an index as an Azure client does: size from NV_ReadPublic, owner auth, 1 KiB chunks."""
    handle = ctx.tr_from_tpmpublic(index)
    public, _name = ctx.nv_read_public(handle)
    size = public.nvPublic.dataSize
    data = b""
    while len(data) < size:
        chunk = min(1024, size - len(data))
        data += bytes(ctx.nv_read(handle, chunk, len(data), auth_handle=ESYS_TR.OWNER))
    ctx.tr_close(handle)
    return data


def nv_attributes(ctx: Any, index: int) -> int:
    handle = ctx.tr_from_tpmpublic(index)
    public, _name = ctx.nv_read_public(handle)
    ctx.tr_close(handle)
    return int(public.nvPublic.attributes)


def write_user_data(ctx: Any, data: bytes) -> None:
    """What the Azure guest tools do: (re)define 0x01400002 with owner auth, then write."""
    try:
        old = ctx.tr_from_tpmpublic(USER_DATA_INDEX)
    except TSS2_Exception:  # not defined yet
        old = None
    if old is not None:
        ctx.nv_undefine_space(old, auth_handle=ESYS_TR.OWNER)
    public = TPM2B_NV_PUBLIC(
        TPMS_NV_PUBLIC(
            nvIndex=USER_DATA_INDEX,
            nameAlg=TPM2_ALG.SHA256,
            attributes=TPMA_NV.OWNERWRITE
            | TPMA_NV.OWNERREAD
            | TPMA_NV.AUTHWRITE
            | TPMA_NV.AUTHREAD,
            dataSize=len(data),
        )
    )
    handle = ctx.nv_define_space(b"", public, auth_handle=ESYS_TR.OWNER)
    ctx.nv_write(handle, data, 0, auth_handle=ESYS_TR.OWNER)
    ctx.tr_close(handle)


def read_hcl(vtpm: Vtpm) -> tuple[bytes, hcl.HclReport]:
    with esapi(vtpm) as ctx:
        raw = nv_read_all(ctx, HCL_REPORT_INDEX)
    return raw, hcl.parse_hcl_report(raw)


def b64url_int(text: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), "big")


def check_report(report: hcl.HclReport, trust: Trust) -> tuple[dict[str, Any], snp.SnpReport]:
    """Every check a verifier makes on an HCL report; returns the runtime claims and SNP report."""
    assert report.report_type == hcl.REPORT_TYPE_SNP
    assert report.hash_type == hcl.HASH_TYPE_SHA256
    vcek_public = trust.vcek.cert.public_key()
    assert isinstance(vcek_public, ec.EllipticCurvePublicKey)
    snp.verify_report_signature(report.hw_report, vcek_public)
    parsed = snp.parse_report(report.hw_report)
    assert parsed.report_data == hashlib.sha256(report.runtime_data).digest() + bytes(32)
    assert parsed.measurement == snp.TESTBED_MEASUREMENT
    assert (parsed.version, parsed.vmpl, parsed.signature_algo) == (2, 0, 1)
    return json.loads(report.runtime_data), parsed


def test_provisioning_binds_ak_certificate_and_report(vtpm: Vtpm, trust: Trust) -> None:
    with esapi(vtpm) as ctx:
        ak = ctx.tr_from_tpmpublic(AK_HANDLE)
        public, _name, _qname = ctx.read_public(ak)
        cert_der = nv_read_all(ctx, AK_CERT_INDEX)
        raw = nv_read_all(ctx, HCL_REPORT_INDEX)
        for index in (AK_CERT_INDEX, HCL_REPORT_INDEX):
            attrs = nv_attributes(ctx, index)
            assert attrs & TPMA_NV.OWNERREAD and attrs & TPMA_NV.OWNERWRITE
        with pytest.raises(TSS2_Exception, match="handle"):
            ctx.tr_from_tpmpublic(USER_DATA_INDEX)  # left for the guest to define

    area = public.publicArea
    assert area.type == TPM2_ALG.RSA
    assert area.objectAttributes == (
        TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.SIGN_ENCRYPT
    )
    assert area.parameters.rsaDetail.keyBits == 2048
    assert area.parameters.rsaDetail.scheme.scheme == TPM2_ALG.RSASSA
    assert area.parameters.rsaDetail.scheme.details.rsassa.hashAlg == TPM2_ALG.SHA256
    ak_modulus = int.from_bytes(bytes(area.unique.rsa), "big")

    cert = x509.load_der_x509_certificate(cert_der)
    cert.verify_directly_issued_by(trust.vtpm_ca.cert)
    assert "Global Virtual TPM CA - 03" in cert.issuer.rfc4514_string()
    cert_key = cert.public_key()
    assert isinstance(cert_key, rsa.RSAPublicKey)
    assert cert_key.public_numbers().n == ak_modulus

    assert len(raw) == hcl.NV_MAX_SIZE  # the padded index, sized by NV_ReadPublic
    report = hcl.parse_hcl_report(raw)
    assert report.report_size <= hcl.NV_MAX_SIZE
    assert raw[report.report_size :] == bytes(len(raw) - report.report_size)
    claims, _parsed = check_report(report, trust)
    (key,) = claims["keys"]
    assert (key["kid"], key["kty"], key["e"]) == ("HCLAkPub", "RSA", "AQAB")
    assert b64url_int(key["n"]) == ak_modulus
    assert claims["vm-configuration"]["vmUniqueId"] == vtpm.vm_id
    assert "user-data" not in claims


def test_user_data_write_through_proxy_refreshes_report(vtpm: Vtpm, trust: Trust) -> None:
    _raw, before = read_hcl(vtpm)
    _claims, snp_before = check_report(before, trust)
    for user_data in (hashlib.sha512(b"first").digest(), hashlib.sha512(b"second").digest()):
        with esapi(vtpm) as ctx:
            write_user_data(ctx, user_data)
        _raw, after = read_hcl(vtpm)
        claims, snp_after = check_report(after, trust)
        assert claims["user-data"] == user_data.hex().upper()
        assert claims["keys"] == json.loads(before.runtime_data)["keys"]
        assert snp_after.report_id == snp_before.report_id
        assert snp_after.report_data != snp_before.report_data


def test_tpm2_tools_refresh_through_proxy(vtpm: Vtpm, trust: Trust, tmp_path: Path) -> None:
    if shutil.which("tpm2_nvwrite") is None:
        pytest.skip("tpm2-tools not installed")
    env = {**os.environ, "TPM2TOOLS_TCTI": vtpm.tcti}
    data = tmp_path / "user-data.bin"
    user_data = bytes(range(64))
    data.write_bytes(user_data)
    for argv in (
        [
            "tpm2_nvdefine",
            "-C",
            "o",
            "-s",
            "64",
            "-a",
            "ownerread|ownerwrite|authread|authwrite",
            hex(USER_DATA_INDEX),
        ],
        ["tpm2_nvwrite", "-C", "o", "-i", str(data), hex(USER_DATA_INDEX)],
    ):
        subprocess.run(argv, env=env, check=True, capture_output=True, timeout=30)
    _raw, report = read_hcl(vtpm)
    claims, _parsed = check_report(report, trust)
    assert claims["user-data"] == user_data.hex().upper()


def test_user_data_of_wrong_size_leaves_report(vtpm: Vtpm) -> None:
    raw_before, _ = read_hcl(vtpm)
    with esapi(vtpm) as ctx:
        write_user_data(ctx, bytes(32))
    raw_after, _ = read_hcl(vtpm)
    assert raw_after == raw_before
    assert "not refreshed" in (vtpm.state_dir / "tpmproxy.log").read_text()


def quote(ctx: Any) -> tuple[bytes, bytes, bytes]:
    """Quote PCRs 0-7 with the AK as the MAA guest client does; returns attest, sig, PCR digest."""
    ak = ctx.tr_from_tpmpublic(AK_HANDLE)
    attest, signature = ctx.quote(ak, PCRS_0_7, b"")
    ctx.tr_close(ak)
    _counter, _sel, digests = ctx.pcr_read(PCRS_0_7)
    values = b"".join(bytes(d) for d in digests)
    return bytes(attest), bytes(signature.signature.rsassa.sig), hashlib.sha256(values).digest()


def test_extend_pcr_changes_quote_digest(vtpm: Vtpm) -> None:
    with esapi(vtpm) as ctx:
        _counter, _sel, digests = ctx.pcr_read(PCRS_0_7)
        assert all(bytes(d) != bytes(32) for d in digests)  # boot measurements are in
        cert = x509.load_der_x509_certificate(nv_read_all(ctx, AK_CERT_INDEX))
        ak_public = cert.public_key()
        assert isinstance(ak_public, rsa.RSAPublicKey)

        # the client keeps its context open while another process-level handle extends
        before = quote(ctx)
        Vtpm.attach(vtpm.state_dir).extend_pcr(7, b"secure boot policy changed")
        after = quote(ctx)

    for attest, sig, expected in (before, after):
        ak_public.verify(sig, attest, padding.PKCS1v15(), hashes.SHA256())
        parsed, _offset = TPMS_ATTEST.unmarshal(attest)
        assert bytes(parsed.attested.quote.pcrDigest) == expected
    assert before[2] != after[2]


def test_proxy_serialises_concurrent_clients_during_refresh(vtpm: Vtpm, trust: Trust) -> None:
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            with esapi(vtpm) as ctx:
                for _ in range(40):
                    ctx.pcr_read(PCRS_0_7)
                    nv_read_all(ctx, HCL_REPORT_INDEX)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    user_data = hashlib.sha512(b"concurrent").digest()
    with esapi(vtpm) as ctx:
        write_user_data(ctx, user_data)
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    _raw, report = read_hcl(vtpm)
    claims, _parsed = check_report(report, trust)
    assert claims["user-data"] == user_data.hex().upper()


def test_proxy_drops_malformed_client_and_keeps_serving(vtpm: Vtpm) -> None:
    host, port = "127.0.0.1", vtpm.proxy_port
    with socket.create_connection((host, port), timeout=10) as bad:
        bad.sendall(b"\x80\x01" + (0xFFFFFFFF).to_bytes(4, "big") + b"\x00\x00\x01\x7b")
        assert bad.recv(16) == b""  # closed without an answer
    with socket.create_connection((host, port), timeout=10) as half:
        half.sendall(b"\x80\x01\x00\x00")  # a client that gives up mid-header
    get_random = bytes.fromhex("80010000000c0000017b0008")
    with socket.create_connection((host, port), timeout=10) as good:
        good.sendall(get_random + get_random)  # two commands on one connection
        for _ in range(2):
            response = good.recv(64)
            assert response[:10] == bytes.fromhex("80010000001400000000")
            assert len(response) == 20


def test_extend_pcr_rejects_bad_index(vtpm: Vtpm) -> None:
    with pytest.raises(VtpmError) as err:
        vtpm.extend_pcr(24, b"x")
    assert err.value.reason == "vtpm-pcr"


def test_stop_leaves_no_process(tmp_path: Path, trust: Trust) -> None:
    started = Vtpm.start(tmp_path / "vtpm", trust)
    pids = started.pids
    assert len(pids) == 2
    # another process attaches from the saved state and stops it
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from testbed.vtpm import Vtpm; "
            "Vtpm.attach(Path(sys.argv[1])).stop()",
            str(started.state_dir),
        ],
        check=True,
        timeout=60,
    )
    for pid in pids:  # exited: gone, or a zombie until its parent (this process) reaps it
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    started.stop()  # reaps the exited children; a no-op otherwise
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_start_refuses_non_ec_vcek(tmp_path: Path, trust: Trust) -> None:
    bad = dataclasses.replace(trust, vcek=trust.vtpm_ca)
    with pytest.raises(VtpmError) as err:
        Vtpm.start(tmp_path / "vtpm", bad)
    assert err.value.reason == "vtpm-trust"


def test_attach_without_state_fails_with_reason(tmp_path: Path) -> None:
    with pytest.raises(VtpmError) as err:
        Vtpm.attach(tmp_path)
    assert err.value.reason == "vtpm-state"
