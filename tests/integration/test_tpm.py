"""confinfer.tpm against a real swtpm, provisioned here the way Azure provisions its vTPM.

The fixture plays the platform: it persists an RSASSA attestation key at 0x81000003, stores a
certificate for it at NV 0x01C101D0 (DER, padded like Azure's index), and an HCL report at NV
0x01400001 whose runtime claims carry the AK as ``HCLAkPub``. Everything is checked with
independent code (``cryptography``, hand-written TPMS_ATTEST parsing), not with confinfer.tpm.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import ESAPI
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_NV, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_NV_PUBLIC,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST_VALUES,
    TPMS_NV_PUBLIC,
    TPMS_RSA_PARMS,
    TPMS_SCHEME_HASH,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMT_RSA_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMU_ASYM_SCHEME,
    TPMU_HA,
    TPMU_PUBLIC_PARMS,
)

from confinfer import hcl
from confinfer.errors import TpmError
from confinfer.tpm import (
    AK_CERT_INDEX,
    HCL_REPORT_INDEX,
    USER_DATA_INDEX,
    Vtpm,
    rsa_numbers,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _free_port_pair() -> int:
    """A port P with P and P+1 both free right now (swtpm wants server and control)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


@dataclass
class Swtpm:
    tcti: str
    ctrl_port: int
    ak_cert_der: bytes
    runtime: bytes

    def esapi(self) -> ESAPI:
        return ESAPI(self.tcti)

    def extend_pcr(self, index: int) -> None:
        with self.esapi() as e:
            digest = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=b"\x42" * 32))
            e.pcr_extend(getattr(ESYS_TR, f"PCR{index}"), TPML_DIGEST_VALUES([digest]))

    def read_nv_raw(self, index: int, size: int) -> bytes:
        with self.esapi() as e:
            tr = e.tr_from_tpmpublic(index)
            try:
                return bytes(e.nv_read(tr, size, 0, auth_handle=ESYS_TR.OWNER))
            finally:
                e.tr_close(tr)

    def transient_handles(self) -> int:
        from tpm2_pytss.constants import TPM2_CAP, TPM2_HT

        with self.esapi() as e:
            _, data = e.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 16)
            _, sessions = e.get_capability(TPM2_CAP.HANDLES, TPM2_HT.LOADED_SESSION << 24, 16)
            return int(data.data.handles.count) + int(sessions.data.handles.count)


