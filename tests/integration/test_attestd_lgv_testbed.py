"""attestd's LGV adapter run for real: fake venv interpreters in tmp (deadline, process group,
crash, garbage, no LGV) and the testbed's stand-in LGV venv (every fault)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from attestd.lgv import LgvBackend, LgvOptions
from attestd.state import GpuCollateralUnreachable, GpuEvidenceFailed, GpuEvidencePassed
from confinfer.errors import Reason
from testbed.lgv import ENV_NAME
from tests.integration.conftest import RunningTestbed

pytestmark = pytest.mark.integration

GOOD_STATE = ("cc=on", "devtools=off", "lost=0", "gpus=1", "tamper=0", "driver=550.127.05")


def fake_venv(tmp_path: Path, body: str) -> Path:
    """A venv whose ``bin/python`` is a script (it gets ``-I runner ...`` as its arguments)."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"#!{sys.executable}\n{body}")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return tmp_path / "venv"


def backend(venv: Path, **kw: object) -> LgvBackend:
    return LgvBackend(LgvOptions(expected_count=1, venv=venv, **kw))  # type: ignore[arg-type]


# --- fake interpreters -------------------------------------------------------------------------


def test_argv_stdin_and_environment(tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    venv = fake_venv(
        tmp_path,
        "import json, os, sys\n"
        "seen = {'argv': sys.argv[1:], 'stdin': sys.stdin.read(),"
        " 'rim_env': os.environ.get('NV_RIM_URL')}\n"
        f"json.dump(seen, open({str(seen)!r}, 'w'))\n",
    )
    env = {**os.environ, "NV_RIM_URL": "https://not-the-config.example"}
    result = backend(venv, rim_url="https://rim.example", ocsp_url="https://o.example", env=env)
    outcome = result.attest()
    data = json.loads(seen.read_text())
    argv = data["argv"]
    assert argv[0] == "-I" and argv[1].endswith("attestd/lgv_runner.py")
    assert argv[argv.index("--nonce") + 1] == outcome.nonce
    assert argv[argv.index("--rim-url") + 1] == "https://rim.example"
    assert argv[argv.index("--ocsp-url") + 1] == "https://o.example"
    assert data["stdin"] == "" and data["rim_env"] is None
    assert outcome.reason is Reason.GPU_VERIFIER_FAILED  # it printed nothing


def test_a_crash_and_garbage_fail_closed(tmp_path: Path) -> None:
    crash = fake_venv(tmp_path / "a", "raise SystemExit('Traceback: the runner broke')\n")
    result = backend(crash).attest()
    assert isinstance(result.observation, GpuEvidenceFailed)
    assert result.reason is Reason.GPU_VERIFIER_FAILED
    assert "exited 1" in result.observation.detail
    assert "the runner broke" in result.observation.detail
    garbage = fake_venv(tmp_path / "b", "print('GPU Attestation is Successful.')\n")
    result = backend(garbage).attest()
    assert result.reason is Reason.GPU_VERIFIER_FAILED
    assert "no result" in str(result.observation)


def test_a_python_without_the_lgv(tmp_path: Path) -> None:
    venv = tmp_path / "empty"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    result = backend(venv).attest()
    assert result.reason is Reason.GPU_VERIFIER_FAILED
    assert "cannot be imported" in str(result.observation)
    assert json.loads(result.raw_json or b"{}")["stage"] == "import"


def test_a_missing_venv_is_one_clear_line(tmp_path: Path) -> None:
    result = backend(tmp_path / "absent").attest()
    assert isinstance(result.observation, GpuEvidenceFailed)
    assert result.reason is Reason.GPU_VERIFIER_FAILED
    assert result.observation.detail == (
        f"no LGV virtualenv at {tmp_path / 'absent'}: {tmp_path / 'absent' / 'bin' / 'python'} "
        "is missing or not executable (gpu_lgv_venv)"
    )


# --- the testbed's stand-in --------------------------------------------------------------------


@pytest.fixture
def bed(testbed: RunningTestbed) -> Iterator[RunningTestbed]:
    yield testbed
    testbed.cli("fault", "--clear")
    testbed.cli("gpu", "set", *GOOD_STATE)


def standin(bed: RunningTestbed, **kw: object) -> LgvBackend:
    options = {"expected_count": 1, "timeout_s": 60.0} | kw
    return LgvBackend(
        LgvOptions(
            venv=Path(bed.env[ENV_NAME]),
            env=bed.environ(),
            **options,  # type: ignore[arg-type]
        )
    )


def ready_state(bed: RunningTestbed) -> str:
    state = (bed.dir / "gpu" / "state").read_text()
    return next(line for line in state.splitlines() if line.startswith("ready="))


@pytest.mark.parametrize("claims_version", ["3.0", "2.0"])
def test_a_good_gpu_passes_and_the_result_is_kept(
    bed: RunningTestbed, claims_version: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    before = ready_state(bed)
    result = standin(bed, claims_version=claims_version).attest()
    assert isinstance(result.observation, GpuEvidencePassed), result.observation
    assert result.raw_json is not None
    assert result.sha256 == hashlib.sha256(result.raw_json).hexdigest()
    document = json.loads(result.raw_json)
    assert document["detached_eat"] == result.detached_eat
    assert document["lgv"]["version"] == "2.7.3"
    assert result.claims[0]["eat_nonce"] == result.nonce
    assert result.claims[0]["x-nvidia-gpu-attestation-report-nonce-match"] is True
    assert json.loads(json.dumps(result.document))["overall_claims"]["x-nvidia-ver"] == (
        claims_version
    )
    assert ready_state(bed) == before  # user mode: the LGV never sets the ready state
    assert not (tmp_path / "verifier.log").exists()  # its log went to a scratch directory


@pytest.mark.parametrize(
    ("inject", "reason", "said"),
    [
        ("nonce-mismatch", Reason.GPU_NONCE_MISMATCH, "nonce"),
        ("bad-signature", Reason.GPU_EVIDENCE_INVALID, "signature"),
        ("ocsp-revoked", Reason.GPU_EVIDENCE_INVALID, "revoked"),
        ("ocsp-nonce-mismatch", Reason.GPU_EVIDENCE_INVALID, "attestation-report"),
    ],
)
def test_each_injected_fault_is_refused(
    bed: RunningTestbed, inject: str, reason: Reason, said: str
) -> None:
    bed.cli("fault", "nvattest", "--inject", inject)
    result = standin(bed).attest()
    assert isinstance(result.observation, GpuEvidenceFailed), result.observation
    assert result.reason is reason
    assert said in result.observation.detail


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (("cc=off",), Reason.GPU_CC_OFF),
        (("devtools=on",), Reason.GPU_EVIDENCE_INVALID),
        (("tamper=3",), Reason.GPU_EVIDENCE_INVALID),
        (("lost=1",), Reason.GPU_LOST),
    ],
)
def test_gpu_states_are_refused(
    bed: RunningTestbed, state: tuple[str, ...], reason: Reason
) -> None:
    bed.cli("gpu", "set", *state)
    result = standin(bed).attest()
    assert isinstance(result.observation, GpuEvidenceFailed), result.observation
    assert result.reason is reason
    if state == ("tamper=3",):
        assert "measurements do not match" in result.observation.detail


