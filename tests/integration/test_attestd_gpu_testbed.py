"""attestd's GPU fast checks against the testbed's fake NVML, through pynvml, with the GPU state
flipped by ``python -m testbed gpu ...``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from attestd.gpu import GpuChecker, Nvml, NvmlError
from attestd.state import GpuFastFailed, GpuFastOk, GpuReset
from confinfer.errors import Reason
from tests.integration.conftest import RunningTestbed

pytestmark = pytest.mark.integration

STATE_ENV = "CONFINFER_TESTBED_GPU_STATE"  # testbed/gpu.py STATE_ENV


def gpu_state(testbed: RunningTestbed) -> dict[str, object]:
    state: dict[str, object] = json.loads(testbed.cli("gpu", "show").stdout)
    return state


@pytest.fixture
def checker(testbed: RunningTestbed, monkeypatch: pytest.MonkeyPatch) -> Iterator[GpuChecker]:
    """A checker on the testbed's library; the GPU state is put back afterwards."""
    monkeypatch.setenv(STATE_ENV, testbed.env[STATE_ENV])  # read by the library on every call
    before = gpu_state(testbed)
    c = GpuChecker(Nvml(testbed.env["CONFINFER_NVML_LIBRARY"]), 1)
    c.open()
    try:
        yield c
    finally:
        c.close()
        uuids = ",".join(str(u) for u in before["uuids"])  # type: ignore[attr-defined]
        testbed.cli(
            "gpu",
            "set",
            "cc=on",
            "devtools=off",
            "env=production",
            f"gpus={before['gpus']}",
            "lost=0",
            "ready=0",
            "setter=root",
            f"uuids={uuids}",
        )


def reason_of(obs: object) -> Reason:
    assert isinstance(obs, GpuFastFailed), obs
    return obs.reason


def test_healthy_gpu_is_ok(checker: GpuChecker, testbed: RunningTestbed) -> None:
    assert checker.check() == GpuFastOk()
    summary = checker.summary()
    assert summary.count == summary.expected == 1
    assert summary.devices[0].uuid == gpu_state(testbed)["uuids"][0]  # type: ignore[index]
    assert summary.devices[0].cc and not summary.devices[0].ready


@pytest.mark.parametrize(
    ("flip", "back", "reason"),
    [
        (("cc-off",), ("cc-on",), Reason.GPU_CC_OFF),
        (("devtools-on",), ("devtools-off",), Reason.GPU_DEVTOOLS),
        (("set", "env=simulation"), ("set", "env=production"), Reason.GPU_NOT_PRODUCTION),
        (("set", "gpus=2"), ("set", "gpus=1"), Reason.GPU_COUNT_MISMATCH),
        (("set", "gpus=0"), ("set", "gpus=1"), Reason.GPU_COUNT_MISMATCH),
        (("lose",), ("restore",), Reason.GPU_LOST),
    ],
)
def test_each_failure_then_a_reset(
    checker: GpuChecker,
    testbed: RunningTestbed,
    flip: tuple[str, ...],
    back: tuple[str, ...],
    reason: Reason,
) -> None:
    assert checker.check() == GpuFastOk()
    testbed.cli("gpu", *flip)
    obs = checker.check()
    assert reason_of(obs) is reason
    summary = checker.summary()
    if reason is not Reason.GPU_LOST:  # health still lists the GPUs NVML sees, none passing
        assert summary.count == int(str(gpu_state(testbed).get("gpus", "1")))
        cc_refused = reason is not Reason.GPU_COUNT_MISMATCH
        assert all(gpu.cc is not cc_refused for gpu in summary.devices)
    testbed.cli("gpu", *back)
    assert isinstance(checker.check(), GpuReset)
    assert checker.check() == GpuFastOk()


def test_changed_uuid_is_a_reset(checker: GpuChecker, testbed: RunningTestbed) -> None:
    assert checker.check() == GpuFastOk()
    testbed.cli("gpu", "set", "uuids=GPU-00000000-0000-0000-0000-000000000001")
    obs = checker.check()
    assert isinstance(obs, GpuReset)
    assert "new: GPU-00000000-0000-0000-0000-000000000001" in obs.detail
    assert checker.check() == GpuFastOk()


def test_ready_state_round_trip(checker: GpuChecker, testbed: RunningTestbed) -> None:
    assert checker.check() == GpuFastOk()
    testbed.cli("gpu", "set", "setter=any")  # the tests need not run as root
    checker.set_ready()
    assert gpu_state(testbed)["ready"] is True
    assert checker.check() == GpuFastOk()
    assert checker.summary().devices[0].ready
    checker.clear_ready()
    assert gpu_state(testbed)["ready"] is False
    assert checker.check() == GpuFastOk()


def test_lost_and_restored_gpu_scrubs_the_ready_state(
    checker: GpuChecker, testbed: RunningTestbed
) -> None:
    testbed.cli("gpu", "set", "setter=any")
    checker.check()
    checker.set_ready()
    testbed.cli("gpu", "lose")
    assert reason_of(checker.check()) is Reason.GPU_LOST
    testbed.cli("gpu", "restore")  # clears ready, as a real reset does
    obs = checker.check()
    assert isinstance(obs, GpuReset) and "ready state was cleared" in obs.detail
    assert checker.check() == GpuFastOk()


def test_ready_state_refusals_are_one_error(checker: GpuChecker, testbed: RunningTestbed) -> None:
    testbed.cli("gpu", "set", "cc=off", "setter=any")  # the library refuses with CC off
    with pytest.raises(NvmlError) as info:
        checker.set_ready()
    assert info.value.code == 3  # NVML_ERROR_NOT_SUPPORTED
    assert "nvmlSystemSetConfComputeGpusReadyState" in info.value.one_line()
    assert gpu_state(testbed)["ready"] is False


def test_no_state_file_is_lost_not_a_traceback(
    testbed: RunningTestbed, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(STATE_ENV, raising=False)  # the fake reads this as "no driver"
    c = GpuChecker(Nvml(testbed.env["CONFINFER_NVML_LIBRARY"]), 1)
    obs = c.check()
    assert reason_of(obs) is Reason.GPU_LOST
    assert isinstance(obs, GpuFastFailed) and "Driver Not Loaded" in obs.detail
    with pytest.raises(NvmlError):
        c.open()