def _ak_template() -> TPM2B_PUBLIC:
    scheme = TPMT_RSA_SCHEME(
        scheme=TPM2_ALG.RSASSA,
        details=TPMU_ASYM_SCHEME(rsassa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
    )
    return TPM2B_PUBLIC(
        TPMT_PUBLIC(
            type=TPM2_ALG.RSA,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=TPMA_OBJECT.RESTRICTED
            | TPMA_OBJECT.SIGN_ENCRYPT
            | TPMA_OBJECT.FIXEDTPM
            | TPMA_OBJECT.FIXEDPARENT
            | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH
            | TPMA_OBJECT.NODA,
            parameters=TPMU_PUBLIC_PARMS(
                rsaDetail=TPMS_RSA_PARMS(
                    symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                    scheme=scheme,
                    keyBits=2048,
                    exponent=0,
                )
            ),
        )
    )


def _b64url_int(value: int) -> str:
    import base64

    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def build_hcl_report(runtime: bytes, *, pad_to: int = 2048) -> bytes:
    """An HCL report per the documented layout, with REPORT_DATA = SHA-256(runtime) || 0."""
    snp = bytearray(os.urandom(hcl.HW_REPORT_SIZE))
    snp[0x50:0x90] = hashlib.sha256(runtime).digest() + bytes(32)
    igvm = struct.pack("<IIIII", 20 + len(runtime), 1, 2, 1, len(runtime))
    body = bytes(snp) + igvm + runtime
    size = 0x20 + len(body)
    header = b"HCLA" + struct.pack("<III", 2, size, 2) + bytes(16)
    report = header + body
    assert len(report) <= pad_to
    return report + bytes(pad_to - len(report))


def _define_and_write(e: ESAPI, index: int, data: bytes) -> None:
    spec = TPM2B_NV_PUBLIC(
        TPMS_NV_PUBLIC(
            nvIndex=index,
            nameAlg=TPM2_ALG.SHA256,
            attributes=TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA,
            dataSize=len(data),
        )
    )
    tr = e.nv_define_space(None, spec)
    for off in range(0, len(data), 1024):
        e.nv_write(tr, data[off : off + 1024], off, auth_handle=ESYS_TR.OWNER)
    e.tr_close(tr)


def _ak_cert(n: int, e: int) -> bytes:
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test vTPM CA")])
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test AK")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(name)
        .public_key(rsa.RSAPublicNumbers(e, n).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.DER)


def start_swtpm(state: Path) -> tuple[subprocess.Popen[bytes], int]:
    state.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        port = _free_port_pair()
        proc = subprocess.Popen(
            [
                "swtpm",
                "socket",
                "--tpm2",
                "--server",
                f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                "--tpmstate",
                f"dir={state}",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port + 1), timeout=0.2):
                    return proc, port
            except OSError:
                time.sleep(0.02)
        proc.kill()
        proc.wait()
    raise RuntimeError("swtpm did not start")


def stop_swtpm(proc: subprocess.Popen[bytes], port: int) -> None:
    subprocess.run(
        ["swtpm_ioctl", "--tcp", f"127.0.0.1:{port + 1}", "-s"],
        capture_output=True,
        timeout=5,
        check=False,
    )
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    proc, port = start_swtpm(tmp_path / "tpm")
    try:
        tcti = f"swtpm:host=127.0.0.1,port={port}"
        with ESAPI(tcti) as e:
            handle, public, *_ = e.create_primary(
                TPM2B_SENSITIVE_CREATE(), _ak_template(), ESYS_TR.ENDORSEMENT
            )
            persistent = e.evict_control(ESYS_TR.OWNER, handle, 0x81000003)
            e.flush_context(handle)
            e.tr_close(persistent)
            n, exp = rsa_numbers(bytes(public.marshal()))
            cert = _ak_cert(n, exp)
            _define_and_write(e, AK_CERT_INDEX, cert + bytes(1400 - len(cert)))
            runtime = json.dumps(
                {
                    "keys": [
                        {
                            "kid": "HCLAkPub",
                            "key_ops": ["sign"],
                            "kty": "RSA",
                            "e": _b64url_int(exp),
                            "n": _b64url_int(n),
                        }
                    ],
                    "vm-configuration": {
                        "secure-boot": True,
                        "tpm-enabled": True,
                        "vmUniqueId": "00000000-0000-4000-8000-000000000001",
                    },
                },
                separators=(",", ":"),
            ).encode()
            _define_and_write(e, HCL_REPORT_INDEX, build_hcl_report(runtime))
        yield Swtpm(tcti=tcti, ctrl_port=port + 1, ak_cert_der=cert, runtime=runtime)
    finally:
        stop_swtpm(proc, port)


# --- the tests ------------------------------------------------------------------------------


def _ak_key(vtpm: Vtpm) -> rsa.RSAPublicKey:
    n, e = rsa_numbers(vtpm.ak_public())
    return rsa.RSAPublicNumbers(e, n).public_key()


def test_reads_report_and_ak_cert_trimmed(swtpm: Swtpm) -> None:
    with Vtpm(swtpm.tcti) as vtpm:
        report = vtpm.hcl_report()
        cert = vtpm.ak_cert()
        raw = vtpm.read_nv(HCL_REPORT_INDEX)
    assert len(raw) == 2048
    parsed = hcl.parse(report)
    assert len(report) == struct.unpack_from("<I", raw, 8)[0]
    assert parsed.runtime_data == swtpm.runtime
    parsed.check_binding()
    assert cert == swtpm.ak_cert_der


def test_ak_public_matches_report_and_cert(swtpm: Swtpm) -> None:
    with Vtpm(swtpm.tcti) as vtpm:
        n, e = rsa_numbers(vtpm.ak_public())
        report = hcl.parse(vtpm.hcl_report())
        cert = x509.load_der_x509_certificate(vtpm.ak_cert())
    jwk = report.runtime_key("HCLAkPub")
    assert jwk is not None and jwk["n"] == _b64url_int(n)
    cert_key = cert.public_key()
    assert isinstance(cert_key, rsa.RSAPublicKey)
    assert (cert_key.public_numbers().n, cert_key.public_numbers().e) == (n, e)


def test_quote_digest_matches_pcrs_and_signature_verifies(swtpm: Swtpm) -> None:
    swtpm.extend_pcr(3)
    with Vtpm(swtpm.tcti) as vtpm:
        quote = vtpm.quote(range(8), qualifying_data=b"nonce-123")
        ak = _ak_key(vtpm)
    assert sorted(quote.pcrs) == list(range(8))
    assert quote.pcrs[3] != bytes(32)
    # TPMS_ATTEST: magic, type, qualifiedSigner, extraData, clockInfo(17), firmware(8), quote.
    att = quote.attest
    magic, kind = struct.unpack_from(">IH", att, 0)
    assert (magic, kind) == (0xFF544347, 0x8018)
    off = 6
    (signer_len,) = struct.unpack_from(">H", att, off)
    off += 2 + signer_len
    (extra_len,) = struct.unpack_from(">H", att, off)
    assert att[off + 2 : off + 2 + extra_len] == b"nonce-123"
    off += 2 + extra_len + 17 + 8
    (count,) = struct.unpack_from(">I", att, off)
    off += 4
    assert count == 1
    alg, size = struct.unpack_from(">HB", att, off)
    assert (alg, size, att[off + 3]) == (0x000B, 3, 0xFF)
    off += 3 + size
    (dlen,) = struct.unpack_from(">H", att, off)
    digest = att[off + 2 : off + 2 + dlen]
    assert digest == hashlib.sha256(b"".join(quote.pcrs[i] for i in range(8))).digest()
    ak.verify(quote.signature, att, padding.PKCS1v15(), hashes.SHA256())


def test_ephemeral_key_is_certified_and_decrypts(swtpm: Swtpm) -> None:
    with Vtpm(swtpm.tcti) as vtpm:
        key = vtpm.ephemeral_key()
        ak = _ak_key(vtpm)
        public = rsa.RSAPublicNumbers(key.e, key.n).public_key()
        inner = os.urandom(32)
        assert bytes(vtpm.decrypt_rsaes(public.encrypt(inner, padding.PKCS1v15()))) == inner
        # SHA-1 OAEP is what Key Vault's CKM_RSA_AES_KEY_WRAP uses.
        for name, algo in (
            ("sha1", hashes.SHA1()),  # noqa: S303
            ("sha256", hashes.SHA256()),
            ("sha384", hashes.SHA384()),
        ):
            oaep = padding.OAEP(mgf=padding.MGF1(algo), algorithm=algo, label=None)
            assert bytes(vtpm.decrypt_oaep(public.encrypt(b"dek", oaep), name)) == b"dek"
    assert key.n.bit_length() == 2048 and key.e == 65537
    ak.verify(key.certify_signature, key.certify_info, padding.PKCS1v15(), hashes.SHA256())
    assert struct.unpack_from(">IH", key.certify_info, 0) == (0xFF544347, 0x8017)
    # The key is the same within one boot: a fresh connection decrypts what was made for it.
    with Vtpm(swtpm.tcti) as vtpm:
        ct = rsa.RSAPublicNumbers(key.e, key.n).public_key().encrypt(b"x", padding.PKCS1v15())
        assert bytes(vtpm.decrypt_rsaes(ct)) == b"x"
    assert swtpm.transient_handles() == 0


def test_ephemeral_key_template_is_azures(swtpm: Swtpm) -> None:
    with Vtpm(swtpm.tcti) as vtpm:
        key = vtpm.ephemeral_key()
    public, _ = TPM2B_PUBLIC.unmarshal(key.public)
    area = public.publicArea
    want = (
        TPMA_OBJECT.DECRYPT
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.NODA
    )
    assert int(area.objectAttributes) == int(want)
    assert area.parameters.rsaDetail.keyBits == 2048
    assert area.parameters.rsaDetail.exponent == 0
    assert area.parameters.rsaDetail.scheme.scheme == TPM2_ALG.NULL
    assert area.parameters.rsaDetail.symmetric.algorithm == TPM2_ALG.NULL
    # authPolicy = PolicyPCR(SHA-256, PCRs 0-7) computed independently.
    with ESAPI(swtpm.tcti) as e:
        from tpm2_pytss.types import TPML_PCR_SELECTION

        _, _, digests = e.pcr_read(TPML_PCR_SELECTION.parse("sha256:0,1,2,3,4,5,6,7"))
        values = b"".join(bytes(d) for d in digests)
    selection = struct.pack(">IHB3s", 1, 0x000B, 3, b"\xff\x00\x00")
    policy = hashlib.sha256(
        bytes(32) + struct.pack(">I", 0x17F) + selection + hashlib.sha256(values).digest()
    ).digest()
    assert bytes(area.authPolicy) == policy


def test_changed_pcrs_fail_the_policy(swtpm: Swtpm) -> None:
    with Vtpm(swtpm.tcti) as vtpm:
        key = vtpm.ephemeral_key()
    ct = rsa.RSAPublicNumbers(key.e, key.n).public_key().encrypt(b"k" * 32, padding.PKCS1v15())
    swtpm.extend_pcr(7)
    with Vtpm(swtpm.tcti) as vtpm, pytest.raises(TpmError) as err:
        vtpm.decrypt_rsaes(ct, key=key)
    assert err.value.reason == "tpm-pcr-policy"
    assert "PCRs 0-7" in err.value.message
    # Without the key's policy the recreated key differs: the TPM cannot decrypt.
    with Vtpm(swtpm.tcti) as vtpm, pytest.raises(TpmError) as err:
        vtpm.decrypt_rsaes(ct)
    assert err.value.reason == "tpm-decrypt-failed"
    assert swtpm.transient_handles() == 0


def test_changed_pcrs_fail_the_policy_on_the_same_connection(swtpm: Swtpm) -> None:
    with Vtpm(swtpm.tcti) as vtpm:
        key = vtpm.ephemeral_key()
        ct = rsa.RSAPublicNumbers(key.e, key.n).public_key().encrypt(b"k", padding.PKCS1v15())
        extend = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=b"\x01" * 32))
        vtpm._e.pcr_extend(ESYS_TR.PCR0, TPML_DIGEST_VALUES([extend]))
        with pytest.raises(TpmError) as err:
            vtpm.decrypt_rsaes(ct)
    assert err.value.reason == "tpm-pcr-policy"


