"""The Azure machine's stages (confinfer/onboard_azure.py) with a scripted command runner and a
file tree standing in for the VM's root: what each check reads, what each apply runs and in what
order, and that nothing unpinned is installed (a key with another fingerprint, a .deb with
another digest) and nothing sets the GPU ready state."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from confinfer.errors import ConfinferError, Reason
from confinfer.onboard import Effect
from confinfer.onboard_azure import (
    CUDA_LIST,
    DOCKER_DAEMON,
    HOLD_CONF,
    PERSISTENCED_DROP_IN,
    PINS,
    TOOLKIT_LIST,
    AzureMachine,
    kernel_key,
    primary_fingerprints,
)
from confinfer.onboard_commands import COMMAND_TIMEOUT_S, Completed
from confinfer.onboard_state import BY_NAME

pytestmark = pytest.mark.unit

DEB = b"!<arch>\nnot really a deb, but bytes with a digest\n"
DEB_SHA = hashlib.sha256(DEB).hexdigest()
NVATTEST_URL = "https://developer.download.nvidia.com/compute/cuda/repos/ubuntu2204/x86_64/nvattest_1.2.2-1_amd64.deb"


def colons(fingerprint: str) -> str:
    return (
        "pub:-:4096:1:DDCAE044F796ECB0:1:::-:::scESC::::::23::0:\n"
        f"fpr:::::::::{fingerprint}:\n"
        "uid:-::::1::HASH::NVIDIA CORPORATION (Open Source Projects) <cudatools@nvidia.com>:\n"
        "sub:-:4096:1:0123456789ABCDEF:1:::-:::e::::::23:\n"
        "fpr:::::::::0000000000000000000000000123456789ABCDEF:\n"
    )


class Vm:
    """Runs nothing: records each command and answers as the VM would, per ``answers``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[list[str]] = []
        self.packages: dict[str, str] = {}  # name -> "ii" / "hi"
        self.fingerprints = {
            "gpgkey": PINS.toolkit_key_fingerprint,
            PINS.cuda_key: PINS.cuda_key_fingerprint,
        }
        self.deb = DEB
        self.deb_package = "nvattest"
        self.smi = {"-f": "CC status: ON", "-e": "CC Environment: PRODUCTION"}
        self.fail: Callable[[list[str]], bool] = lambda argv: False

    def __call__(
        self,
        argv: Sequence[str],
        *,
        capture: bool = False,
        env: Mapping[str, str] | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
    ) -> Completed:
        argv = list(argv)
        self.calls.append(argv)
        if self.fail(argv):
            return Completed(100, "", "E: Unable to fetch some archives")
        match argv[0]:
            case "dpkg-query":
                status = self.packages.get(argv[-1])
                return Completed(0, status + " ", "") if status else Completed(1, "", "none")
            case "apt-mark" if argv[1] == "hold":
                for name in argv[2:]:
                    self.packages[name] = "hi"
            case "apt-get" if "install" in argv:
                for name in argv[argv.index("install") + 1 :]:
                    self.packages.setdefault(Path(name).name.split("_")[0], "ii")
            case "curl":
                url, dest = argv[-1], Path(argv[argv.index("--output") + 1])
                if url.endswith(".deb"):
                    dest.write_bytes(self.deb)
                else:
                    dest.write_text(f"-----BEGIN PGP PUBLIC KEY BLOCK-----\n{url}\n")
            case "gpg":
                key = Path(argv[-1]).read_text()
                name = key.split("\n")[1].rsplit("/", 1)[-1]
                return Completed(0, colons(self.fingerprints[name]), "")
            case "dpkg-deb":
                return Completed(0, self.deb_package + "\n", "")
            case "nvidia-smi":
                return Completed(0, self.smi[argv[-1]] + "\n", "")
            case "nvidia-ctk":
                daemon = self.root / DOCKER_DAEMON
                daemon.parent.mkdir(parents=True, exist_ok=True)
                daemon.write_text('{"runtimes": {"nvidia": {"path": "nvidia-container-runtime"}}}')
        return Completed(0, "", "")

    def commands(self) -> list[str]:
        return [" ".join(c[:2]) if c[0] != "apt-get" else f"apt-get {c[-1]}" for c in self.calls]


@pytest.fixture
def vm(tmp_path: Path) -> Vm:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/os-release").write_text('ID=ubuntu\nVERSION_ID="22.04"\n')
    return Vm(tmp_path)


def machine(vm: Vm, *, uname: str = "6.8.0-1044-azure-fde", pins: bool = True) -> AzureMachine:
    return AzureMachine(
        vm,
        nvattest_url=NVATTEST_URL if pins else None,
        nvattest_sha256=DEB_SHA if pins else None,
        root=vm.root,
        uname=lambda: uname,
    )


