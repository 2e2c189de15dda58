"""The fake GPU: the NVML library built from ``nvml/fake_nvml.c``, its state file and its PKI.

Layout under a GPU directory (``<testbed>/gpu``)::

    state                        key=value lines the library re-reads on every call
    state.lock                   flock shared with the library (it rewrites ``ready=``)
    lib/libnvidia-ml.so.1        the library (CONFINFER_NVML_LIBRARY)
    attestation-key.pem          ECDSA P-384 key that signs attestation reports
    attestation-cert-chain.pem   attestation cert, device cert, ICA, root (PEM, leaf first)
    cert-chain.pem               device cert, ICA, root (PEM, leaf first)
    nvidia-root.pem              the testbed's NVIDIA-like device identity root, for verifiers
    reference-measurements.json  golden measurements for the state's driver and VBIOS
    rims/<rim id>.xml            the same as RIM files, for ``nvattest --rim-store dir``

The library's sources are ``nvml/*.c`` (entry points in ``fake_nvml.c``, whose header comment
documents the state keys and the attestation report layout).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed import pki

SOURCE_DIR = Path(__file__).resolve().with_name("nvml")
LIBRARY_NAME = "libnvidia-ml.so.1"
STATE_ENV = "CONFINFER_TESTBED_GPU_STATE"
MAX_GPUS = 8
MEASUREMENT_BLOCKS = 8
MAX_STALL_MS = 600_000  # stall_ms: at most ten minutes per NVML call (STALL_MAX_MS in C)
MEASUREMENT_LABEL = b"confinfer-testbed-gpu-measurement\x00"
GCC_FLAGS = (
    "-shared",
    "-fPIC",
    "-O2",
    "-fvisibility=hidden",
    "-Wall",
    "-Wextra",
    "-Wl,--no-undefined",
    f"-Wl,-soname,{LIBRARY_NAME}",
)


class GpuError(Exception):
    """An expected failure of the fake GPU's tooling; ``reason`` is a stable slug."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class GpuState:
    """What the fake NVML reports; one field per state-file key."""

    cc: bool = True
    devtools: bool = False
    env: str = "production"  # or "simulation"
    gpus: int = 1
    lost: bool = False
    ready: bool = False
    driver: str = "550.127.05"
    vbios: str = "96.00.9F.00.04"
    name: str = "NVIDIA H100 NVL"
    uuids: tuple[str, ...] = ()
    multigpu: str = "none"  # or "ppcie"
    tamper: int = 0  # measurement block to corrupt, 0 = none
    setter: str = "root"  # who may set the ready state: "root" or "any"
    stall_ms: int = 0  # every NVML call first sleeps this long (a hung driver); 0 = none

    def __post_init__(self) -> None:
        checks = (
            (self.env in ("production", "simulation"), "env must be production or simulation"),
            (0 <= self.gpus <= MAX_GPUS, f"gpus must be 0..{MAX_GPUS}"),
            (self.multigpu in ("none", "ppcie"), "multigpu must be none or ppcie"),
            (0 <= self.tamper <= MEASUREMENT_BLOCKS, f"tamper must be 0..{MEASUREMENT_BLOCKS}"),
            (self.setter in ("root", "any"), "setter must be root or any"),
            (0 <= self.stall_ms <= MAX_STALL_MS, f"stall_ms must be 0..{MAX_STALL_MS}"),
            (len(self.uuids) <= MAX_GPUS, f"at most {MAX_GPUS} uuids"),
            (
                all(u.startswith("GPU-") and "," not in u for u in self.uuids),
                "uuids must look like GPU-<uuid>",
            ),
            (0 < len(self.driver) < 80, "driver must be 1..79 characters"),
            (0 < len(self.vbios) < 32, "vbios must be 1..31 characters"),
            (0 < len(self.name) < 96, "name must be 1..95 characters"),
        )
        for ok, why in checks:
            if not ok:
                raise GpuError(f"invalid GPU state: {why}", reason="gpu-state-invalid")
        for text in (self.driver, self.vbios, self.name):
            if "\n" in text or "=" in text or text != text.strip():
                raise GpuError(f"invalid GPU state value {text!r}", reason="gpu-state-invalid")

    def render(self) -> str:
        def flag(value: bool, on: str = "on", off: str = "off") -> str:
            return on if value else off

        lines = [
            f"cc={flag(self.cc)}",
            f"devtools={flag(self.devtools)}",
            f"env={self.env}",
            f"gpus={self.gpus}",
            f"lost={int(self.lost)}",
            f"ready={int(self.ready)}",
            f"driver={self.driver}",
            f"vbios={self.vbios}",
            f"name={self.name}",
            f"multigpu={self.multigpu}",
            f"tamper={self.tamper}",
            f"setter={self.setter}",
            f"stall_ms={self.stall_ms}",
        ]
        if self.uuids:
            lines.append("uuids=" + ",".join(self.uuids))
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> GpuState:
        """Parse a state file strictly (unknown keys and malformed values are errors)."""
        values: dict[str, Any] = {}
        switches = {"cc": ("on", "off"), "devtools": ("on", "off")}
        numbers = {
            "lost": 1,
            "ready": 1,
            "gpus": MAX_GPUS,
            "tamper": MEASUREMENT_BLOCKS,
            "stall_ms": MAX_STALL_MS,
        }
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = (p.strip() for p in line.partition("="))
            if not sep:
                raise GpuError(
                    f"state line {number}: expected key=value", reason="gpu-state-invalid"
                )
            if key in switches:
                if value not in switches[key]:
                    raise GpuError(
                        f"state line {number}: {key} must be on or off", reason="gpu-state-invalid"
                    )
                values[key] = value == "on"
            elif key in numbers:
                if not value.isdigit() or int(value) > numbers[key]:
                    raise GpuError(
                        f"state line {number}: {key} must be 0..{numbers[key]}",
                        reason="gpu-state-invalid",
                    )
                values[key] = bool(int(value)) if numbers[key] == 1 else int(value)
            elif key == "uuids":
                values[key] = tuple(u for u in value.split(",") if u)
            elif key in ("env", "driver", "vbios", "name", "multigpu", "setter"):
                values[key] = value
            else:
                raise GpuError(
                    f"state line {number}: unknown key {key!r}", reason="gpu-state-invalid"
                )
        return cls(**values)

    def with_changes(self, **changes: Any) -> GpuState:
        return dataclasses.replace(self, **changes)


