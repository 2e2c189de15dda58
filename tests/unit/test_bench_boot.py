"""bench.boot reads stage times out of a journal; its parsing is checked on crafted entries."""

from __future__ import annotations

import json

import pytest

from bench import boot

pytestmark = pytest.mark.unit


def entry(at: float, message: str, *, unit: str, pid1: bool = False) -> str:
    fields = {"__MONOTONIC_TIMESTAMP": str(int(at * 1e6)), "MESSAGE": message}
    if pid1:
        fields |= {"_PID": "1", "UNIT": unit, "_SYSTEMD_UNIT": "init.scope"}
    else:
        fields |= {"_PID": "42", "_SYSTEMD_UNIT": unit}
    return json.dumps(fields)


JOURNAL = [
    entry(9.0, "Starting attestd.service - old boot...", unit="attestd.service", pid1=True),
    entry(
        10.0, "Starting attestd.service - confinfer attestd...", unit="attestd.service", pid1=True
    ),
    entry(11.0, "Started attestd.service - confinfer attestd.", unit="attestd.service", pid1=True),
    entry(11.5, "the key was released in 0.40 s", unit="model-loader.service"),
    entry(
        12.0,
        "model ready: 3.3 MiB in 0.0 s (/run/confinfer/model); 4 files, unseal_s=0.012, x",
        unit="model-loader.service",
    ),
    entry(12.1, "Starting vllm.service - engine...", unit="vllm.service", pid1=True),
    entry(20.1, "Started vllm.service - engine.", unit="vllm.service", pid1=True),
    "not json",
    json.dumps({"MESSAGE": "no timestamp"}),
    entry(30.5, "state=revoked reason=gpu-cc-off from=healthy", unit="attestd.service"),
    entry(30.6, "model wiped and /run/confinfer/model unmounted", unit="model-loader.service"),
    entry(30.9, "serving container killed and removed", unit="vllm.service"),
    entry(31.2, "Stopped vllm.service - engine.", unit="vllm.service", pid1=True),
]
MARKS = {"start": 9.5, "first_token": 20.4, "cc_off": 30.0}


def test_boot_stages_come_from_the_boot_after_the_start() -> None:
    stages = boot.boot_stages(boot.parse_journal(JOURNAL), MARKS)
    assert stages == pytest.approx(
        {
            "attestd_ready_s": 1.0,  # not the earlier boot's Starting line
            "key_release_s": 0.40,
            "unseal_s": 0.012,
            "model_ready_after_attestd_s": 1.0,
            "engine_ready_s": 8.0,
            "first_token_s": 0.3,
            "boot_to_first_token_s": 10.9,
        }
    )


def test_revocation_is_the_later_of_the_wipe_and_the_kill() -> None:
    times = boot.revocation(boot.parse_journal(JOURNAL), MARKS)
    assert times == pytest.approx(
        {
            "detect_s": 0.5,
            "tmpfs_gone_s": 0.1,
            "container_gone_s": 0.4,
            "revocation_s": 0.4,
            "vllm_unit_stopped_s": 0.7,
        }
    )
    text = boot.table(boot.boot_stages(boot.parse_journal(JOURNAL), MARKS), times, 1.0)
    assert text.endswith("0.40 x the 1 s target: PASS")
    assert boot.table(boot.boot_stages(boot.parse_journal(JOURNAL), MARKS), times, 0.3).endswith(
        "FAIL"
    )


def test_a_missing_stage_is_named() -> None:
    without_kill = [line for line in JOURNAL if "killed" not in line]
    with pytest.raises(LookupError, match="serving container killed"):
        boot.revocation(boot.parse_journal(without_kill), MARKS)
