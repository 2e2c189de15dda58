"""The Azure vTPM: NV reads, the attestation key and its certificate, PCR quotes and the
PCR-bound ephemeral key.

On a confidential VM the TCTI is ``device:/dev/tpmrm0`` (the kernel resource manager); tests
use ``swtpm:host=...,port=...``. Handles and indices are Azure's (see
shared/reference/azure-protocols.md §1): the AK is persistent at 0x81000003, its certificate at
NV 0x01C101D0, the HCL report at NV 0x01400001, the report-refresh user data at 0x01400002.

The ephemeral key follows Azure's guest-attestation client: an RSA-2048 decryption key created
as a primary in the NULL hierarchy, whose authPolicy is PolicyPCR over SHA-256 PCRs 0-7, and
which the AK certifies. The NULL seed changes on every TPM reset, so the same template gives
the same key only within one boot; using the key needs a policy session whose PCR values match
the ones it was made with, so a changed boot state cannot decrypt.

The AK certificate is the one NV index this module writes besides the report user data:
:meth:`Vtpm.write_ak_cert` stores a certificate renewed through IMDS (attestd.vtpm) the way
Azure's guest attestation library does.

Every TSS failure becomes a :class:`~confinfer.errors.TpmError` with a stable reason; every
transient object and session this module creates is flushed before the call returns.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from cryptography import x509

from confinfer import hcl
from confinfer.closable import Closable
from confinfer.errors import Reason, TpmError

# The TSS libraries print their own error lines to stderr; failures are reported here as one
# line each instead. An explicit TSS2_LOG in the environment still wins.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_PT_NV,
    TPM2_RC,
    TPM2_SE,
    TPMA_NV,
    TPMA_OBJECT,
)
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_NV_PUBLIC,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMS_NV_PUBLIC,
    TPMS_RSA_PARMS,
    TPMS_SCHEME_HASH,
    TPMT_PUBLIC,
    TPMT_RSA_DECRYPT,
    TPMT_RSA_SCHEME,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMU_PUBLIC_PARMS,
    TPMU_SIG_SCHEME,
)

LOG = logging.getLogger("confinfer.tpm")

AK_HANDLE = 0x81000003
AK_CERT_INDEX = 0x01C101D0
HCL_REPORT_INDEX = 0x01400001
USER_DATA_INDEX = 0x01400002
ATTESTATION_PCRS: tuple[int, ...] = tuple(range(8))
NV_CHUNK = 1024
AK_CERT_MAX_BYTES = 4096  # Azure's AK certificates are about 1.5 KiB
# What Azure's guest attestation library defines NV 0x01C101D0 with (Tss2Util::NvDefineSpace).
AK_CERT_NV_ATTRIBUTES = int(
    TPMA_NV.OWNERREAD | TPMA_NV.OWNERWRITE | TPMA_NV.AUTHREAD | TPMA_NV.AUTHWRITE
)
RSA_EXPONENT_DEFAULT = 65537

_OAEP_HASHES = {"sha1": TPM2_ALG.SHA1, "sha256": TPM2_ALG.SHA256, "sha384": TPM2_ALG.SHA384}
_TCTI_LAYER = 0x000A0000
_LAYER_MASK = 0x00FF0000


@dataclass(frozen=True)
class Quote:
    """A PCR quote by the AK: ``attest`` is the marshalled TPMS_ATTEST it signed."""

    attest: bytes
    signature: bytes  # raw RSASSA-PKCS1v1_5 signature bytes
    pcrs: dict[int, bytes]  # SHA-256 PCR values the quote's digest covers


@dataclass(frozen=True)
class EphemeralKey:
    """The PCR-bound NULL-hierarchy decryption key and the AK's certification of it."""

    public: bytes  # marshalled TPM2B_PUBLIC
    certify_info: bytes  # marshalled TPMS_ATTEST from TPM2_Certify
    certify_signature: bytes  # raw RSASSA signature over certify_info by the AK
    n: int
    e: int
    auth_policy: bytes = field(default=b"", repr=False)


