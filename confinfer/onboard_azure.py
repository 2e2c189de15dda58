"""What onboarding's stages do on an Azure confidential GPU VM (NCC H100 v5, Ubuntu CVM image).

The facts come from Azure's onboarding kit (Azure/az-cgpu-onboarding, release V4.3.3): the
kernel must be at least 6.8.0-1025-azure; the driver is NVIDIA's open server driver of the 595
branch with Ubuntu's signed kernel modules for the ``azure-fde`` kernel; the driver in CC mode
uses the kernel's ECDSA and ECDH (loaded before it); nvidia-persistenced runs with UVM
persistence; unattended upgrades must not move the kernel or the driver (a driver/library
mismatch). Two things are deliberately different from the kit: nothing here sets the GPUs'
ready state (the kit's persistenced override runs ``nvidia-smi conf-compute -srs 1``; attestd
sets it only after attestation), and nothing is trusted because it was downloaded: repository
signing keys are checked against pinned fingerprints and the nvattest package against its
pinned SHA-256 before apt sees them.

Every stage ends with the step that marks it applied (a hold, or the file its check looks for),
so a check never mistakes half an apply for a whole one. Paths are under ``root`` and the
kernel release comes from ``uname``, so tests can point them elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from confinfer.errors import ConfinferError, Reason, printable
from confinfer.onboard import Check, Effect, cc_mode_check
from confinfer.onboard_commands import Runner, checked
from confinfer.onboard_state import Stage


@dataclass(frozen=True)
class Pins:
    """What onboarding installs, by name, branch, key fingerprint; one place to change."""

    min_kernel: str = "6.8.0-1025-azure"
    driver_branch: str = "595"
    driver_packages: tuple[str, ...] = (
        "nvidia-driver-595-server-open",
        "linux-modules-nvidia-595-server-open-azure-fde",
    )
    # Held after the upgrade, those of them that are installed.
    kernel_packages: tuple[str, ...] = (
        "linux-azure-fde", "linux-image-azure-fde", "linux-headers-azure-fde",
        "linux-azure", "linux-image-azure", "linux-headers-azure",
    )  # fmt: skip
    # NVIDIA's CUDA repository, for nvattest and its libraries only (see CUDA_PREFERENCES).
    cuda_repo: str = "https://developer.download.nvidia.com/compute/cuda/repos/{distro}/x86_64/"
    cuda_key: str = "3bf863cc.pub"
    cuda_key_fingerprint: str = "EB693B3035CD5710E231E123A4B469963BF863CC"
    toolkit_key_url: str = "https://nvidia.github.io/libnvidia-container/gpgkey"
    toolkit_key_fingerprint: str = "C95B321B61E88C1809C4F759DDCAE044F796ECB0"
    # apt puts the architecture in for $(ARCH).
    toolkit_repo: str = "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH)"
    toolkit_packages: tuple[str, ...] = (
        "nvidia-container-toolkit", "nvidia-container-toolkit-base",
        "libnvidia-container-tools", "libnvidia-container1",
    )  # fmt: skip
    nvattest_package: str = "nvattest"
    distros: tuple[str, ...] = ("ubuntu2204", "ubuntu2404")


PINS = Pins()

APT_ENV = {
    "DEBIAN_FRONTEND": "noninteractive",
    "NEEDRESTART_MODE": "a",  # needrestart restarts what it must instead of asking
    "APT_LISTCHANGES_FRONTEND": "none",
}
APT_OPTIONS = (
    "-o", "DPkg::Lock::Timeout=600",  # wait for apt-daily or cloud-init rather than fail
    "-o", "Acquire::Retries=3",
    "-o", "Dpkg::Options::=--force-confdef",  # keep changed configuration files, unasked
    "-o", "Dpkg::Options::=--force-confold",
)  # fmt: skip
DOWNLOAD_TIMEOUT_S = 900.0

HOLD_CONF = "etc/apt/apt.conf.d/51confinfer-onboarding"
LKCA_CONF = "etc/modprobe.d/confinfer-nvidia-lkca.conf"
PERSISTENCED_DROP_IN = "etc/systemd/system/nvidia-persistenced.service.d/50-confinfer.conf"
CUDA_KEY = "etc/apt/keyrings/confinfer-cuda.asc"
CUDA_LIST = "etc/apt/sources.list.d/confinfer-cuda.list"
CUDA_PREFS = "etc/apt/preferences.d/confinfer-cuda"
TOOLKIT_KEY = "etc/apt/keyrings/confinfer-nvidia-container-toolkit.asc"
TOOLKIT_LIST = "etc/apt/sources.list.d/confinfer-nvidia-container-toolkit.list"
DOCKER_DAEMON = "etc/docker/daemon.json"
NVIDIA_VERSION = "proc/driver/nvidia/version"
REBOOT_REQUIRED = "run/reboot-required"

HOLD_TEXT = """\
// Written by confinfer onboarding (confinfer/onboard_azure.py). The kernel and the NVIDIA
// stack change only on purpose and together: a new kernel or driver changes what attestation
// measures, and a driver/library version mismatch leaves the GPU unusable. Unattended upgrades
// leave these packages alone (onboarding also holds them with apt-mark); everything else keeps
// its security updates.
Unattended-Upgrade::Package-Blacklist {
    "linux-";
    "nvidia-";
    "libnvidia-";
    "nvattest";
    "libnvat";
};
"""

LKCA_TEXT = """\
# Written by confinfer onboarding. In confidential-computing mode the NVIDIA driver uses the
# kernel's ECDSA and ECDH implementations: load them first.
install nvidia /sbin/modprobe ecdsa_generic ecdh; /sbin/modprobe --ignore-install nvidia
"""

PERSISTENCED_TEXT = """\
# Written by confinfer onboarding. nvidia-persistenced keeps the driver initialised (with UVM
# persistence) between clients, as CC mode expects; its runtime directory must belong to the
# user it runs as. Nothing here sets the GPUs' ready state (nvidia-smi conf-compute -srs):
# attestd sets it, and only after the GPU has passed attestation.
[Service]
ExecStartPre=/usr/bin/install -d -o nvidia-persistenced -g nvidia-persistenced \
/run/nvidia-persistenced
ExecStartPre=/usr/bin/rm -f /run/nvidia-persistenced/nvidia-persistenced.pid
ExecStart=
ExecStart=/usr/bin/nvidia-persistenced --user nvidia-persistenced --uvm-persistence-mode
"""

CUDA_PREFERENCES = """\
# Written by confinfer onboarding. NVIDIA's CUDA repository is here for nvattest and its
# libraries only: nothing else (its drivers above all) may come from it.
Package: nvattest libnvat*
Pin: origin "developer.download.nvidia.com"
Pin-Priority: 500

