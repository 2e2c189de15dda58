"""attestd's nvattest adapter run for real: fake executables in tmp (deadline, process group,
output cap, exit status wrapping) and the testbed's stand-in nvattest (every fault)."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from attestd.gpuevidence import NvattestBackend, NvattestOptions
from attestd.state import GpuCollateralUnreachable, GpuEvidenceFailed, GpuEvidencePassed
from confinfer.errors import Reason
from tests.integration.conftest import RunningTestbed

pytestmark = pytest.mark.integration

GOOD_STATE = ("cc=on", "devtools=off", "lost=0", "gpus=1", "tamper=0", "driver=550.127.05")


def fake(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "nvattest"
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def backend(executable: Path | str, **kw: object) -> NvattestBackend:
    return NvattestBackend(NvattestOptions(expected_count=1, executable=executable, **kw))  # type: ignore[arg-type]


# --- fake executables ----------------------------------------------------------------------------


def test_the_deadline_kills_the_whole_process_group(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    exe = fake(
        tmp_path,
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(marker)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n",
    )
    start = time.monotonic()
    result = backend(exe, timeout_s=1.5).attest()
    assert time.monotonic() - start < 10
    assert isinstance(result.observation, GpuCollateralUnreachable)
    assert result.reason is Reason.GPU_VERIFIER_TIMEOUT
    child = int(marker.read_text())
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild survived the deadline")


def test_stdin_is_closed_and_the_argv_has_no_policy(tmp_path: Path) -> None:
    seen = tmp_path / "seen.json"
    exe = fake(
        tmp_path,
        "import json, sys\n"
        "seen = {'argv': sys.argv[1:], 'stdin': sys.stdin.read()}\n"
        f"json.dump(seen, open({str(seen)!r}, 'w'))\n"
        "print(json.dumps({'result_code': 4, 'result_message': 'Bad Argument', 'claims': {},"
        " 'detached_eat': {}}))\n"
        "sys.exit(4)\n",
    )
    result = backend(exe, rim_url="https://rim.example", ocsp_url="https://ocsp.example").attest()
    data = json.loads(seen.read_text())
    assert data["stdin"] == ""
    argv = data["argv"]
    assert argv[:7] == ["attest", "--device", "gpu", "--verifier", "local", "--nonce", result.nonce]
    assert "--relying-party-policy" not in argv
    assert argv[argv.index("--format") + 1] == "json"
    assert argv[argv.index("--rim-url") + 1] == "https://rim.example"
    assert argv[argv.index("--ocsp-url") + 1] == "https://ocsp.example"
    assert len(result.nonce) == 64
    assert result.reason is Reason.GPU_VERIFIER_FAILED


def test_the_exit_status_is_never_the_verdict(tmp_path: Path) -> None:
    # 256 + 0: exit status 0, but the document says 256 (an unknown code): refused.
    exe = fake(
        tmp_path,
        "import json\nprint(json.dumps({'result_code': 256, 'result_message': 'Undefined',"
        " 'claims': {}, 'detached_eat': {}}))\n",
    )
    result = backend(exe).attest()
    assert result.exit_status == 0
    assert result.result_code == 256
    assert result.reason is Reason.GPU_VERIFIER_FAILED


def test_output_beyond_the_cap_is_refused(tmp_path: Path) -> None:
    exe = fake(
        tmp_path,
        "import sys, time\nsys.stdout.write('x' * 200000)\nsys.stdout.flush()\ntime.sleep(30)\n",
    )
    start = time.monotonic()
    result = backend(exe, max_stdout_bytes=65536).attest()
    assert time.monotonic() - start < 10
    assert result.reason is Reason.GPU_VERIFIER_FAILED
    assert "more than" in str(result.observation)


def test_no_json_and_missing_executable_fail_closed(tmp_path: Path) -> None:
    exe = fake(tmp_path, "import sys\nsys.stderr.write('[error] boom\\n')\nprint('not json')\n")
    result = backend(exe).attest()
    assert isinstance(result.observation, GpuEvidenceFailed)
    assert result.reason is Reason.GPU_VERIFIER_FAILED
    assert "boom" in result.observation.detail
    missing = backend(tmp_path / "absent").attest()
    assert missing.reason is Reason.GPU_VERIFIER_FAILED


# --- the testbed's stand-in --------------------------------------------------------------------


@pytest.fixture
def bed(testbed: RunningTestbed) -> Iterator[RunningTestbed]:
    yield testbed
    testbed.cli("fault", "--clear")
    testbed.cli("gpu", "set", *GOOD_STATE)


def standin(bed: RunningTestbed, **kw: object) -> NvattestBackend:
    options = {"expected_count": 1, "timeout_s": 60.0} | kw
    return NvattestBackend(
        NvattestOptions(
            executable=bed.env["CONFINFER_TESTBED_NVATTEST"],
            env=bed.environ(),
            **options,  # type: ignore[arg-type]
        )
    )


def test_a_good_gpu_passes_and_the_result_is_kept(bed: RunningTestbed) -> None:
    result = standin(bed).attest()
    assert isinstance(result.observation, GpuEvidencePassed), result.observation
    assert result.result_code == 0 and result.raw_json is not None
    import hashlib

    assert result.sha256 == hashlib.sha256(result.raw_json).hexdigest()
    assert json.loads(result.raw_json)["detached_eat"] == result.detached_eat
    assert result.claims[0]["eat_nonce"] == result.nonce


@pytest.mark.parametrize(
    ("inject", "reason"),
    [
        ("nonce-mismatch", Reason.GPU_NONCE_MISMATCH),
        ("bad-signature", Reason.GPU_EVIDENCE_INVALID),
        ("ocsp-revoked", Reason.GPU_EVIDENCE_INVALID),
        ("ocsp-nonce-mismatch", Reason.GPU_EVIDENCE_INVALID),
    ],
)
def test_each_injected_fault_is_refused(bed: RunningTestbed, inject: str, reason: Reason) -> None:
    bed.cli("fault", "nvattest", "--inject", inject)
    result = standin(bed).attest()
    assert isinstance(result.observation, GpuEvidenceFailed), result.observation
    assert result.reason is reason
    if inject == "ocsp-revoked":
        assert "revoked" in result.observation.detail
    if inject == "ocsp-nonce-mismatch":
        assert "nonce" in result.observation.detail


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


def test_cc_off_through_the_gpu_action(bed: RunningTestbed) -> None:
    bed.cli("gpu", "cc-off")
    result = standin(bed).attest()
    assert result.reason is Reason.GPU_CC_OFF
    assert result.result_code == 509 and result.exit_status == 509 % 256


def test_the_configured_count_decides(bed: RunningTestbed) -> None:
    result = standin(bed, expected_count=2).attest()
    assert result.reason is Reason.GPU_COUNT_MISMATCH
    bed.cli("gpu", "set", "gpus=2")
    assert standin(bed, expected_count=2).attest().passed


@pytest.mark.parametrize("knob", ["nvattest-ocsp", "nvattest-rim"])
def test_collateral_down_is_unreachable_not_refused(bed: RunningTestbed, knob: str) -> None:
    bed.cli("fault", knob, "--down")
    result = standin(bed).attest()
    assert isinstance(result.observation, GpuCollateralUnreachable), result.observation
    assert result.reason is Reason.GPU_COLLATERAL_UNAVAILABLE
    assert result.result_code == 2


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
    else:
        assert result.reason is reason


def test_a_hanging_nvattest_hits_the_deadline(bed: RunningTestbed) -> None:
    bed.cli("fault", "nvattest", "--latency", "30")
    start = time.monotonic()
    result = standin(bed, timeout_s=2.0).attest()
    assert time.monotonic() - start < 15
    assert isinstance(result.observation, GpuCollateralUnreachable)
    assert result.reason is Reason.GPU_VERIFIER_TIMEOUT


def test_a_local_rim_directory_needs_no_rim_service(bed: RunningTestbed) -> None:
    rims = Path(bed.env["CONFINFER_TESTBED_GPU_RIMS"])
    assert sorted(p.name for p in rims.glob("*.xml")) == [
        "NV_GPU_DRIVER_GH100_550.127.05.xml",
        "NV_GPU_VBIOS_96009F0004.xml",
    ]
    bed.cli("fault", "nvattest-rim", "--down")
    result = standin(bed, rim_dir=rims).attest()
    assert result.passed, result.observation
    assert (
        "--rim-store"
        in json.loads((bed.dir / "run" / "nvattest.log").read_text().splitlines()[-1])["argv"]
    )


def test_a_missing_local_rim_is_refused(bed: RunningTestbed, tmp_path: Path) -> None:
    result = standin(bed, rim_dir=tmp_path).attest()
    assert isinstance(result.observation, GpuEvidenceFailed)
    assert result.reason is Reason.GPU_EVIDENCE_INVALID
    assert result.result_code == 104
