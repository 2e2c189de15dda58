"""A TCP proxy in front of swtpm that plays the Azure paravisor's part: HCL report refresh.

Clients reach the vTPM through this proxy with the ``swtpm`` TCTI
(``swtpm:host=127.0.0.1,port=<port>``); that TCTI opens a fresh TCP connection per TPM command
on ``port`` and a fresh one per control message on ``port + 1``, so the proxy listens on both.

Data port: each connection carries raw TPM 2.0 commands (10-byte header, big-endian total size
at bytes 2..6). The proxy reads one whole command, forwards it over its single persistent
connection to swtpm, reads the whole response and returns it. Commands from all clients are
serialised by one lock, so one TPM command runs at a time.

Control port: each connection is piped to swtpm's control port byte for byte (the TCTI sends a
4-byte control code plus payload, e.g. SET_LOCALITY, and reads the 4-byte result).

Report refresh (what Azure's paravisor does when a guest writes NV 0x01400002): after
forwarding a TPM2_NV_Write (command code 0x137) whose nvIndex handle is 0x01400002 and that
succeeded, the proxy, still holding the lock, reads the index back (NV_ReadPublic for its size,
NV_Read with owner auth, or the index's own empty auth if it is not owner-readable), builds a new
runtime JSON with ``"user-data": <uppercase hex>``, has the testbed "hardware" sign a new SNP
report whose REPORT_DATA is SHA-256 of that JSON, and writes the new HCL report, padded, to NV
0x01400001 with owner auth. Only then does the client get its NV_Write response, so a client
that reads 0x01400001 next sees the new report (Azure clients wait ~3 s; here none is needed).
User data that is not exactly 64 bytes, or an index the proxy cannot read, leaves the report as
it was (a warning is logged) and the client's response untouched.

Run as ``python -m testbed.tpmproxy``: a JSON config on stdin (upstream ports, VM id, AK public
key, VCEK private key: key material never touches the command line), one JSON line
``{"port": N}`` on stdout once both ports listen. SIGTERM stops it.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from types import FrameType

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from testbed import hcl

log = logging.getLogger("testbed.tpmproxy")

HCL_REPORT_INDEX = 0x01400001
USER_DATA_INDEX = 0x01400002

TPM_ST_NO_SESSIONS = 0x8001
TPM_ST_SESSIONS = 0x8002
TPM_RH_OWNER = 0x40000001
TPM_RS_PW = 0x40000009
TPM_CC_NV_WRITE = 0x00000137
TPM_CC_NV_READ = 0x0000014E
TPM_CC_NV_READ_PUBLIC = 0x00000169
TPMA_NV_OWNERREAD = 1 << 17
TPMA_NV_AUTHREAD = 1 << 18
TPMA_NV_WRITTEN = 1 << 29

HEADER_SIZE = 10
MAX_MESSAGE = 64 * 1024  # far above any TPM command or response; guards a corrupt size field
NV_CHUNK = 1024  # MAX_NV_BUFFER_SIZE of libtpms
UPSTREAM_TIMEOUT_S = 60.0


class ProxyError(Exception):
    """A TPM exchange failed; ``reason`` is a stable slug."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def read_message(sock: socket.socket) -> bytes:
    """One TPM command or response: the 10-byte header, then the rest as its size says."""
    header = _recv_exact(sock, HEADER_SIZE)
    size = struct.unpack_from(">I", header, 2)[0]
    if not HEADER_SIZE <= size <= MAX_MESSAGE:
        raise ProxyError(f"TPM message size {size} out of range", reason="tpm-framing")
    return header + _recv_exact(sock, size - HEADER_SIZE)


def response_code(response: bytes) -> int:
    return int(struct.unpack_from(">I", response, 6)[0])


def _pw_auth_area() -> bytes:
    """An authorization area with one password session and an empty password."""
    session = struct.pack(">IHBH", TPM_RS_PW, 0, 0, 0)  # handle, nonce, attributes, hmac
    return struct.pack(">I", len(session)) + session


def _command(cc: int, handles: tuple[int, ...], params: bytes, *, auth: bool) -> bytes:
    body = b"".join(struct.pack(">I", h) for h in handles)
    body += _pw_auth_area() if auth else b""
    body += params
    tag = TPM_ST_SESSIONS if auth else TPM_ST_NO_SESSIONS
    return struct.pack(">HII", tag, HEADER_SIZE + len(body), cc) + body


@dataclass(frozen=True)
class NvPublic:
    index: int
    attributes: int
    size: int


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    ctrl_port: int