def test_kernel_versions_compare_by_their_numbers() -> None:
    assert kernel_key("6.8.0-1025-azure") < kernel_key("6.8.0-1044-azure-fde")
    assert kernel_key("6.5.0-1025-azure") < kernel_key(PINS.min_kernel)
    assert kernel_key("6.10.0-1-azure") > kernel_key("6.8.0-1025-azure")


def test_the_kernel_stage_upgrades_holds_and_asks_for_the_reboot(vm: Vm) -> None:
    m = machine(vm, uname="6.5.0-1025-azure")
    kernel = BY_NAME["kernel"]
    assert m.check(kernel)[0] is Effect.ABSENT
    vm.packages["linux-image-azure-fde"] = "ii"
    m.apply(kernel)
    assert vm.commands() == [
        "dpkg --configure",
        "apt-get update",
        "apt-get dist-upgrade",
        *["dpkg-query -W"] * len(PINS.kernel_packages),
        "apt-mark hold",
    ]
    assert vm.calls[-1] == ["apt-mark", "hold", "linux-image-azure-fde"]
    assert '"linux-";' in (vm.root / HOLD_CONF).read_text()
    boot = vm.root / "boot"
    boot.mkdir()
    (boot / "vmlinuz-6.8.0-1044-azure-fde").write_text("")
    assert m.check(kernel) == (
        Effect.PENDING_REBOOT,
        "6.8.0-1044-azure-fde is installed, 6.5.0-1025-azure is running",
    )
    (vm.root / "run").mkdir()
    (vm.root / "run/reboot-required").write_text("")
    assert m.check(kernel)[0] is Effect.PENDING_REBOOT
    (vm.root / "run/reboot-required").unlink()
    assert machine(vm).check(kernel)[0] is Effect.IN_PLACE  # after the reboot


def test_a_kernel_too_old_with_nothing_newer_is_not_in_effect(vm: Vm) -> None:
    m = machine(vm, uname="6.5.0-1025-azure")
    m.apply(BY_NAME["kernel"])
    effect, why = m.check(BY_NAME["kernel"])
    assert effect is Effect.ABSENT
    assert "older than 6.8.0-1025-azure" in why


def test_the_driver_stage_installs_the_pinned_branch_and_never_the_ready_state(vm: Vm) -> None:
    m = machine(vm)
    driver = BY_NAME["driver"]
    assert m.check(driver)[0] is Effect.ABSENT
    m.apply(driver)
    installs = [c for c in vm.calls if c[0] == "apt-get" and "install" in c]
    assert [c[c.index("install") + 1 :] for c in installs] == [list(PINS.driver_packages)]
    assert vm.calls[-1] == ["apt-mark", "hold", *PINS.driver_packages]  # the last step
    drop_in = (vm.root / PERSISTENCED_DROP_IN).read_text()
    assert "--uvm-persistence-mode" in drop_in
    assert "-srs" not in drop_in.replace("(nvidia-smi conf-compute -srs)", "")
    assert m.check(driver)[0] is Effect.PENDING_REBOOT  # no module loaded yet
    proc = vm.root / "proc/driver/nvidia"
    proc.mkdir(parents=True)
    (proc / "version").write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  595.45.04  Release Build\n"
    )
    effect, why = m.check(driver)
    assert effect is Effect.IN_PLACE and "595.45.04" in why
    (proc / "version").write_text("NVRM version: NVIDIA UNIX Open Kernel Module  570.86.15\n")
    assert m.check(driver)[0] is Effect.PENDING_REBOOT


def test_cc_mode_is_read_and_never_set(vm: Vm) -> None:
    m = machine(vm)
    assert m.check(BY_NAME["cc-mode"]) == (
        Effect.IN_PLACE,
        "CC status: ON, CC Environment: PRODUCTION",
    )
    m.apply(BY_NAME["cc-mode"])
    vm.smi["-f"] = "CC status: OFF"
    with pytest.raises(ConfinferError) as info:
        m.check(BY_NAME["cc-mode"])
    assert info.value.reason is Reason.GPU_CC_OFF
    vm.smi["-f"] = "CC status: ON"
    vm.smi["-e"] = "CC Environment: INTERNAL"
    with pytest.raises(ConfinferError) as info:
        m.check(BY_NAME["cc-mode"])
    assert info.value.reason is Reason.GPU_NOT_PRODUCTION
    smi = [c for c in vm.calls if c[0] == "nvidia-smi"]
    assert all(c[1:] in (["conf-compute", "-f"], ["conf-compute", "-e"]) for c in smi)


def test_nvattest_is_installed_only_with_its_pinned_digest(vm: Vm) -> None:
    m = machine(vm)
    tools = BY_NAME["gpu-tools"]
    assert m.check(tools)[0] is Effect.ABSENT
    m.apply(tools)
    assert vm.calls[-1] == ["apt-mark", "hold", "nvattest"]  # the last step
    assert m.check(tools)[0] is Effect.IN_PLACE
    repo = PINS.cuda_repo.format(distro="ubuntu2204")
    assert (vm.root / CUDA_LIST).read_text().endswith(f"{repo} /\n")
    installs = [c for c in vm.calls if c[0] == "apt-get" and "install" in c]
    assert len(installs) == 1 and installs[0][-1].endswith("nvattest.deb")


