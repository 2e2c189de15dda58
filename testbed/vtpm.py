"""The testbed vTPM: swtpm provisioned the way Azure provisions an SEV-SNP CVM's vTPM.

``Vtpm.start(state_dir, trust)`` starts swtpm, provisions it over tpm2-pytss (ESAPI, swtpm TCTI
straight to swtpm), then starts the report-refresh proxy (testbed/tpmproxy.py) in front of it.
Clients use ``vtpm.tcti``, which points at the proxy.

Provisioning (shared/reference/azure-protocols.md §1):

- PCRs 0-7 get one "boot measurement" each (TPM2_PCR_Event, every active bank), so a quote's
  PCR digest is not the all-zero one.
- AK: RSA-2048, RSASSA-SHA256, fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|
  restricted|sign, a primary of the owner hierarchy, persisted at 0x81000003.
- AK certificate, DER, issued by ``trust.vtpm_ca``, at NV 0x01C101D0 (owner read/write).
- HCL report at NV 0x01400001 (owner read/write, 2048-byte index, zero-padded): the "HCLA"
  envelope around an SNP report signed by ``trust.vcek`` whose REPORT_DATA is the SHA-256 of
  the runtime JSON that names the AK (testbed/hcl.py, testbed/snp.py).
- NV 0x01400002 is left undefined: a guest defines it (owner read/write, 64 bytes) and writes its
  user data there; the proxy then regenerates 0x01400001 (see testbed/tpmproxy.py).

State under ``state_dir``: ``tpm/`` (swtpm's NV state), ``swtpm.pid``, ``swtpm.log``,
``tpmproxy.log`` and ``vtpm.json`` (ports, pids, tcti, VM id, the AK's public key; no private
key material), from which ``Vtpm.attach(state_dir)`` gives another process a handle to stop it,
extend PCRs or replace the AK certificate.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

from testbed import hcl
from testbed.pki import Trust

AK_HANDLE = 0x81000003
AK_CERT_INDEX = 0x01C101D0
HCL_REPORT_INDEX = 0x01400001
USER_DATA_INDEX = 0x01400002
BOOT_PCRS = range(8)
NV_CHUNK = 1024
HOST = "127.0.0.1"
STATE_FILE = "vtpm.json"

# TCG OIDs used in AK certificates (TCG EK Credential Profile): tcg-kp-AIKCertificate, and the
# TPM manufacturer/model/version attributes of the subjectAltName directoryName.
OID_TCG_KP_AIK_CERTIFICATE = ObjectIdentifier("2.23.133.8.3")
OID_TPM_MANUFACTURER = ObjectIdentifier("2.23.133.2.1")
OID_TPM_MODEL = ObjectIdentifier("2.23.133.2.2")
OID_TPM_VERSION = ObjectIdentifier("2.23.133.2.3")

_BOOT_EVENTS = (
    "SRTM firmware (testbed UEFI)",
    "firmware configuration",
    "option ROMs",
    "option ROM configuration",
    "boot manager: shim, grub",
    "boot manager configuration: GPT",
    "platform manufacturer events",
    "secure boot policy: SecureBoot=1, PK, KEK, db, dbx",
)


class VtpmError(RuntimeError):
    """The testbed vTPM could not be started, reached or stopped; ``reason`` is a stable slug."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def normalize_vm_id(vm_id: str | None) -> str:
    """A VM unique id as the runtime JSON carries it: an uppercase GUID."""
    if vm_id is None:
        return str(uuid.uuid4()).upper()
    try:
        return str(uuid.UUID(vm_id)).upper()
    except ValueError:
        raise VtpmError(f"vm_id {vm_id!r} is not a GUID", reason="vtpm-vm-id") from None


def _tpm() -> Any:
    """tpm2-pytss, imported on use: it loads the TSS libraries, which the CLI need not pay for."""
    import tpm2_pytss

    return tpm2_pytss


def _esapi(port: int) -> Any:
    tss = _tpm()
    return tss.ESAPI(tss.TCTILdr("swtpm", f"host={HOST},port={port}"))