Package: *
Pin: origin "developer.download.nvidia.com"
Pin-Priority: -1
"""


def kernel_key(release: str) -> tuple[int, ...]:
    """``6.8.0-1025-azure-fde`` as (6, 8, 0, 1025): the numbers, for comparison."""
    return tuple(int(n) for n in re.findall(r"[0-9]+", release))


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` atomically (its directory made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def primary_fingerprints(colons: str) -> list[str]:
    """The primary keys' fingerprints in ``gpg --show-keys --with-colons`` output."""
    found: list[str] = []
    after_pub = False
    for line in colons.splitlines():
        fields = line.split(":")
        if fields[0] == "pub":
            after_pub = True
        elif fields[0] == "fpr" and after_pub and len(fields) > 9:
            found.append(fields[9].upper())
            after_pub = False
        elif fields[0] in ("sub", "uid"):
            after_pub = False
    return found


class AzureMachine:
    """The stages on the VM itself, through apt, dpkg, nvidia-smi and systemctl."""

    def __init__(
        self,
        run: Runner,
        *,
        nvattest_url: str | None,
        nvattest_sha256: str | None,
        root: Path = Path("/"),
        uname: Callable[[], str] = lambda: os.uname().release,
        pins: Pins = PINS,
    ) -> None:
        self.run = run
        self.nvattest_url = nvattest_url
        self.nvattest_sha256 = nvattest_sha256
        self.root = root
        self.uname = uname
        self.pins = pins

    def check(self, stage: Stage) -> Check:
        match stage.name:
            case "kernel":
                return self._check_kernel()
            case "driver":
                return self._check_driver()
            case "cc-mode":
                return cc_mode_check(self.run, ["nvidia-smi"])
            case "gpu-tools":
                return self._check_held(self.pins.nvattest_package)
            case "container-toolkit":
                return self._check_toolkit()
        raise AssertionError(f"no such stage on this machine: {stage.name}")  # a bug

    def apply(self, stage: Stage) -> None:
        match stage.name:
            case "kernel":
                self._apply_kernel()
            case "driver":
                self._apply_driver()
            case "cc-mode":
                pass  # set on the host: the guest can only look (check)
            case "gpu-tools":
                self._apply_gpu_tools()
            case "container-toolkit":
                self._apply_toolkit()
            case _:
                raise AssertionError(f"no such stage on this machine: {stage.name}")  # a bug

    def before_reboot(self) -> None:
        """Nothing: the state file is on disk, and systemd's reboot stops everything cleanly."""

    # --- kernel ------------------------------------------------------------------------------

    def _check_kernel(self) -> Check:
        if not (self.root / HOLD_CONF).is_file():
            return Effect.ABSENT, f"not prepared yet (no /{HOLD_CONF})"
        running = self.uname()
        if (self.root / REBOOT_REQUIRED).exists():
            return Effect.PENDING_REBOOT, f"/{REBOOT_REQUIRED} is there (running {running})"
        if kernel_key(running) >= kernel_key(self.pins.min_kernel):
            return Effect.IN_PLACE, f"running {running} (at least {self.pins.min_kernel})"
        newest = max(
            (p.name.removeprefix("vmlinuz-") for p in (self.root / "boot").glob("vmlinuz-*")),
            key=kernel_key,
            default=None,
        )
        if newest is not None and kernel_key(newest) > kernel_key(running):
            return Effect.PENDING_REBOOT, f"{newest} is installed, {running} is running"
        return Effect.ABSENT, (
            f"running {running}, older than {self.pins.min_kernel}, and no newer kernel installed"
        )

    def _apply_kernel(self) -> None:
        self._dpkg_configure()
        self._apt("update")
        self._apt("dist-upgrade")
        held = [p for p in self.pins.kernel_packages if self._installed(p)]
        if held:
            checked(self.run, ["apt-mark", "hold", *held])
        write_file(self.root / HOLD_CONF, HOLD_TEXT)  # last: the stage is applied

    # --- driver ------------------------------------------------------------------------------

    def _check_driver(self) -> Check:
        packages = self.pins.driver_packages
        if not (self.root / PERSISTENCED_DROP_IN).is_file() or not all(
            self._held(p) for p in packages
        ):
            return Effect.ABSENT, f"{', '.join(packages)} not installed and held yet"
        try:
            loaded = (self.root / NVIDIA_VERSION).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return Effect.PENDING_REBOOT, "installed; the module loads at the next boot"
        first = printable(loaded.strip().splitlines()[0] if loaded.strip() else "", 200)
        if "Open Kernel Module" in loaded and f" {self.pins.driver_branch}." in loaded:
            return Effect.IN_PLACE, f"loaded: {first}"
        return Effect.PENDING_REBOOT, f"another module is loaded ({first})"

    def _apply_driver(self) -> None:
        self._dpkg_configure()
        write_file(self.root / LKCA_CONF, LKCA_TEXT)
        self._apt("update")
        self._apt("install", *self.pins.driver_packages)
        checked(self.run, ["update-initramfs", "-u"], env=APT_ENV)
        write_file(self.root / PERSISTENCED_DROP_IN, PERSISTENCED_TEXT)
        checked(self.run, ["systemctl", "daemon-reload"], timeout=120.0)
        checked(self.run, ["systemctl", "enable", "nvidia-persistenced.service"], timeout=120.0)
        checked(self.run, ["apt-mark", "hold", *self.pins.driver_packages])  # last

    # --- gpu-tools ---------------------------------------------------------------------------

    def _apply_gpu_tools(self) -> None:
        url, digest = self.nvattest_url, self.nvattest_sha256
        if not url or not digest:
            raise ConfinferError(
                "onboard_nvattest_url and onboard_nvattest_sha256 are not set",
                reason=Reason.ONBOARD_PIN_MISSING,
                hint="set both in /etc/confinfer/*.toml (deploy.toml [appliance]): the nvattest "
                ".deb in NVIDIA's CUDA repository for this Ubuntu, and its SHA256 from the "
                "repository's Packages index",
            )
        repo = self.pins.cuda_repo.format(distro=self._distro())
        self._verified_key(repo + self.pins.cuda_key, self.pins.cuda_key_fingerprint, CUDA_KEY)
        write_file(self.root / CUDA_PREFS, CUDA_PREFERENCES)
        write_file(
            self.root / CUDA_LIST,
            "# Written by confinfer onboarding: nvattest's repository (pinned, see "
            f"/{CUDA_PREFS}).\ndeb [signed-by=/{CUDA_KEY}] {repo} /\n",
        )
        self._dpkg_configure()
        self._apt("update")
        with tempfile.TemporaryDirectory(prefix="confinfer-onboard-") as work:
            os.chmod(work, 0o755)  # noqa: S103 (apt's unprivileged _apt user reads the .deb)
            deb = Path(work) / "nvattest.deb"
            self._fetch(url, deb)
            got = sha256_file(deb)
            if got != digest:
                raise ConfinferError(
                    f"{url}: SHA-256 {got}, but onboard_nvattest_sha256 pins {digest}",
                    reason=Reason.ONBOARD_DOWNLOAD_MISMATCH,
                    hint="nothing was installed; check the URL and the pin",
                )
            name = checked(self.run, ["dpkg-deb", "--field", str(deb), "Package"], capture=True)
            if name.stdout.strip() != self.pins.nvattest_package:
                raise ConfinferError(
                    f"{url} is the package {printable(name.stdout.strip(), 60)!r}, not "
                    f"{self.pins.nvattest_package}",
                    reason=Reason.ONBOARD_DOWNLOAD_MISMATCH,
                )
            os.chmod(deb, 0o644)
            self._apt("install", str(deb))
        checked(self.run, ["apt-mark", "hold", self.pins.nvattest_package])  # last

    # --- container-toolkit -------------------------------------------------------------------

    def _check_toolkit(self) -> Check:
        effect, why = self._check_held(self.pins.toolkit_packages[0])
        if effect is not Effect.IN_PLACE:
            return effect, why
        try:
            daemon = json.loads((self.root / DOCKER_DAEMON).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return Effect.ABSENT, f"/{DOCKER_DAEMON} is missing or not JSON"
        runtimes = daemon.get("runtimes") if isinstance(daemon, dict) else None
        if not isinstance(runtimes, dict) or "nvidia" not in runtimes:
            return Effect.ABSENT, f"/{DOCKER_DAEMON} has no nvidia runtime"
        return Effect.IN_PLACE, f"{why}; docker has the nvidia runtime"

    def _apply_toolkit(self) -> None:
        pins = self.pins
        self._verified_key(pins.toolkit_key_url, pins.toolkit_key_fingerprint, TOOLKIT_KEY)
        write_file(
            self.root / TOOLKIT_LIST,
            "# Written by confinfer onboarding: NVIDIA's container toolkit.\n"
            f"deb [signed-by=/{TOOLKIT_KEY}] {pins.toolkit_repo} /\n",
        )
        self._dpkg_configure()
        self._apt("update")
        self._apt("install", pins.toolkit_packages[0])
        checked(self.run, ["nvidia-ctk", "runtime", "configure", "--runtime=docker"])
        checked(self.run, ["systemctl", "restart", "docker.service"], timeout=300.0)
        held = [p for p in pins.toolkit_packages if self._installed(p)]
        checked(self.run, ["apt-mark", "hold", *held])  # last

    # --- helpers -----------------------------------------------------------------------------

    def _apt(self, *args: str) -> None:
        checked(self.run, ["apt-get", "-y", *APT_OPTIONS, *args], env=APT_ENV)

    def _dpkg_configure(self) -> None:
        """Finish what an interrupted dpkg left half-configured (a crash or a power loss)."""
        checked(self.run, ["dpkg", "--configure", "-a"], env=APT_ENV)

    def _status(self, package: str) -> str:
        """dpkg's two-letter state (``ii`` installed, ``hi`` held and installed), or ''."""
        done = self.run(
            ["dpkg-query", "-W", "-f=${db:Status-Abbrev}", package], capture=True, timeout=60.0
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    def _installed(self, package: str) -> bool:
        status = self._status(package)
        return len(status) >= 2 and status[0] in "ih" and status[1] == "i"

    def _held(self, package: str) -> bool:
        return self._status(package)[:2] == "hi"

    def _check_held(self, package: str) -> Check:
        if self._held(package):
            return Effect.IN_PLACE, f"{package} installed and held"
        return Effect.ABSENT, f"{package} not installed and held yet"

    def _distro(self) -> str:
        fields: dict[str, str] = {}
        try:
            text = (self.root / "etc/os-release").read_text(encoding="utf-8")
        except OSError:
            text = ""
        for line in text.splitlines():
            key, _, value = line.partition("=")
            fields[key.strip()] = value.strip().strip('"')
        distro = fields.get("ID", "") + fields.get("VERSION_ID", "").replace(".", "")
        if distro not in self.pins.distros:
            raise ConfinferError(
                f"no NVIDIA repository is pinned for {printable(distro or 'this system', 40)}",
                reason=Reason.ONBOARD_PIN_MISSING,
                hint=f"onboarding knows {', '.join(self.pins.distros)}",
            )
        return distro

    def _fetch(self, url: str, dest: Path) -> None:
        done = self.run(
            [
                "curl", "--proto", "=https", "--proto-redir", "=https", "--tlsv1.2", "--fail",
                "--silent", "--show-error", "--location", "--retry", "3",
                "--max-time", f"{DOWNLOAD_TIMEOUT_S:g}", "--output", str(dest), url,
            ],
            timeout=DOWNLOAD_TIMEOUT_S + 60.0,
        )  # fmt: skip
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            raise ConfinferError(
                f"cannot download {url}: {printable(said, 300)}",
                reason=Reason.ONBOARD_DOWNLOAD_FAILED,
            )

    def _verified_key(self, url: str, fingerprint: str, dest: str) -> None:
        """A repository's signing key, installed only if its fingerprint is the pinned one."""
        with tempfile.TemporaryDirectory(prefix="confinfer-onboard-") as work:
            key = Path(work) / "key.asc"
            self._fetch(url, key)
            home = Path(work) / "gnupg"
            home.mkdir(mode=0o700)
            shown = checked(
                self.run,
                ["gpg", "--batch", "--show-keys", "--with-colons", str(key)],
                capture=True,
                env={"GNUPGHOME": str(home)},
                timeout=60.0,
            )
            found = primary_fingerprints(shown.stdout)
            if found != [fingerprint]:
                raise ConfinferError(
                    f"{url}: signing key {', '.join(found) or 'none'}, but the pinned key is "
                    f"{fingerprint}",
                    reason=Reason.ONBOARD_SIGNING_KEY_MISMATCH,
                    hint="the repository was not added; if the vendor rotated its key, confirm "
                    "the new fingerprint and change the pin (confinfer/onboard_azure.py)",
                )
            write_file(self.root / dest, key.read_text(encoding="ascii", errors="strict"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["PINS", "AzureMachine", "Pins", "kernel_key", "primary_fingerprints", "sha256_file"]