class ReportPublisher:
    """Builds and stores the HCL report; the only holder of the VCEK in the proxy."""

    def __init__(
        self, vm_id: str, ak_public: rsa.RSAPublicKey, vcek_key: ec.EllipticCurvePrivateKey
    ) -> None:
        self.vm_id = vm_id
        self.ak_public = ak_public
        self._vcek_key = vcek_key

    def build(self, user_data: bytes | None) -> bytes:
        return hcl.build_hcl_report(
            ak_public=self.ak_public,
            vm_id=self.vm_id,
            vcek_key=self._vcek_key,
            user_data=user_data,
        )


class TpmProxy:
    """Serialises TPM traffic to swtpm and refreshes the HCL report on user-data writes."""

    def __init__(self, upstream: Upstream, publisher: ReportPublisher) -> None:
        self.upstream = upstream
        self.publisher = publisher
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    # -- upstream exchange (caller holds the lock) ------------------------------------------

    def _exchange(self, command: bytes) -> bytes:
        if self._sock is None:
            self._sock = socket.create_connection(
                (self.upstream.host, self.upstream.port), timeout=UPSTREAM_TIMEOUT_S
            )
        try:
            self._sock.sendall(command)
            return read_message(self._sock)
        except (OSError, EOFError, ProxyError):
            self._sock.close()
            self._sock = None
            raise

    def _call(self, command: bytes, what: str) -> bytes:
        response = self._exchange(command)
        rc = response_code(response)
        if rc != 0:
            raise ProxyError(f"{what} failed: TPM rc 0x{rc:08x}", reason="tpm-rc")
        return response

    def nv_read_public(self, index: int) -> NvPublic:
        response = self._call(
            _command(TPM_CC_NV_READ_PUBLIC, (index,), b"", auth=False), "NV_ReadPublic"
        )
        # TPM2B_NV_PUBLIC: size, nvIndex, nameAlg, attributes, authPolicy (TPM2B), dataSize
        offset = HEADER_SIZE + 2
        nv_index, _name_alg, attributes, policy_size = struct.unpack_from(">IHIH", response, offset)
        offset += 12 + policy_size
        (size,) = struct.unpack_from(">H", response, offset)
        return NvPublic(nv_index, attributes, size)

    def nv_read(self, index: int, auth_handle: int, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            chunk = min(NV_CHUNK, size - len(data))
            params = struct.pack(">HH", chunk, len(data))
            response = self._call(
                _command(TPM_CC_NV_READ, (auth_handle, index), params, auth=True), "NV_Read"
            )
            # parameterSize (4), then TPM2B_MAX_NV_BUFFER
            (got,) = struct.unpack_from(">H", response, HEADER_SIZE + 4)
            start = HEADER_SIZE + 6
            data += response[start : start + got]
            if got == 0:
                raise ProxyError("NV_Read returned no data", reason="tpm-framing")
        return bytes(data)

    def nv_write(self, index: int, auth_handle: int, data: bytes) -> None:
        for offset in range(0, len(data), NV_CHUNK):
            chunk = data[offset : offset + NV_CHUNK]
            params = struct.pack(">H", len(chunk)) + chunk + struct.pack(">H", offset)
            self._call(
                _command(TPM_CC_NV_WRITE, (auth_handle, index), params, auth=True), "NV_Write"
            )

    # -- client traffic ---------------------------------------------------------------------

    def forward(self, command: bytes) -> bytes:
        """Run one client command; refresh the report if it was a successful user-data write."""
        with self._lock:
            response = self._exchange(command)
            if is_user_data_write(command) and response_code(response) == 0:
                self._refresh()
            return response

    def _refresh(self) -> None:
        try:
            public = self.nv_read_public(USER_DATA_INDEX)
            if public.size != hcl.USER_DATA_SIZE:
                log.warning(
                    "user data index holds %d bytes, not %d: report not refreshed",
                    public.size,
                    hcl.USER_DATA_SIZE,
                )
                return
            if public.attributes & TPMA_NV_OWNERREAD:
                auth_handle = TPM_RH_OWNER
            elif public.attributes & TPMA_NV_AUTHREAD:
                auth_handle = USER_DATA_INDEX
            else:
                log.warning(
                    "user data index is neither owner- nor auth-readable: report not refreshed"
                )
                return
            user_data = self.nv_read(USER_DATA_INDEX, auth_handle, public.size)
            report = self.publisher.build(user_data)
            target = self.nv_read_public(HCL_REPORT_INDEX)
            if len(report) > target.size:
                log.warning(
                    "new report (%d bytes) exceeds the report index (%d bytes): "
                    "report not refreshed",
                    len(report),
                    target.size,
                )
                return
            self.nv_write(HCL_REPORT_INDEX, TPM_RH_OWNER, report.ljust(target.size, b"\0"))
            log.info("HCL report refreshed with new user data (%d bytes used)", len(report))
        except (ProxyError, hcl.HclReportError, OSError, EOFError) as exc:
            log.warning("report refresh failed: %s", exc)

    def serve_data(self, client: socket.socket) -> None:
        with client:
            while True:
                try:
                    command = read_message(client)
                except (EOFError, OSError):
                    return
                except ProxyError as exc:
                    log.warning("dropping client: %s", exc)
                    return
                try:
                    response = self.forward(command)
                except (OSError, EOFError, ProxyError) as exc:
                    log.warning("swtpm exchange failed, dropping client: %s", exc)
                    return
                try:
                    client.sendall(response)
                except OSError:
                    return

    def serve_ctrl(self, client: socket.socket) -> None:
        with client:
            try:
                upstream = socket.create_connection(
                    (self.upstream.host, self.upstream.ctrl_port), timeout=5.0
                )
            except OSError as exc:
                log.warning("swtpm control port unreachable: %s", exc)
                return
            with upstream:
                upstream.settimeout(None)
                _pipe(client, upstream)


def is_user_data_write(command: bytes) -> bool:
    """True for TPM2_NV_Write whose nvIndex (second handle) is the user-data index."""
    if len(command) < HEADER_SIZE + 8:
        return False
    cc = struct.unpack_from(">I", command, 6)[0]
    nv_index = struct.unpack_from(">I", command, HEADER_SIZE + 4)[0]
    return bool(cc == TPM_CC_NV_WRITE and nv_index == USER_DATA_INDEX)


def _pipe(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until either side closes."""
    with selectors.DefaultSelector() as sel:
        sel.register(a, selectors.EVENT_READ, (a, b))
        sel.register(b, selectors.EVENT_READ, (b, a))
        while True:
            for key, _ in sel.select():
                src, dst = key.data
                try:
                    data = src.recv(65536)
                    if not data:
                        return
                    dst.sendall(data)
                except OSError:
                    return


def bind_port_pair(host: str, attempts: int = 64) -> tuple[socket.socket, socket.socket]:
    """Two listening sockets on consecutive ports P and P+1 (the swtpm TCTI's convention)."""
    for _ in range(attempts):
        data = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        data.bind((host, 0))
        port = data.getsockname()[1]
        ctrl = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if port >= 65535:
                raise OSError("no room for port + 1")
            ctrl.bind((host, port + 1))
        except OSError:
            data.close()
            ctrl.close()
            continue
        data.listen(16)
        ctrl.listen(16)
        return data, ctrl
    raise ProxyError("no free consecutive port pair", reason="proxy-ports")


def serve(proxy: TpmProxy, data_listener: socket.socket, ctrl_listener: socket.socket) -> None:
    """Accept clients forever; each connection gets its own thread."""
    with selectors.DefaultSelector() as sel:
        sel.register(data_listener, selectors.EVENT_READ, (data_listener, proxy.serve_data))
        sel.register(ctrl_listener, selectors.EVENT_READ, (ctrl_listener, proxy.serve_ctrl))
        while True:
            for key, _ in sel.select():
                listener, handler = key.data
                try:
                    client, _addr = listener.accept()
                except OSError:
                    continue
                threading.Thread(target=handler, args=(client,), daemon=True).start()


def _load_config(text: str) -> tuple[Upstream, ReportPublisher, str]:
    config = json.loads(text)
    upstream = Upstream(
        config["upstream_host"], int(config["upstream_port"]), int(config["upstream_ctrl_port"])
    )
    ak_public = serialization.load_pem_public_key(config["ak_public_pem"].encode())
    vcek_key = serialization.load_pem_private_key(config["vcek_key_pem"].encode(), password=None)
    if not isinstance(ak_public, rsa.RSAPublicKey):
        raise ProxyError("the AK public key must be RSA", reason="proxy-config")
    if not isinstance(vcek_key, ec.EllipticCurvePrivateKey):
        raise ProxyError("the VCEK key must be EC P-384", reason="proxy-config")
    publisher = ReportPublisher(str(config["vm_id"]), ak_public, vcek_key)
    return upstream, publisher, str(config.get("listen_host", "127.0.0.1"))


def _on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="tpmproxy[%(process)d]: %(levelname)s %(message)s",
    )
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        upstream, publisher, host = _load_config(sys.stdin.read())
        data_listener, ctrl_listener = bind_port_pair(host)
    except (ProxyError, KeyError, ValueError, TypeError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    proxy = TpmProxy(upstream, publisher)
    sys.stdout.write(json.dumps({"port": data_listener.getsockname()[1]}) + "\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # nobody reads stdout after the ready line
    os.close(devnull)
    log.info(
        "listening on %s:%d (+1 control), swtpm at %s:%d",
        host,
        data_listener.getsockname()[1],
        upstream.host,
        upstream.port,
    )
    try:
        serve(proxy, data_listener, ctrl_listener)
    except SystemExit:
        log.info("stopping")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