# What `python -m testbed gpu ACTION` does to the state. A real GPU reset scrubs its CC state,
# so bringing a lost GPU back also clears the ready state.
ACTIONS: dict[str, dict[str, Any]] = {
    "cc-on": {"cc": True},
    "cc-off": {"cc": False},
    "devtools-on": {"devtools": True},
    "devtools-off": {"devtools": False},
    "lose": {"lost": True},
    "restore": {"lost": False, "ready": False},
}


@contextmanager
def _locked(state_file: Path) -> Iterator[None]:
    lock = state_file.with_name(state_file.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_state(state_file: Path) -> GpuState:
    try:
        text = state_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GpuError(f"{state_file}: no GPU state file", reason="gpu-state-missing") from None
    return GpuState.parse(text)


def _write_unlocked(state_file: Path, state: GpuState) -> None:
    tmp = state_file.with_name(f"{state_file.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(state.render())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, state_file)


def write_state(state_file: Path, state: GpuState) -> None:
    """Replace the state file atomically, under the lock the library also takes."""
    with _locked(state_file):
        _write_unlocked(state_file, state)


def update_state(state_file: Path, **changes: Any) -> GpuState:
    """Read, change and write the state in one locked step; returns the new state."""
    with _locked(state_file):
        state = read_state(state_file).with_changes(**changes)
        _write_unlocked(state_file, state)
    return state


def apply_action(state_file: Path, action: str) -> GpuState:
    try:
        changes = ACTIONS[action]
    except KeyError:
        raise GpuError(
            f"unknown GPU action {action!r}; expected one of {', '.join(ACTIONS)}", reason="usage"
        ) from None
    return update_state(state_file, **changes)


def set_keys(state_file: Path, assignments: list[str]) -> GpuState:
    """Apply ``key=value`` assignments, validated as the state file is, in one locked step."""
    with _locked(state_file):
        current = read_state(state_file)
        text = current.render() + "".join(f"{a.strip()}\n" for a in assignments)
        if any("=" not in a or "\n" in a for a in assignments):
            raise GpuError("expected KEY=VALUE assignments", reason="usage")
        state = GpuState.parse(text)  # later lines win, unknown keys are refused
        _write_unlocked(state_file, state)
    return state


def measurement(index: int, component: str) -> bytes:
    """One measurement block value, as the library computes it."""
    return hashlib.sha384(MEASUREMENT_LABEL + bytes([index]) + component.encode()).digest()


def reference_measurements(driver: str, vbios: str) -> dict[int, str]:
    """Golden values (hex) for every block of a GPU with CC on and DevTools off."""
    golden: dict[int, str] = {}
    for index in range(1, MEASUREMENT_BLOCKS + 1):
        if index <= 4:
            component = f"vbios:{vbios}"
        elif index <= 7:
            component = f"driver:{driver}"
        else:
            component = "mode:cc=on,devtools=off"
        golden[index] = measurement(index, component).hex()
    return golden


def build_library(out_dir: Path, *, source_dir: Path = SOURCE_DIR) -> Path:
    """Compile the fake NVML (every ``*.c`` of ``source_dir``) into ``out_dir/libnvidia-ml.so.1``,
    unless that is already newer than every source and header."""
    target = out_dir / LIBRARY_NAME
    sources = sorted(source_dir.glob("*.c"))
    if not sources:
        raise GpuError(f"no C sources in {source_dir}", reason="gpu-build-failed")
    newest = max(p.stat().st_mtime_ns for p in [*sources, *source_dir.glob("*.h")])
    if target.exists() and target.stat().st_mtime_ns >= newest:
        return target
    gcc = shutil.which("gcc")
    if gcc is None:
        raise GpuError(
            "gcc not found on PATH; the fake NVML is built from C source", reason="gpu-build-failed"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{LIBRARY_NAME}.{os.getpid()}.tmp"
    argv = [gcc, *GCC_FLAGS, "-o", str(tmp), *map(str, sources), "-lcrypto"]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise GpuError(
            f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}",
            reason="gpu-build-failed",
        )
    os.replace(tmp, target)
    return target


@dataclass(frozen=True)
class FakeGpu:
    """Paths of one provisioned fake GPU."""

    directory: Path

    @property
    def state_file(self) -> Path:
        return self.directory / "state"

    @property
    def library(self) -> Path:
        return self.directory / "lib" / LIBRARY_NAME

    @property
    def root_cert(self) -> Path:
        return self.directory / "nvidia-root.pem"

    @property
    def attestation_key(self) -> Path:
        return self.directory / "attestation-key.pem"

    @property
    def attestation_cert_chain(self) -> Path:
        return self.directory / "attestation-cert-chain.pem"

    @property
    def cert_chain(self) -> Path:
        return self.directory / "cert-chain.pem"

    @property
    def reference(self) -> Path:
        return self.directory / "reference-measurements.json"

    def state(self) -> GpuState:
        return read_state(self.state_file)

    def update(self, **changes: Any) -> GpuState:
        return update_state(self.state_file, **changes)

    def env(self) -> dict[str, str]:
        return {"CONFINFER_NVML_LIBRARY": str(self.library), STATE_ENV: str(self.state_file)}


def _write_pki(gpu: FakeGpu) -> None:
    root = pki.issue("testbed NVIDIA Device Identity CA", pki.p384_key(), ca=True, days=3650)
    ica = pki.issue("testbed GH100 Provisioner ICA 1", pki.p384_key(), root, ca=True, days=3650)
    device = pki.issue("testbed GH100 A01 FSP BROM", pki.p384_key(), ica, ca=True, days=3650)
    leaf = pki.issue("testbed GH100 A01 GSP FMC LF", pki.p384_key(), device)
    key = gpu.attestation_key
    key.touch(mode=0o600)
    key.write_bytes(leaf.key_pem)
    gpu.cert_chain.write_bytes(device.cert_pem + ica.cert_pem + root.cert_pem)
    gpu.attestation_cert_chain.write_bytes(
        leaf.cert_pem + device.cert_pem + ica.cert_pem + root.cert_pem
    )
    gpu.root_cert.write_bytes(root.cert_pem)


def write_reference(gpu: FakeGpu) -> None:
    """(Re)write the golden measurements for the state's current driver and VBIOS."""
    state = gpu.state()
    golden = reference_measurements(state.driver, state.vbios)
    data = {"driver": state.driver, "vbios": state.vbios, "measurements": golden}
    gpu.reference.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    write_rim_files(gpu.directory / RIM_DIR, state.driver, state.vbios, golden)


RIM_DIR = "rims"
VBIOS_BLOCKS = range(1, 5)  # measurement blocks 1-4 come from the VBIOS RIM, 5-8 the driver's


def rim_ids(driver: str, vbios: str) -> tuple[str, str]:
    """The RIM ids nvattest asks for: the driver's and the VBIOS's."""
    return f"NV_GPU_DRIVER_GH100_{driver}", f"NV_GPU_VBIOS_{vbios.replace('.', '')}"


def write_rim_files(directory: Path, driver: str, vbios: str, measurements: dict[int, str]) -> None:
    """``<rim id>.xml`` for the driver and the VBIOS, as ``nvattest --rim-store dir`` reads
    them: a SWID tag (ISO/IEC 19770-2, as NVIDIA's RIMs are) whose payload lists each
    measurement block's golden hash. Unsigned: the testbed's RIMs are not signed."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.xml"):
        old.unlink()
    driver_id, vbios_id = rim_ids(driver, vbios)
    for rim_id, version, blocks in (
        (driver_id, driver, [i for i in measurements if i not in VBIOS_BLOCKS]),
        (vbios_id, vbios, [i for i in measurements if i in VBIOS_BLOCKS]),
    ):
        resources = "".join(
            f'    <Resource type="Measurement" index="{i}" Hash="{measurements[i]}"/>\n'
            for i in sorted(blocks)
        )
        text = (
            '<?xml version="1.0" encoding="utf-8"?>\n'
            '<SoftwareIdentity xmlns="http://standards.iso.org/iso/19770/-2/2015/schema.xsd" '
            f'name="{rim_id}" version="{version}" tagId="{rim_id}">\n'
            f"  <Payload>\n{resources}  </Payload>\n</SoftwareIdentity>\n"
        )
        (directory / f"{rim_id}.xml").write_text(text, encoding="utf-8")


def provision(directory: Path, state: GpuState | None = None, *, build: bool = True) -> FakeGpu:
    """Create a fake GPU: PKI, state file, reference measurements and (unless told not to) the
    library. Existing PKI is kept; the state is (re)written."""
    gpu = FakeGpu(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not gpu.attestation_key.exists():
        _write_pki(gpu)
    if state is None:
        state = GpuState(uuids=tuple(f"GPU-{uuid.uuid4()}" for _ in range(MAX_GPUS)))
    write_state(gpu.state_file, state)
    write_reference(gpu)
    if build:
        build_library(gpu.library.parent)
    return gpu