def test_a_deb_with_another_digest_is_refused_before_apt_sees_it(vm: Vm) -> None:
    vm.deb = DEB + b"tampered"
    with pytest.raises(ConfinferError) as info:
        machine(vm).apply(BY_NAME["gpu-tools"])
    assert info.value.reason is Reason.ONBOARD_DOWNLOAD_MISMATCH
    assert info.value.exit_code == 65
    assert not [c for c in vm.calls if c[0] == "apt-get" and "install" in c]


def test_a_deb_of_another_package_is_refused(vm: Vm) -> None:
    vm.deb_package = "nvattest-evil"
    with pytest.raises(ConfinferError) as info:
        machine(vm).apply(BY_NAME["gpu-tools"])
    assert info.value.reason is Reason.ONBOARD_DOWNLOAD_MISMATCH


def test_without_pins_nvattest_is_a_configuration_error(vm: Vm) -> None:
    with pytest.raises(ConfinferError) as info:
        machine(vm, pins=False).apply(BY_NAME["gpu-tools"])
    assert info.value.reason is Reason.ONBOARD_PIN_MISSING
    assert info.value.exit_code == 78
    assert vm.calls == []


def test_an_unknown_distribution_has_no_pins(vm: Vm) -> None:
    (vm.root / "etc/os-release").write_text("ID=debian\nVERSION_ID=12\n")
    with pytest.raises(ConfinferError) as info:
        machine(vm).apply(BY_NAME["gpu-tools"])
    assert info.value.reason is Reason.ONBOARD_PIN_MISSING


@pytest.mark.parametrize("key", ["gpgkey", PINS.cuda_key])
def test_a_signing_key_with_another_fingerprint_adds_no_repository(vm: Vm, key: str) -> None:
    vm.fingerprints[key] = "F" * 40
    stage = BY_NAME["container-toolkit" if key == "gpgkey" else "gpu-tools"]
    with pytest.raises(ConfinferError) as info:
        machine(vm).apply(stage)
    assert info.value.reason is Reason.ONBOARD_SIGNING_KEY_MISMATCH
    assert not (vm.root / TOOLKIT_LIST).exists() and not (vm.root / CUDA_LIST).exists()
    assert not [c for c in vm.calls if c[0] == "apt-get"]


def test_the_toolkit_stage_configures_docker_and_holds_last(vm: Vm) -> None:
    m = machine(vm)
    toolkit = BY_NAME["container-toolkit"]
    m.apply(toolkit)
    assert ["nvidia-ctk", "runtime", "configure", "--runtime=docker"] in vm.calls
    assert ["systemctl", "restart", "docker.service"] in vm.calls
    assert vm.calls[-1][:3] == ["apt-mark", "hold", "nvidia-container-toolkit"]
    assert (vm.root / TOOLKIT_LIST).read_text().splitlines()[-1] == (
        "deb [signed-by=/etc/apt/keyrings/confinfer-nvidia-container-toolkit.asc] "
        "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /"
    )
    assert m.check(toolkit)[0] is Effect.IN_PLACE
    (vm.root / DOCKER_DAEMON).write_text("{}")
    assert m.check(toolkit) == (Effect.ABSENT, "/etc/docker/daemon.json has no nvidia runtime")


def test_a_failed_download_is_unavailable_and_apt_failures_name_the_command(vm: Vm) -> None:
    vm.fail = lambda argv: argv[0] == "curl"
    with pytest.raises(ConfinferError) as info:
        machine(vm).apply(BY_NAME["container-toolkit"])
    assert info.value.reason is Reason.ONBOARD_DOWNLOAD_FAILED
    vm.fail = lambda argv: argv[0] == "apt-get" and argv[-1] == "dist-upgrade"
    with pytest.raises(ConfinferError) as info:
        machine(vm).apply(BY_NAME["kernel"])
    assert info.value.reason is Reason.ONBOARD_COMMAND_FAILED
    assert "dist-upgrade` failed (exit 100): E: Unable to fetch some archives" in info.value.message


def test_primary_fingerprints_skip_subkeys() -> None:
    assert primary_fingerprints(colons("AB" * 20)) == ["AB" * 20]
    assert primary_fingerprints(colons("AB" * 20) + colons("CD" * 20)) == ["AB" * 20, "CD" * 20]
    assert primary_fingerprints("") == []


def test_no_command_of_any_stage_sets_the_ready_state(vm: Vm) -> None:
    m = machine(vm)
    for name in ("kernel", "driver", "cc-mode", "gpu-tools", "container-toolkit"):
        m.apply(BY_NAME[name])
        m.check(BY_NAME[name])
    flat = [" ".join(c) for c in vm.calls]
    assert not [c for c in flat if "-srs" in c or "ready" in c.lower()]