def _ak_template() -> Any:
    tss = _tpm()
    attrs = (
        tss.TPMA_OBJECT.FIXEDTPM
        | tss.TPMA_OBJECT.FIXEDPARENT
        | tss.TPMA_OBJECT.SENSITIVEDATAORIGIN
        | tss.TPMA_OBJECT.USERWITHAUTH
        | tss.TPMA_OBJECT.RESTRICTED
        | tss.TPMA_OBJECT.SIGN_ENCRYPT
    )
    scheme = tss.TPMT_RSA_SCHEME(
        scheme=tss.TPM2_ALG.RSASSA,
        details=tss.TPMU_ASYM_SCHEME(rsassa=tss.TPMS_SCHEME_HASH(hashAlg=tss.TPM2_ALG.SHA256)),
    )
    params = tss.TPMS_RSA_PARMS(
        symmetric=tss.TPMT_SYM_DEF_OBJECT(algorithm=tss.TPM2_ALG.NULL),
        scheme=scheme,
        keyBits=2048,
        exponent=0,
    )
    return tss.TPM2B_PUBLIC(
        tss.TPMT_PUBLIC(
            type=tss.TPM2_ALG.RSA,
            nameAlg=tss.TPM2_ALG.SHA256,
            objectAttributes=attrs,
            parameters=tss.TPMU_PUBLIC_PARMS(rsaDetail=params),
        )
    )


def _nv_attributes() -> int:
    tss = _tpm()
    return int(
        tss.TPMA_NV.OWNERWRITE | tss.TPMA_NV.OWNERREAD | tss.TPMA_NV.AUTHREAD | tss.TPMA_NV.NO_DA
    )


def _nv_store(esapi: Any, index: int, data: bytes, size: int) -> None:
    """Define an owner read/write ordinary index of ``size`` bytes and write ``data`` padded."""
    tss = _tpm()
    public = tss.TPM2B_NV_PUBLIC(
        tss.TPMS_NV_PUBLIC(
            nvIndex=index,
            nameAlg=tss.TPM2_ALG.SHA256,
            attributes=_nv_attributes(),
            dataSize=size,
        )
    )
    handle = esapi.nv_define_space(b"", public, auth_handle=tss.ESYS_TR.OWNER)
    padded = data.ljust(size, b"\0")
    for offset in range(0, size, NV_CHUNK):
        esapi.nv_write(
            handle, padded[offset : offset + NV_CHUNK], offset, auth_handle=tss.ESYS_TR.OWNER
        )
    esapi.tr_close(handle)


def _ak_public_key(tpm_public: Any) -> rsa.RSAPublicKey:
    area = tpm_public.publicArea
    exponent = int(area.parameters.rsaDetail.exponent) or 65537
    modulus = int.from_bytes(bytes(area.unique.rsa), "big")
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


def issue_ak_certificate(
    trust: Trust, ak_public: rsa.RSAPublicKey, vm_id: str, *, not_after: dt.datetime | None = None
) -> x509.Certificate:
    """The AK certificate, shaped like Azure's (issuer "Global Virtual TPM CA - 03" style).

    It is valid from five minutes ago for a year, or until ``not_after`` (then from a year
    before it, or five minutes ago if that is earlier): a certificate near or past its expiry
    is how a client's renewal path is exercised.
    """
    issuer = trust.vtpm_ca
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    if not_after is None:
        not_after = now + dt.timedelta(days=365)
    not_before = min(now, not_after - dt.timedelta(days=365))
    tpm_attributes = x509.Name(
        [
            x509.NameAttribute(OID_TPM_MANUFACTURER, "id:4D534654"),  # "MSFT"
            x509.NameAttribute(OID_TPM_MODEL, "testbed vTPM"),
            x509.NameAttribute(OID_TPM_VERSION, "id:00020018"),
        ]
    )
    issuer_public = issuer.key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, vm_id)]))
        .issuer_name(issuer.cert.subject)
        .public_key(ak_public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([OID_TCG_KP_AIK_CERTIFICATE]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.DirectoryName(tpm_attributes)]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ak_public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public),
            critical=False,
        )
        .sign(issuer.key, hashes.SHA256())
    )


