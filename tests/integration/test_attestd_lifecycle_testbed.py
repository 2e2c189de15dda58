"""attestd's life cycle against a testbed of its own: a policy that refuses the token (never
READY), SIGTERM (STOPPING=1, socket removed, the GPU ready state cleared) and a start-up
failure. Each test runs its own daemon, so nothing else holds the fake GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from confinfer.attestd_api import State
from confinfer.errors import Reason
from tests.attestd_proc import gpu_state, running, wait_for
from tests.integration.conftest import RunningTestbed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_a_noncompliant_token_revokes_and_never_sends_ready(
    testbed: RunningTestbed, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "version": "1.0.0",
                "anyOf": [
                    {
                        "authority": testbed.env["CONFINFER_MAA_URL"],
                        "allOf": [
                            {
                                "claim": "x-ms-isolation-tee.x-ms-attestation-type",
                                "equals": "tdxvm",
                            }
                        ],
                    }
                ],
            }
        )
    )
    with running({**testbed.env, "CONFINFER_VTPM_POLICY": str(policy)}) as other:
        health = other.wait_state(State.REVOKED, Reason.POLICY_UNSATISFIED)
        assert "x-ms-attestation-type" in health.line
        assert not any(m.get("READY") == "1" for m in other.notify.snapshot())
        assert other.stop() == 0


def test_sigterm_stops_cleanly(testbed: RunningTestbed) -> None:
    with running(testbed.env) as other:
        other.wait_state(State.HEALTHY)
        wait_for("the ready state", lambda: gpu_state(testbed.dir).get("ready") == "1" or None)
        assert other.stop() == 0
        assert any(m.get("STOPPING") == "1" for m in other.notify.snapshot())
        assert not other.socket_path.exists()
        assert gpu_state(testbed.dir).get("ready") == "0", other.log()
        assert "GPU ready state cleared" in other.log()


def test_a_missing_nvml_library_is_one_line_and_a_config_exit(
    testbed: RunningTestbed, tmp_path: Path
) -> None:
    env = {**testbed.env, "CONFINFER_NVML_LIBRARY": str(tmp_path / "nope.so")}
    with running(env, wait_socket=False) as other:
        code = other.proc.wait(30)
        lines = [line for line in other.log().splitlines() if line.strip()]
    assert code != 0
    assert len(lines) <= 2 and lines[0].startswith("attestd: "), lines
