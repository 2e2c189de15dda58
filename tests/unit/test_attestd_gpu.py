"""attestd.gpu's mapping of NVML answers to observations, against an in-process fake of the
pynvml functions it calls (the real fake library: tests/integration/test_attestd_gpu_testbed.py)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

import pynvml  # type: ignore[import-untyped]
import pytest

from attestd import gpu
from attestd.gpu import GpuChecker, Nvml, NvmlError
from attestd.state import GpuFastFailed, GpuFastOk, GpuReset
from confinfer.config import Config
from confinfer.errors import ConfinferError, Reason

pytestmark = pytest.mark.unit


@dataclass
class FakePynvml:
    """pynvml's functions over a dict of state; ``fail`` maps a function name to an NVML code."""

    cc: int = 1
    env: int = 2
    devtools: int = 0
    count: int = 1
    uuids: list[str] = field(default_factory=lambda: ["GPU-a", "GPU-b", "GPU-c"])
    lost: bool = False
    ready: int = 0
    settings_rc: int = 0
    fail: dict[str, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    initialised: int = 0

    def _enter(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise pynvml.NVMLError(self.fail[name])

    def nvmlInitWithFlags(self, flags: int) -> None:
        self._enter("nvmlInitWithFlags")
        assert flags == pynvml.NVML_INIT_FLAG_NO_GPUS
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._enter("nvmlDeviceGetHandleByIndex")
        if self.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        self._enter("nvmlDeviceGetUUID")
        return self.uuids[handle]

    def nvmlSystemGetConfComputeSettings(self, ref: Any) -> int:
        self._enter("nvmlSystemGetConfComputeSettings")
        settings = ref._obj
        assert settings.version == pynvml.c_nvmlSystemConfComputeSettings_v1_t().version
        if self.settings_rc:
            return self.settings_rc
        settings.environment, settings.ccFeature = self.env, self.cc
        settings.devToolsMode, settings.multiGpuMode = self.devtools, 0
        return 0

    def nvmlSystemGetConfComputeState(self) -> Any:
        self._enter("nvmlSystemGetConfComputeState")
        state = pynvml.c_nvmlConfComputeSystemState_t()
        state.environment, state.ccFeature, state.devToolsMode = self.env, self.cc, self.devtools
        return state

    def nvmlSystemGetConfComputeGpusReadyState(self) -> int:
        self._enter("nvmlSystemGetConfComputeGpusReadyState")
        return self.ready

    def nvmlSystemSetConfComputeGpusReadyState(self, value: int) -> int:
        self._enter("nvmlSystemSetConfComputeGpusReadyState")
        self.ready = value
        return 0


def checker(fake: FakePynvml, expected: int = 1) -> GpuChecker:
    return GpuChecker(Nvml("unused", binding=fake), expected)


def failed(obs: object) -> tuple[Reason, str]:
    assert isinstance(obs, GpuFastFailed), obs
    return obs.reason, obs.detail


def test_all_good_is_ok_and_summarised() -> None:
    fake = FakePynvml(count=2)
    c = checker(fake, 2)
    assert c.check() == GpuFastOk()
    summary = c.summary()
    assert (summary.count, summary.expected) == (2, 2)
    assert [(g.uuid, g.cc, g.ready) for g in summary.devices] == [
        ("GPU-a", True, False),
        ("GPU-b", True, False),
    ]
    assert fake.initialised == 1
    assert c.check() == GpuFastOk()
    assert fake.calls.count("nvmlInitWithFlags") == 1  # initialised once, re-queried each time


@pytest.mark.parametrize(
    ("change", "reason", "words"),
    [
        ({"cc": 0}, Reason.GPU_CC_OFF, "confidential computing is off"),
        ({"env": 1}, Reason.GPU_NOT_PRODUCTION, "SIM, not PRODUCTION"),
        ({"env": 0}, Reason.GPU_NOT_PRODUCTION, "UNAVAILABLE, not PRODUCTION"),
        ({"devtools": 1}, Reason.GPU_DEVTOOLS, "DevTools mode is on"),
        ({"count": 0}, Reason.GPU_COUNT_MISMATCH, "NVML sees 0 GPUs; the configuration expects 1"),
        ({"count": 2}, Reason.GPU_COUNT_MISMATCH, "NVML sees 2 GPUs"),
        ({"lost": True}, Reason.GPU_LOST, "GPU 0 lost: NVML nvmlDeviceGetHandleByIndex: GPU is"),
    ],
)
def test_each_failure_has_its_reason(change: dict[str, Any], reason: Reason, words: str) -> None:
    fake = FakePynvml(**change)
    got, line = failed(checker(fake).check())
    assert got is reason
    assert words in line
    assert "\n" not in line


def test_first_failure_in_order_names_the_reason() -> None:
    # CC off and DevTools and a wrong count at once: CC is checked first.
    fake = FakePynvml(cc=0, devtools=1, count=3)
    assert failed(checker(fake).check())[0] is Reason.GPU_CC_OFF
    fake = FakePynvml(env=1, devtools=1, count=3)
    assert failed(checker(fake).check())[0] is Reason.GPU_NOT_PRODUCTION


@pytest.mark.parametrize(
    "call",
    [
        "nvmlSystemGetConfComputeSettings",
        "nvmlDeviceGetCount",
        "nvmlDeviceGetUUID",
        "nvmlSystemGetConfComputeGpusReadyState",
    ],
)
@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_UNKNOWN])
def test_nvml_errors_in_a_check_fail_closed_as_lost(call: str, code: int) -> None:
    fake = FakePynvml(fail={call: code})
    reason, line = failed(checker(fake).check())
    assert reason is Reason.GPU_LOST
    assert call in line and f"NVML error {code}" in line