def rsa_numbers(public: bytes) -> tuple[int, int]:
    """(n, e) of a marshalled TPM2B_PUBLIC holding an RSA key."""
    try:
        tpm2b, _ = TPM2B_PUBLIC.unmarshal(public)
    except Exception:  # the unmarshaller raises TSS2_Exception or ValueError
        raise TpmError("not a marshalled TPM2B_PUBLIC", reason=Reason.TPM_BAD_PUBLIC) from None
    area = tpm2b.publicArea
    if area.type != TPM2_ALG.RSA:
        raise TpmError("the key is not an RSA key", reason=Reason.TPM_BAD_PUBLIC)
    n = int.from_bytes(bytes(area.unique.rsa), "big")
    e = int(area.parameters.rsaDetail.exponent) or RSA_EXPONENT_DEFAULT
    return n, e


def pcr_digest(values: dict[int, bytes], pcrs: Iterable[int]) -> bytes:
    """SHA-256 over the PCR values in ascending index order, as TPM2_Quote digests them."""
    return hashlib.sha256(b"".join(values[i] for i in sorted(set(pcrs)))).digest()


def _selection(pcrs: Iterable[int]) -> Any:
    chosen = sorted(set(pcrs))
    if not chosen or chosen[0] < 0 or chosen[-1] > 23:
        raise TpmError(f"PCR selection {chosen} is outside 0..23", reason=Reason.TPM_BAD_REQUEST)
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(i) for i in chosen))


def _ephemeral_template(auth_policy: bytes) -> Any:
    attrs = (
        TPMA_OBJECT.DECRYPT
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.NODA
    )
    params = TPMS_RSA_PARMS(
        symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
        scheme=TPMT_RSA_SCHEME(scheme=TPM2_ALG.NULL),
        keyBits=2048,
        exponent=0,
    )
    return TPM2B_PUBLIC(
        TPMT_PUBLIC(
            type=TPM2_ALG.RSA,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=attrs,
            authPolicy=auth_policy,
            parameters=TPMU_PUBLIC_PARMS(rsaDetail=params),
        )
    )


def _tss_error(
    exc: TSS2_Exception,
    action: str,
    *,
    missing: Reason | None = None,
    tcti: str | None = None,
) -> TpmError:
    """Map a TSS failure to a TpmError with a stable reason."""
    rc = int(exc.rc)
    if rc & _LAYER_MASK == _TCTI_LAYER:
        where = f" at {tcti!r}" if tcti else ""
        return TpmError(
            f"{action}: cannot reach the vTPM{where} ({exc})",
            reason=Reason.TPM_UNREACHABLE,
            hint="on a confidential VM the vTPM is /dev/tpmrm0 (needs root or the tss group)",
        )
    if rc & _LAYER_MASK == 0:
        error = int(exc.error)
        if error == TPM2_RC.HANDLE and missing:
            return TpmError(f"{action}: not present in the vTPM", reason=missing)
        if error in (TPM2_RC.POLICY_FAIL, TPM2_RC.PCR_CHANGED):
            return TpmError(
                f"{action}: the vTPM refused: PCRs 0-7 differ from when the key was made",
                reason=Reason.TPM_PCR_POLICY,
                hint="the boot state changed since attestation; attest again",
            )
        if error == TPM2_RC.NV_UNINITIALIZED:
            return TpmError(f"{action}: the NV index was never written", reason=Reason.TPM_NV_EMPTY)
        if error in (TPM2_RC.AUTH_FAIL, TPM2_RC.BAD_AUTH, TPM2_RC.NV_AUTHORIZATION):
            return TpmError(f"{action}: authorization refused ({exc})", reason=Reason.TPM_AUTH)
        if error == TPM2_RC.LOCKOUT:
            return TpmError(
                f"{action}: the vTPM is in dictionary-attack lockout", reason=Reason.TPM_LOCKOUT
            )
    return TpmError(f"{action}: {exc}", reason=Reason.TPM_ERROR)