def test_refresh_writes_user_data_and_waits_boundedly(swtpm: Swtpm) -> None:
    data = hashlib.sha512(b"claims").digest()
    with Vtpm(swtpm.tcti) as vtpm, pytest.raises(TpmError) as err:
        # A bare swtpm has no paravisor that regenerates the report.
        vtpm.refresh_report(data, timeout_s=0.3, poll_s=0.05)
    assert err.value.reason == "tpm-report-stale"
    assert swtpm.read_nv_raw(USER_DATA_INDEX, 64) == data
    # A second refresh with other data rewrites the same index.
    with Vtpm(swtpm.tcti) as vtpm, pytest.raises(TpmError):
        vtpm.refresh_report(bytes(64), timeout_s=0.1, poll_s=0.05)
    assert swtpm.read_nv_raw(USER_DATA_INDEX, 64) == bytes(64)


def test_refresh_redefines_an_index_of_the_wrong_size(swtpm: Swtpm) -> None:
    with ESAPI(swtpm.tcti) as e:
        _define_and_write(e, USER_DATA_INDEX, b"short")
    with Vtpm(swtpm.tcti) as vtpm, pytest.raises(TpmError):
        vtpm.refresh_report(b"\x07" * 64, timeout_s=0.1, poll_s=0.05)
    assert swtpm.read_nv_raw(USER_DATA_INDEX, 64) == b"\x07" * 64