def test_unknown_error_reinitialises_next_time() -> None:
    fake = FakePynvml()
    c = checker(fake)
    assert c.check() == GpuFastOk()
    fake.fail["nvmlDeviceGetCount"] = pynvml.NVML_ERROR_UNINITIALIZED
    failed(c.check())
    assert fake.initialised == 0  # shut down after a non-GPU error
    fake.fail.clear()
    assert isinstance(c.check(), GpuReset)
    assert fake.initialised == 1


def test_init_failure_is_lost_and_open_raises() -> None:
    fake = FakePynvml(fail={"nvmlInitWithFlags": pynvml.NVML_ERROR_DRIVER_NOT_LOADED})
    c = checker(fake)
    reason, line = failed(c.check())
    assert reason is Reason.GPU_LOST
    assert line.startswith("NVML unavailable: NVML nvmlInitWithFlags: Driver Not Loaded")
    with pytest.raises(NvmlError) as info:
        c.open()
    assert info.value.code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    assert isinstance(info.value, ConfinferError)


def test_settings_fall_back_to_state() -> None:
    for rc in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_ARGUMENT_VERSION_MISMATCH):
        fake = FakePynvml(devtools=1, settings_rc=rc)
        assert failed(checker(fake).check())[0] is Reason.GPU_DEVTOOLS
        assert "nvmlSystemGetConfComputeState" in fake.calls
    fake = FakePynvml(fail={"nvmlSystemGetConfComputeSettings": 13})  # FUNCTION_NOT_FOUND
    assert checker(fake).check() == GpuFastOk()
    fake = FakePynvml(settings_rc=pynvml.NVML_ERROR_UNKNOWN)
    reason, line = failed(checker(fake).check())
    assert reason is Reason.GPU_LOST and "nvmlSystemGetConfComputeSettings" in line


def test_changed_gpu_set_is_a_reset() -> None:
    fake = FakePynvml()
    c = checker(fake)
    assert c.check() == GpuFastOk()
    fake.uuids[0] = "GPU-z"
    obs = c.check()
    assert isinstance(obs, GpuReset)
    assert "gone: GPU-a; new: GPU-z" in obs.detail
    assert c.check() == GpuFastOk()


def test_passing_after_a_failure_is_a_reset() -> None:
    fake = FakePynvml()
    c = checker(fake)
    assert c.check() == GpuFastOk()
    fake.lost = True
    assert failed(c.check())[0] is Reason.GPU_LOST
    assert c.summary().devices == ()
    fake.lost = False
    assert isinstance(c.check(), GpuReset)
    assert c.check() == GpuFastOk()