class Vtpm(Closable):
    """One ESAPI connection to the vTPM. Use as a context manager."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti
        self._ak: Any = None
        self._ak_scheme: Any = None
        self._ephemeral: EphemeralKey | None = None
        self._nv_chunk: int | None = None
        try:
            self._esys = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise _tss_error(exc, "connect", tcti=tcti) from None
        except (ValueError, RuntimeError) as exc:  # a malformed TCTI string
            raise TpmError(
                f"connect: bad TCTI {tcti!r}: {exc}", reason=Reason.TPM_UNREACHABLE
            ) from None

    def close(self) -> None:
        if self._esys is None:
            return
        if self._ak is not None:
            self._quietly(self._esys.tr_close, self._ak)
            self._ak = None
        self._esys.close()
        self._esys = None

    # -- plumbing -------------------------------------------------------------------------

    @property
    def _e(self) -> Any:
        if self._esys is None:
            raise TpmError("the vTPM connection is closed", reason=Reason.TPM_CLOSED)
        return self._esys

    def _fail(self, exc: TSS2_Exception, action: str, missing: Reason | None = None) -> NoReturn:
        raise _tss_error(exc, action, missing=missing, tcti=self.tcti) from None

    @staticmethod
    def _quietly(fn: Any, *args: Any) -> None:
        """Release a handle during cleanup; the first error is the one worth reporting."""
        try:
            fn(*args)
        except TSS2_Exception as exc:
            LOG.debug("vTPM cleanup failed: %s", exc)

    def _ak_handle(self) -> Any:
        """The AK's ESYS_TR (kept for this connection) and the signing scheme to ask for."""
        if self._ak is not None:
            return self._ak
        try:
            ak = self._e.tr_from_tpmpublic(AK_HANDLE)
        except TSS2_Exception as exc:
            self._fail(exc, f"AK 0x{AK_HANDLE:08X}", missing=Reason.TPM_AK_MISSING)
        try:
            try:
                public, _, _ = self._e.read_public(ak)
            except TSS2_Exception as exc:
                self._fail(exc, f"AK 0x{AK_HANDLE:08X}", missing=Reason.TPM_AK_MISSING)
            area = public.publicArea
            if area.type != TPM2_ALG.RSA:
                raise TpmError("the AK is not an RSA key", reason=Reason.TPM_AK_INVALID)
            scheme = area.parameters.rsaDetail.scheme.scheme
            if scheme == TPM2_ALG.NULL:
                # An AK without a fixed scheme: ask for the one MAA expects.
                self._ak_scheme = TPMT_SIG_SCHEME(
                    scheme=TPM2_ALG.RSASSA,
                    details=TPMU_SIG_SCHEME(rsassa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256)),
                )
            elif scheme == TPM2_ALG.RSASSA:
                self._ak_scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
            else:
                raise TpmError(
                    f"the AK signs with {scheme}, not RSASSA", reason=Reason.TPM_AK_INVALID
                )
        except BaseException:
            self._quietly(self._e.tr_close, ak)
            raise
        self._ak = ak
        return ak

    def _buffer_max(self) -> int:
        if self._nv_chunk is not None:
            return self._nv_chunk
        try:
            _, caps = self._e.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT_NV.BUFFER_MAX, 1)
        except TSS2_Exception as exc:
            self._fail(exc, "read TPM properties")
        props = caps.data.tpmProperties
        self._nv_chunk = NV_CHUNK
        if props.count and props.tpmProperty[0].property == TPM2_PT_NV.BUFFER_MAX:
            self._nv_chunk = max(1, min(NV_CHUNK, int(props.tpmProperty[0].value)))
        return self._nv_chunk

    # -- NV -------------------------------------------------------------------------------

    def read_nv(self, index: int) -> bytes:
        """The whole NV index; size from NV_ReadPublic, read in chunks of at most 1 KiB."""
        what = f"NV index 0x{index:08X}"
        try:
            tr = self._e.tr_from_tpmpublic(index)
        except TSS2_Exception as exc:
            self._fail(exc, what, missing=Reason.TPM_NV_MISSING)
        try:
            try:
                public, _ = self._e.nv_read_public(tr)
            except TSS2_Exception as exc:
                self._fail(exc, what, missing=Reason.TPM_NV_MISSING)
            attrs = public.nvPublic.attributes
            size = int(public.nvPublic.dataSize)
            if attrs & TPMA_NV.OWNERREAD:
                auth = ESYS_TR.OWNER
            elif attrs & TPMA_NV.AUTHREAD:
                auth = tr
            else:
                raise TpmError(f"{what}: neither owner- nor auth-readable", reason=Reason.TPM_AUTH)
            chunk = self._buffer_max()
            out = bytearray()
            try:
                while len(out) < size:
                    n = min(chunk, size - len(out))
                    data = self._e.nv_read(tr, n, len(out), auth_handle=auth)
                    out += bytes(data)
            except TSS2_Exception as exc:
                self._fail(exc, f"read {what}", missing=Reason.TPM_NV_MISSING)
            return bytes(out)
        finally:
            self._quietly(self._e.tr_close, tr)

    def hcl_report(self) -> bytes:
        """The HCL report from NV 0x01400001, trimmed to its ``report_size``."""
        raw = self.read_nv(HCL_REPORT_INDEX)
        return raw[: hcl.report_size(raw)]

    def ak_cert(self) -> bytes:
        """The AK certificate (DER) from NV 0x01C101D0, without the index's padding."""
        raw = self.read_nv(AK_CERT_INDEX)
        der = raw[: _der_length(raw)]
        try:
            x509.load_der_x509_certificate(der)
        except ValueError:
            raise TpmError(
                f"NV index 0x{AK_CERT_INDEX:08X} does not hold a DER certificate",
                reason=Reason.TPM_AK_CERT_INVALID,
            ) from None
        return der

    def write_ak_cert(self, der: bytes) -> None:
        """Store ``der`` as the AK certificate at NV 0x01C101D0.

        As Azure's guest attestation library stores a renewed certificate
        (Tss2Wrapper::WriteAikCert): the index is undefined and defined again with exactly the
        certificate's size (owner and auth read/write, empty auth value), then written in
        chunks. An index that already has that size is written in place. When a step fails,
        the old content is put back (best effort) before the failure is raised; the new
        content is read back before this returns.
        """
        if not der or len(der) > AK_CERT_MAX_BYTES or _der_length(der) != len(der):
            raise TpmError(
                f"the AK certificate to write is not one DER certificate of at most "
                f"{AK_CERT_MAX_BYTES} bytes",
                reason=Reason.TPM_BAD_REQUEST,
            )
        try:
            x509.load_der_x509_certificate(der)
        except ValueError:
            raise TpmError(
                "the AK certificate to write is not a DER certificate",
                reason=Reason.TPM_BAD_REQUEST,
            ) from None
        try:
            old: bytes | None = self.read_nv(AK_CERT_INDEX)
        except TpmError as exc:
            if exc.reason is not Reason.TPM_NV_MISSING:
                raise  # never replace what could not be read back if the write fails
            old = None
        try:
            self._store_nv(AK_CERT_INDEX, der)
        except TpmError:
            if old is not None:
                try:
                    self._store_nv(AK_CERT_INDEX, old)
                except TpmError as exc:
                    LOG.error("could not restore the AK certificate: %s", exc.one_line())
            raise
        if self.read_nv(AK_CERT_INDEX) != der:
            raise TpmError(
                f"NV index 0x{AK_CERT_INDEX:08X} does not read back as written",
                reason=Reason.TPM_ERROR,
            )

    def _store_nv(self, index: int, data: bytes) -> None:
        """Write ``data`` as the whole content of NV ``index``: in place when the index has
        exactly that size and is writable, else undefined (when present) and defined again
        with that size and :data:`AK_CERT_NV_ATTRIBUTES`."""
        what = f"NV index 0x{index:08X}"
        e = self._e
        tr = None
        attrs = 0
        try:
            try:
                tr = e.tr_from_tpmpublic(index)
                public, _ = e.nv_read_public(tr)
            except TSS2_Exception as exc:
                if int(exc.error) != TPM2_RC.HANDLE:
                    self._fail(exc, what)
                if tr is not None:
                    self._quietly(e.tr_close, tr)
                    tr = None
            else:
                attrs = int(public.nvPublic.attributes)
                writable = attrs & (TPMA_NV.OWNERWRITE | TPMA_NV.AUTHWRITE)
                if int(public.nvPublic.dataSize) != len(data) or not writable:
                    try:
                        e.nv_undefine_space(tr, ESYS_TR.OWNER)  # releases the ESYS_TR too
                    except TSS2_Exception as exc:
                        self._fail(exc, f"undefine {what}")
                    tr = None
            if tr is None:
                attrs = AK_CERT_NV_ATTRIBUTES
                try:
                    tr = e.nv_define_space(
                        None,
                        TPM2B_NV_PUBLIC(
                            TPMS_NV_PUBLIC(
                                nvIndex=index,
                                nameAlg=TPM2_ALG.SHA256,
                                attributes=attrs,
                                dataSize=len(data),
                            )
                        ),
                        ESYS_TR.OWNER,
                    )
                except TSS2_Exception as exc:
                    self._fail(exc, f"define {what}")
            auth = ESYS_TR.OWNER if attrs & TPMA_NV.OWNERWRITE else tr
            chunk = self._buffer_max()
            try:
                for offset in range(0, len(data), chunk):
                    e.nv_write(tr, data[offset : offset + chunk], offset, auth_handle=auth)
            except TSS2_Exception as exc:
                self._fail(exc, f"write {what}")
        finally:
            if tr is not None:
                self._quietly(e.tr_close, tr)

    def ak_public(self) -> bytes:
        """The marshalled TPM2B_PUBLIC of the AK at 0x81000003."""
        ak = self._ak_handle()
        try:
            public, _, _ = self._e.read_public(ak)
        except TSS2_Exception as exc:
            self._fail(exc, f"AK 0x{AK_HANDLE:08X}", missing=Reason.TPM_AK_MISSING)
        return bytes(public.marshal())

    def refresh_report(
        self, user_data: bytes, *, timeout_s: float = 10.0, poll_s: float = 0.1
    ) -> bytes:
        """Write 64 bytes to NV 0x01400002 and return the HCL report regenerated with them.

        The paravisor regenerates the report asynchronously; poll (bounded) until the report
        changes and echoes the new user data, rather than sleeping a fixed time.
        """
        if len(user_data) != hcl.USER_DATA_SIZE:
            raise TpmError(
                f"report user data must be {hcl.USER_DATA_SIZE} bytes, got {len(user_data)}",
                reason=Reason.TPM_BAD_REQUEST,
            )
        before = self.hcl_report()
        self._write_user_data(bytes(user_data))
        deadline = time.monotonic() + timeout_s
        current = before
        while True:
            current = self.hcl_report()
            echoed = hcl.parse(current).user_data
            if current != before and echoed in (None, user_data):
                return current
            if time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
        if hcl.parse(current).user_data == user_data:
            # The report already carried these bytes; it binds them all the same.
            return current
        raise TpmError(
            f"the HCL report did not change within {timeout_s:g} s of writing NV "
            f"0x{USER_DATA_INDEX:08X}",
            reason=Reason.TPM_REPORT_STALE,
            hint="the paravisor did not regenerate the report; is this an Azure CVM?",
        )

    def _write_user_data(self, data: bytes) -> None:
        """Write NV 0x01400002, (re)defining it first when absent or of another size."""
        what = f"NV index 0x{USER_DATA_INDEX:08X}"
        e = self._e
        tr, attrs = None, 0
        try:
            tr = e.tr_from_tpmpublic(USER_DATA_INDEX)
            public, _ = e.nv_read_public(tr)
            attrs = int(public.nvPublic.attributes)
            if int(public.nvPublic.dataSize) != len(data):
                LOG.debug("redefining %s for %d bytes", what, len(data))
                e.nv_undefine_space(tr, ESYS_TR.OWNER)  # releases the ESYS_TR too
                tr = None
        except TSS2_Exception as exc:
            if int(exc.error) != TPM2_RC.HANDLE:
                if tr is not None:
                    self._quietly(e.tr_close, tr)
                self._fail(exc, what)
        try:
            if tr is None:
                attrs = int(
                    TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD
                )
                tr = e.nv_define_space(
                    None,
                    TPM2B_NV_PUBLIC(
                        TPMS_NV_PUBLIC(
                            nvIndex=USER_DATA_INDEX,
                            nameAlg=TPM2_ALG.SHA256,
                            attributes=attrs,
                            dataSize=len(data),
                        )
                    ),
                    ESYS_TR.OWNER,
                )
            auth = ESYS_TR.OWNER if attrs & TPMA_NV.OWNERWRITE else tr
            e.nv_write(tr, data, 0, auth_handle=auth)
        except TSS2_Exception as exc:
            self._fail(exc, f"write {what}")
        finally:
            if tr is not None:
                self._quietly(e.tr_close, tr)

    # -- PCRs and quotes ------------------------------------------------------------------

    def pcr_values(self, pcrs: Sequence[int] = ATTESTATION_PCRS) -> dict[int, bytes]:
        """Current SHA-256 PCR values."""
        wanted = set(pcrs)
        _selection(wanted)
        values: dict[int, bytes] = {}
        for _ in range(len(wanted) + 1):  # TPM2_PCR_Read returns at most 8 per call
            remaining = sorted(wanted - values.keys())
            if not remaining:
                break
            try:
                _, selected, digests = self._e.pcr_read(_selection(remaining))
            except TSS2_Exception as exc:
                self._fail(exc, "read PCRs")
            got = [i for i in remaining if _selected(selected, i)]
            if not got:
                raise TpmError("the vTPM has no SHA-256 PCR bank", reason=Reason.TPM_NO_SHA256_BANK)
            for i, digest in zip(got, digests, strict=False):
                values[i] = bytes(digest)
        return values

    def quote(self, pcrs: Sequence[int] = ATTESTATION_PCRS, qualifying_data: bytes = b"") -> Quote:
        """TPM2_Quote by the AK over SHA-256 PCRs, with the values its digest covers."""
        ak = self._ak_handle()
        selection = _selection(pcrs)
        for _ in range(3):
            try:
                quoted, signature = self._e.quote(ak, selection, qualifying_data, self._ak_scheme)
            except TSS2_Exception as exc:
                self._fail(exc, "quote")
            attest = bytes(quoted.attestationData)
            values = self.pcr_values(pcrs)
            parsed, _ = TPMS_ATTEST.unmarshal(attest)
            if bytes(parsed.attested.quote.pcrDigest) == pcr_digest(values, pcrs):
                return Quote(attest=attest, signature=_rsassa(signature), pcrs=values)
            LOG.debug("PCRs changed between quote and read; quoting again")
        raise TpmError("PCRs kept changing while quoting", reason=Reason.TPM_PCR_CHANGED)

    # -- the ephemeral key ----------------------------------------------------------------

    def _pcr_policy(self) -> bytes:
        """authPolicy of PolicyPCR(SHA-256 PCRs 0-7) at their current values (trial session)."""
        e = self._e
        try:
            session = e.start_auth_session(
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.TRIAL,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256,
            )
        except TSS2_Exception as exc:
            self._fail(exc, "start a trial session")
        try:
            e.policy_pcr(session, TPM2B_DIGEST(), _selection(ATTESTATION_PCRS))
            return bytes(e.policy_get_digest(session))
        except TSS2_Exception as exc:
            self._fail(exc, "compute the PCR policy")
        finally:
            self._quietly(e.flush_context, session)

    def _create_ephemeral(self, auth_policy: bytes) -> tuple[Any, Any]:
        try:
            handle, public, _, _, _ = self._e.create_primary(
                TPM2B_SENSITIVE_CREATE(), _ephemeral_template(auth_policy), ESYS_TR.NULL
            )
        except TSS2_Exception as exc:
            self._fail(exc, "create the ephemeral key")
        return handle, public

    def ephemeral_key(self) -> EphemeralKey:
        """Create the PCR-bound ephemeral key and have the AK certify it."""
        ak = self._ak_handle()
        policy = self._pcr_policy()
        handle, public = self._create_ephemeral(policy)
        try:
            try:
                info, signature = self._e.certify(handle, ak, b"", self._ak_scheme)
            except TSS2_Exception as exc:
                self._fail(exc, "certify the ephemeral key")
        finally:
            self._quietly(self._e.flush_context, handle)
        marshalled = bytes(public.marshal())
        n, e = rsa_numbers(marshalled)
        key = EphemeralKey(
            public=marshalled,
            certify_info=bytes(info.attestationData),
            certify_signature=_rsassa(signature),
            n=n,
            e=e,
            auth_policy=policy,
        )
        self._ephemeral = key
        return key

    def decrypt_rsaes(self, ciphertext: bytes, *, key: EphemeralKey | None = None) -> bytearray:
        """RSAES-PKCS1-v1_5 decryption with the ephemeral key (MAA's inner key)."""
        return self._decrypt(ciphertext, TPMT_RSA_DECRYPT(scheme=TPM2_ALG.RSAES), key)

    def decrypt_oaep(
        self, ciphertext: bytes, hash_name: str, *, key: EphemeralKey | None = None
    ) -> bytearray:
        """RSA-OAEP decryption with the ephemeral key (MGF1 with the same hash, empty label)."""
        alg = _OAEP_HASHES.get(hash_name)
        if alg is None:
            raise TpmError(
                f"OAEP hash {hash_name!r} is not one of {', '.join(_OAEP_HASHES)}",
                reason=Reason.TPM_BAD_REQUEST,
            )
        scheme = TPMT_RSA_DECRYPT(scheme=TPM2_ALG.OAEP)
        scheme.details.oaep.hashAlg = alg
        return self._decrypt(ciphertext, scheme, key)

    def _decrypt(self, ciphertext: bytes, scheme: Any, key: EphemeralKey | None) -> bytearray:
        """Recreate the ephemeral key, satisfy its PCR policy, decrypt, flush everything.

        The key made by :meth:`ephemeral_key` on this connection (or ``key``) fixes the
        authPolicy, so changed PCRs fail the policy check. Without one, the policy is
        recomputed from the current PCRs, as Azure's client does.
        """
        e = self._e
        known = key or self._ephemeral
        policy = known.auth_policy if known and known.auth_policy else self._pcr_policy()
        handle, public = self._create_ephemeral(policy)
        session = None
        try:
            if known is not None:
                n, _ = rsa_numbers(bytes(public.marshal()))
                if n != known.n:
                    raise TpmError(
                        "the ephemeral key cannot be recreated (the vTPM was reset since)",
                        reason=Reason.TPM_EPHEMERAL_CHANGED,
                        hint="attest again to get a new key",
                    )
            try:
                session = e.start_auth_session(
                    ESYS_TR.NONE,
                    ESYS_TR.NONE,
                    TPM2_SE.POLICY,
                    TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                    TPM2_ALG.SHA256,
                )
                e.policy_pcr(session, TPM2B_DIGEST(), _selection(ATTESTATION_PCRS))
            except TSS2_Exception as exc:
                self._fail(exc, "start the PCR policy session")
            try:
                out = e.rsa_decrypt(handle, bytes(ciphertext), scheme, b"", session1=session)
            except TSS2_Exception as exc:
                err = _tss_error(exc, "decrypt with the ephemeral key", tcti=self.tcti)
                if err.reason == Reason.TPM_ERROR and int(exc.rc) & _LAYER_MASK == 0:
                    err = TpmError(
                        "the ephemeral key could not decrypt: the ciphertext is not for this "
                        "key" + ("" if known else ", or PCRs 0-7 changed since the key was made"),
                        reason=Reason.TPM_DECRYPT_FAILED,
                    )
                raise err from None
            plain = bytearray(bytes(out))
            _wipe(out)
            return plain
        finally:
            if session is not None:
                self._quietly(e.flush_context, session)
            self._quietly(e.flush_context, handle)