def test_refresh_refuses_wrong_length(swtpm: Swtpm) -> None:
    with Vtpm(swtpm.tcti) as vtpm, pytest.raises(TpmError) as err:
        vtpm.refresh_report(b"short")
    assert err.value.reason == "tpm-bad-request"


def test_missing_nv_index_and_ak(swtpm: Swtpm) -> None:
    with Vtpm(swtpm.tcti) as vtpm:
        with pytest.raises(TpmError) as err:
            vtpm.read_nv(0x01500099)
        assert err.value.reason == "tpm-nv-missing"
        assert "0x01500099" in err.value.message
    with ESAPI(swtpm.tcti) as e:
        ak = e.tr_from_tpmpublic(0x81000003)
        e.evict_control(ESYS_TR.OWNER, ak, 0x81000003)
    with Vtpm(swtpm.tcti) as vtpm, pytest.raises(TpmError) as err:
        vtpm.quote()
    assert err.value.reason == "tpm-ak-missing"


def test_unreachable_tpm(tmp_path: Path) -> None:
    port = _free_port_pair()
    with pytest.raises(TpmError) as err:
        Vtpm(f"swtpm:host=127.0.0.1,port={port}")
    assert err.value.reason == "tpm-unreachable"
    with pytest.raises(TpmError) as err:
        Vtpm(f"device:{tmp_path / 'tpmrm0'}")
    assert err.value.reason == "tpm-unreachable"