def test_ready_state_round_trip_and_cleared_behind_our_back() -> None:
    fake = FakePynvml()
    c = checker(fake)
    assert c.check() == GpuFastOk()
    c.set_ready()
    assert fake.ready == 1
    assert c.check() == GpuFastOk()
    assert all(g.ready for g in c.summary().devices)
    fake.ready = 0  # a reset scrubs it
    obs = c.check()
    assert isinstance(obs, GpuReset) and "ready state was cleared" in obs.detail
    assert c.check() == GpuFastOk()
    c.set_ready()
    c.clear_ready()
    assert fake.ready == 0
    assert c.check() == GpuFastOk()  # we cleared it ourselves: no reset


def test_lost_then_back_with_ready_cleared_is_one_reset() -> None:
    fake = FakePynvml()
    c = checker(fake)
    c.check()
    c.set_ready()
    fake.lost = True
    c.check()
    fake.lost, fake.ready = False, 0
    obs = c.check()
    assert isinstance(obs, GpuReset)
    assert "pass again" in obs.detail and "ready state was cleared" in obs.detail
    assert c.check() == GpuFastOk()


def test_set_ready_errors_are_one_confinfer_error() -> None:
    fake = FakePynvml(
        fail={"nvmlSystemSetConfComputeGpusReadyState": pynvml.NVML_ERROR_NO_PERMISSION}
    )
    c = checker(fake)
    with pytest.raises(NvmlError) as info:
        c.set_ready()
    err = info.value
    assert err.reason is Reason.ERROR
    assert err.details == {
        "call": "nvmlSystemGetConfComputeGpusReadyState".replace("Get", "Set"),
        "nvml_code": pynvml.NVML_ERROR_NO_PERMISSION,
    }
    assert err.hint is not None and "root" in err.hint
    assert "Insufficient Permissions" in err.one_line()
    # a failed set is not remembered: a ready state of 0 is then no reset
    assert c.check() == GpuFastOk()


def test_lost_gpu_error_reason() -> None:
    fake = FakePynvml(
        fail={"nvmlSystemSetConfComputeGpusReadyState": pynvml.NVML_ERROR_GPU_IS_LOST}
    )
    with pytest.raises(NvmlError) as info:
        checker(fake).clear_ready()
    assert info.value.reason is Reason.GPU_LOST


def test_expected_zero() -> None:
    fake = FakePynvml(count=0)
    assert checker(fake, 0).check() == GpuFastOk()
    with pytest.raises(ValueError, match=r"0\.\.64"):
        checker(fake, 65)


def test_missing_library_is_a_config_error(tmp_path: Any) -> None:
    nvml = Nvml(str(tmp_path / "libnvidia-ml.so.1"))
    with pytest.raises(NvmlError) as info:
        nvml.open()
    assert info.value.reason is Reason.CONFIG_INVALID
    assert "cannot load the NVML library" in info.value.message
    assert info.value.hint is not None and "CONFINFER_NVML_LIBRARY" in info.value.hint
    assert not nvml.is_open


def test_bind_library_assigns_pynvml_global(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(pynvml, "_nvmlLib_refcount", 0)
    monkeypatch.setattr(gpu, "_bound_path", None)
    monkeypatch.setattr(pynvml, "_nvmlGetFunctionPointer_cache", {"stale": 1})
    gpu.bind_library("libc.so.6")
    assert isinstance(pynvml.nvmlLib, ctypes.CDLL)
    assert pynvml._nvmlGetFunctionPointer_cache == {}
    first = pynvml.nvmlLib
    gpu.bind_library("libc.so.6")
    assert pynvml.nvmlLib is first  # same path: kept
    monkeypatch.setattr(pynvml, "_nvmlLib_refcount", 1)
    with pytest.raises(NvmlError, match="already initialised"):
        gpu.bind_library("libm.so.6")


def test_from_config() -> None:
    c = GpuChecker.from_config(Config(nvml_library="/x/libnvidia-ml.so.1", gpu_expected_count=3))
    assert (c.nvml.library, c.expected) == ("/x/libnvidia-ml.so.1", 3)