def recorded_ak_public(state_dir: Path) -> rsa.RSAPublicKey | None:
    """The AK public key a running vTPM recorded in ``state_dir/vtpm.json``; None when there is
    none (no vTPM started there yet). For services that must know the AK without a TPM."""
    try:
        state = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
        key = serialization.load_pem_public_key(str(state["ak_public_pem"]).encode("ascii"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return key if isinstance(key, rsa.RSAPublicKey) else None


def _pick_port_pair() -> int:
    """A port P with P and P+1 free right now (swtpm binds them itself a moment later)."""
    for _ in range(64):
        with socket.socket() as a, socket.socket() as b:
            a.bind((HOST, 0))
            port: int = a.getsockname()[1]
            if port >= 65535:
                continue
            try:
                b.bind((HOST, port + 1))
            except OSError:
                continue
            return port
    raise VtpmError("no free consecutive port pair for swtpm", reason="vtpm-ports")


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


@dataclass
class _Proc:
    name: str  # "swtpm" or "tpmproxy"; also what its command line must contain
    pid: int
    popen: subprocess.Popen[bytes] | None = None

    @property
    def marker(self) -> bytes:
        return b"swtpm" if self.name == "swtpm" else b"testbed.tpmproxy"

    def ours(self) -> bool:
        """Still the process we started (guards against pid reuse)."""
        if self.popen is not None:
            return self.popen.poll() is None
        cmdline = _cmdline(self.pid)
        return cmdline is not None and self.marker in cmdline and _running(self.pid)

    def signal(self, sig: signal.Signals) -> None:
        if self.ours():
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float) -> bool:
        if self.popen is not None:
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _running(self.pid):
                return True
            time.sleep(0.02)
        return not _running(self.pid)


@dataclass
class Vtpm:
    """A running testbed vTPM: swtpm plus the report-refresh proxy."""

    state_dir: Path
    vm_id: str
    swtpm_port: int
    proxy_port: int
    _procs: list[_Proc] = field(default_factory=list, repr=False)
    _ak_public_pem: str = field(default="", repr=False)

    @property
    def tcti(self) -> str:
        """What clients pass to the swtpm TCTI: it points at the proxy."""
        return f"swtpm:host={HOST},port={self.proxy_port}"

    @property
    def pids(self) -> tuple[int, ...]:
        """Every process this vTPM consists of: swtpm, then the proxy."""
        return tuple(p.pid for p in self._procs)

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    def start(cls, state_dir: Path, trust: Trust, *, vm_id: str | None = None) -> Vtpm:
        """Start swtpm, provision it like an Azure CVM vTPM, start the proxy; return when usable."""
        vm_id = normalize_vm_id(vm_id)
        if not isinstance(trust.vcek.key, ec.EllipticCurvePrivateKey):
            raise VtpmError("trust.vcek must be an EC P-384 key", reason="vtpm-trust")
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        vtpm = cls(state_dir=state_dir, vm_id=vm_id, swtpm_port=0, proxy_port=0)
        try:
            vtpm._start_swtpm()
            ak_public = vtpm._provision(trust)
            vtpm._ak_public_pem = ak_public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode("ascii")
            vtpm._start_proxy(ak_public, trust.vcek.key)
            vtpm._save()
        except BaseException:
            vtpm.stop()
            raise
        return vtpm

    @classmethod
    def attach(cls, state_dir: Path) -> Vtpm:
        """A handle on a vTPM started by another process, from ``state_dir/vtpm.json``."""
        path = state_dir / STATE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            procs = [_Proc(name, int(pid)) for name, pid in state["pids"].items()]
            return cls(
                state_dir=state_dir,
                vm_id=str(state["vm_id"]),
                swtpm_port=int(state["swtpm_port"]),
                proxy_port=int(state["proxy_port"]),
                _procs=procs,
                _ak_public_pem=str(state.get("ak_public_pem", "")),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise VtpmError(f"no usable vTPM state at {path}: {exc}", reason="vtpm-state") from None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop swtpm (control-channel shutdown, else SIGTERM) and the proxy; wait for both.

        Safe to call more than once and from a process that only attached.
        """
        for proc in self._procs:
            if proc.name == "swtpm" and proc.ours():
                try:
                    subprocess.run(
                        ["swtpm_ioctl", "--tcp", f"{HOST}:{self.swtpm_port + 1}", "-s"],
                        capture_output=True,
                        timeout=timeout,
                        check=False,
                    )
                except (OSError, subprocess.TimeoutExpired):
                    pass
                if not proc.wait(1.0):
                    proc.signal(signal.SIGTERM)
            else:
                proc.signal(signal.SIGTERM)
        for proc in self._procs:
            if not proc.wait(timeout):
                proc.signal(signal.SIGKILL)
                proc.wait(timeout)
            if proc.popen is not None and proc.popen.stdout is not None:
                proc.popen.stdout.close()

    def __enter__(self) -> Vtpm:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # -- faults ------------------------------------------------------------------------------

    def extend_pcr(self, index: int, data: bytes) -> None:
        """Measure ``data`` into PCR ``index`` (TPM2_PCR_Event: every bank), through the proxy.

        This is the "PCR changed after attestation" fault; it is safe while clients run, since
        the proxy serialises commands and this uses no transient objects or sessions.
        """
        if not 0 <= index <= 23:
            raise VtpmError(f"PCR index {index} out of range 0-23", reason="vtpm-pcr")
        if len(data) > 1024:
            raise VtpmError("PCR event data is limited to 1024 bytes", reason="vtpm-pcr")
        tss = _tpm()
        try:
            with _esapi(self.proxy_port) as esapi:
                esapi.pcr_event(tss.ESYS_TR(index), data)
        except tss.TSS2_Exception as exc:
            raise VtpmError(f"PCR_Event on PCR {index} failed: {exc}", reason="vtpm-pcr") from None

    # -- the AK certificate -------------------------------------------------------------------

    def ak_public(self) -> rsa.RSAPublicKey:
        """The AK's public key, read from the TPM (TPM2_ReadPublic of 0x81000003)."""
        tss = _tpm()
        try:
            with _esapi(self.proxy_port) as esapi:
                handle = esapi.tr_from_tpmpublic(AK_HANDLE)
                public, _name, _qualified = esapi.read_public(handle)
                esapi.tr_close(handle)
        except tss.TSS2_Exception as exc:
            raise VtpmError(f"ReadPublic of the AK failed: {exc}", reason="vtpm-ak") from None
        return _ak_public_key(public)

    def read_nv(self, index: int) -> bytes:
        """The whole content of NV ``index`` (owner read, in chunks), through the proxy."""
        tss = _tpm()
        try:
            with _esapi(self.proxy_port) as esapi:
                handle = esapi.tr_from_tpmpublic(index)
                nv_public, _ = esapi.nv_read_public(handle)
                size = int(nv_public.nvPublic.dataSize)
                data = b"".join(
                    bytes(
                        esapi.nv_read(
                            handle,
                            min(NV_CHUNK, size - offset),
                            offset,
                            auth_handle=tss.ESYS_TR.OWNER,
                        )
                    )
                    for offset in range(0, size, NV_CHUNK)
                )
                esapi.tr_close(handle)
        except tss.TSS2_Exception as exc:
            raise VtpmError(f"reading NV 0x{index:08X} failed: {exc}", reason="vtpm-nv") from None
        return data

    def read_ak_certificate(self) -> bytes:
        """The DER AK certificate at NV 0x01C101D0 (the index is exactly its size)."""
        return self.read_nv(AK_CERT_INDEX)

    def replace_ak_certificate(self, der: bytes) -> None:
        """Store ``der`` at NV 0x01C101D0 the way Microsoft's guest library stores a renewed
        AK certificate (Tss2Wrapper::WriteAikCert): undefine the index, define it again with
        exactly the certificate's size, write it."""
        tss = _tpm()
        try:
            with _esapi(self.proxy_port) as esapi:
                handle = esapi.tr_from_tpmpublic(AK_CERT_INDEX)
                esapi.nv_undefine_space(handle, auth_handle=tss.ESYS_TR.OWNER)
                _nv_store(esapi, AK_CERT_INDEX, der, len(der))
        except tss.TSS2_Exception as exc:
            raise VtpmError(
                f"writing the AK certificate failed: {exc}", reason="vtpm-ak-cert"
            ) from None

    # -- steps of start ----------------------------------------------------------------------

    def _start_swtpm(self) -> None:
        tpm_dir = self.state_dir / "tpm"
        tpm_dir.mkdir(exist_ok=True, mode=0o700)
        pid_file = self.state_dir / "swtpm.pid"
        log_path = self.state_dir / "swtpm.log"
        for _attempt in range(5):
            port = _pick_port_pair()
            pid_file.unlink(missing_ok=True)
            argv = [
                "swtpm",
                "socket",
                "--tpm2",
                "--server",
                f"type=tcp,port={port},bindaddr={HOST}",
                "--ctrl",
                f"type=tcp,port={port + 1},bindaddr={HOST}",
                "--tpmstate",
                f"dir={tpm_dir}",
                "--flags",
                "not-need-init,startup-clear",
                "--pid",
                f"file={pid_file}",
            ]
            with log_path.open("ab") as log_file:
                try:
                    popen = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
                    )
                except OSError as exc:
                    raise VtpmError(f"cannot run swtpm: {exc}", reason="vtpm-start") from None
            # swtpm writes its pid file only after both sockets are bound and listening, so the
            # pid file (with our child's pid) proves the ports are this swtpm's.
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                if popen.poll() is not None:
                    break
                try:
                    if int(pid_file.read_text().strip() or 0) == popen.pid:
                        self.swtpm_port = port
                        self._procs.append(_Proc("swtpm", popen.pid, popen))
                        return
                except (OSError, ValueError):
                    pass
                time.sleep(0.005)
            else:
                popen.kill()
                popen.wait()
                raise VtpmError("swtpm did not come up within 5 s", reason="vtpm-start")
            # it exited: most likely a port taken between our probe and its bind; try again
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise VtpmError(f"swtpm failed to start: {tail[0]}", reason="vtpm-start")

    def _provision(self, trust: Trust) -> rsa.RSAPublicKey:
        tss = _tpm()
        vcek_key = trust.vcek.key
        assert isinstance(vcek_key, ec.EllipticCurvePrivateKey)  # noqa: S101 - checked in start
        try:
            with _esapi(self.swtpm_port) as esapi:
                for pcr, event in zip(BOOT_PCRS, _BOOT_EVENTS, strict=True):
                    esapi.pcr_event(tss.ESYS_TR(pcr), f"testbed boot: {event}".encode())
                handle, tpm_public, *_ = esapi.create_primary(
                    tss.TPM2B_SENSITIVE_CREATE(), _ak_template(), tss.ESYS_TR.OWNER
                )
                persistent = esapi.evict_control(tss.ESYS_TR.OWNER, handle, AK_HANDLE)
                esapi.flush_context(handle)
                esapi.tr_close(persistent)
                ak_public = _ak_public_key(tpm_public)
                cert = issue_ak_certificate(trust, ak_public, self.vm_id)
                der = cert.public_bytes(serialization.Encoding.DER)
                _nv_store(esapi, AK_CERT_INDEX, der, len(der))
                report = hcl.build_hcl_report(
                    ak_public=ak_public, vm_id=self.vm_id, vcek_key=vcek_key
                )
                _nv_store(esapi, HCL_REPORT_INDEX, report, hcl.NV_MAX_SIZE)
        except tss.TSS2_Exception as exc:
            raise VtpmError(f"provisioning failed: {exc}", reason="vtpm-provision") from None
        return ak_public

    def _start_proxy(
        self, ak_public: rsa.RSAPublicKey, vcek_key: ec.EllipticCurvePrivateKey
    ) -> None:
        config = {
            "upstream_host": HOST,
            "upstream_port": self.swtpm_port,
            "upstream_ctrl_port": self.swtpm_port + 1,
            "listen_host": HOST,
            "vm_id": self.vm_id,
            "ak_public_pem": ak_public.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode(),
            "vcek_key_pem": vcek_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode(),
        }
        # the proxy imports this package: make sure it finds the same copy we run from
        package_root = str(Path(__file__).resolve().parent.parent)
        python_path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
        with (self.state_dir / "tpmproxy.log").open("ab") as log_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "testbed.tpmproxy"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env={**os.environ, "PYTHONPATH": python_path},
            )
        self._procs.append(_Proc("tpmproxy", popen.pid, popen))
        assert popen.stdin is not None and popen.stdout is not None  # noqa: S101 - PIPEs
        try:
            popen.stdin.write(json.dumps(config).encode())
            popen.stdin.close()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([popen.stdout], [], [], 10.0)
        line = popen.stdout.readline() if ready else b""
        try:
            self.proxy_port = int(json.loads(line)["port"])
        except (ValueError, KeyError, TypeError):
            raise VtpmError(
                f"tpmproxy did not start (see {self.state_dir / 'tpmproxy.log'})",
                reason="vtpm-proxy",
            ) from None

    def _save(self) -> None:
        state = {
            "vm_id": self.vm_id,
            "tcti": self.tcti,
            "swtpm_port": self.swtpm_port,
            "swtpm_ctrl_port": self.swtpm_port + 1,
            "proxy_port": self.proxy_port,
            "pids": {p.name: p.pid for p in self._procs},
            "ak_public_pem": self._ak_public_pem,
        }
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.state_dir / STATE_FILE)