def test_the_configured_count_decides(bed: RunningTestbed) -> None:
    assert standin(bed, expected_count=2).attest().reason is Reason.GPU_COUNT_MISMATCH
    bed.cli("gpu", "set", "gpus=2")
    assert standin(bed, expected_count=2).attest().passed
    assert standin(bed).attest().reason is Reason.GPU_COUNT_MISMATCH


@pytest.mark.parametrize("knob", ["nvattest-ocsp", "nvattest-rim"])
def test_collateral_down_is_unreachable_not_refused(bed: RunningTestbed, knob: str) -> None:
    bed.cli("fault", knob, "--down")
    result = standin(bed).attest()
    assert isinstance(result.observation, GpuCollateralUnreachable), result.observation
    assert result.reason is Reason.GPU_COLLATERAL_UNAVAILABLE
    service = "OCSP responder" if knob == "nvattest-ocsp" else "RIM service"
    assert f"the {service} is unreachable" in result.observation.detail


@pytest.mark.parametrize(
    ("knob", "status", "reason"),
    [
        ("nvattest-ocsp", "503", None),
        ("nvattest-ocsp", "403", None),
        ("nvattest-rim", "503", None),
        ("nvattest-rim", "404", Reason.GPU_EVIDENCE_INVALID),
    ],
)
def test_collateral_statuses(
    bed: RunningTestbed, knob: str, status: str, reason: Reason | None
) -> None:
    bed.cli("fault", knob, "--status", status)
    result = standin(bed).attest()
    if reason is None:
        assert isinstance(result.observation, GpuCollateralUnreachable), result.observation
        assert result.reason is Reason.GPU_COLLATERAL_UNAVAILABLE
    else:
        assert isinstance(result.observation, GpuEvidenceFailed), result.observation
        assert result.reason is reason


def test_an_unreachable_configured_url_is_unreachable(bed: RunningTestbed) -> None:
    result = standin(bed, rim_url="ftp://rim.example").attest()
    assert isinstance(result.observation, GpuCollateralUnreachable), result.observation


def test_a_hanging_lgv_hits_the_deadline(bed: RunningTestbed) -> None:
    bed.cli("fault", "nvattest", "--latency", "30")
    result = standin(bed, timeout_s=2.0).attest()
    assert isinstance(result.observation, GpuCollateralUnreachable)
    assert result.reason is Reason.GPU_VERIFIER_TIMEOUT