def _selected(selection: Any, pcr: int) -> bool:
    for sel in selection.pcrSelections[: selection.count]:
        if sel.hash == TPM2_ALG.SHA256 and pcr // 8 < sel.sizeofSelect:
            return bool(sel.pcrSelect[pcr // 8] & (1 << (pcr % 8)))
    return False


def _rsassa(signature: Any) -> bytes:
    if signature.sigAlg != TPM2_ALG.RSASSA:
        raise TpmError(
            f"the AK signed with {signature.sigAlg}, not RSASSA", reason=Reason.TPM_AK_INVALID
        )
    return bytes(signature.signature.rsassa.sig)


def _wipe(tpm2b: Any) -> None:
    """Overwrite a TSS buffer that held secret bytes (best effort: Python copies remain)."""
    try:
        tpm2b.buffer = bytes(int(tpm2b.size))
    except (AttributeError, TypeError, ValueError):
        LOG.debug("could not wipe a TSS buffer")


def _der_length(raw: bytes) -> int:
    """Length of the DER SEQUENCE at the start of ``raw`` (NV indices are padded)."""

    def bad() -> TpmError:
        return TpmError(
            f"NV index 0x{AK_CERT_INDEX:08X} does not hold a DER certificate",
            reason=Reason.TPM_AK_CERT_INVALID,
        )

    if len(raw) < 2 or raw[0] != 0x30:
        raise bad()
    first = raw[1]
    if first < 0x80:
        header, length = 2, first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or len(raw) < 2 + count:
            raise bad()
        header, length = 2 + count, int.from_bytes(raw[2 : 2 + count], "big")
    if header + length > len(raw):
        raise bad()
    return header + length
