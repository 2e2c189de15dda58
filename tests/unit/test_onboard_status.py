"""Where onboarding stands, as people and scripts see it: ``confinfer onboard status`` and the
onboarding rows of ``confinfer status`` (table and JSON, exit statuses 0/2/1), read from the
state file; while onboarding runs, attestd is not up and ``status`` says so without failing."""

from __future__ import annotations

import dataclasses
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from confinfer import cli, status_cli
from confinfer.attestd_api import GpuSummary, Health, State
from confinfer.errors import Reason, ServiceError
from confinfer.onboard_state import STAGES, Record, StateFile, Status
from confinfer.onboard_state import State as OnboardState

pytestmark = pytest.mark.unit

NOW = 1_764_000_000.0
BOOT = "8f0d5a1e-5b8e-4c8a-9d7e-1c2b3a4d5e6f"
HEALTHY = Health(
    state=State.HEALTHY,
    reason=Reason.ATTESTD_HEALTHY,
    line="attested",
    since=NOW,
    last_gpu_pass=NOW,
    last_vtpm_pass=NOW,
    token_expiry=NOW + 3600,
    ak_cert_expiry=NOW + 86400 * 100,
    gpus=GpuSummary(1, 1, ()),
)


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def write_state(path: Path, **by_stage: Record) -> OnboardState:
    state = OnboardState.new("azure")
    for record in by_stage.values():
        state = state.replace(record)
    StateFile(path).save(state)
    return state


def rebooting(tmp_path: Path) -> Path:
    path = tmp_path / "onboard.json"
    write_state(
        path,
        kernel=Record("kernel", Status.DONE, 1, BOOT, NOW - 600),
        driver=Record("driver", Status.REBOOTING, 1, BOOT, NOW - 60),
    )
    return path


def failed(tmp_path: Path) -> Path:
    path = tmp_path / "onboard.json"
    done = {s.name: Record(s.name, Status.DONE, 1, BOOT, NOW) for s in STAGES[:2]}
    write_state(
        path,
        **done,
        cc=Record(
            "cc-mode",
            Status.FAILED,
            1,
            BOOT,
            NOW,
            Reason.GPU_CC_OFF,
            "nvidia-smi conf-compute -f printed CC status: OFF\n<0>forged",
        ),
    )
    return path


def all_done(tmp_path: Path) -> Path:
    path = tmp_path / "onboard.json"
    write_state(path, **{s.name: Record(s.name, Status.DONE, 1, BOOT, NOW) for s in STAGES})
    return path


def main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_onboard_status_table_shows_every_stage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = rebooting(tmp_path)
    code, out, _ = main(capsys, "onboard", "status", "--state-dir", str(path.parent))
    assert code == 2
    lines = out.splitlines()
    assert lines[0] == "onboarding: 2/6 driver: installed, rebooting"
    assert lines[1].startswith("  1 kernel            done      2025-11-24T")
    assert lines[2].startswith("  2 driver            rebooting ")
    assert lines[2].endswith("  attempt 1 of 3")
    assert lines[3] == "  3 cc-mode           pending"
    assert [line.split()[1] for line in lines[1:]] == [s.name for s in STAGES]


def test_onboard_status_json_and_exit_statuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = failed(tmp_path)
    code, out, _ = main(
        capsys, "onboard", "status", "--state-dir", str(tmp_path), "--format", "json"
    )
    assert code == 1
    obj = json.loads(out)
    assert obj["state"] == "failed" and obj["hardware"] == "azure"
    cc = obj["stages"][2]
    assert (cc["index"], cc["name"], cc["status"], cc["reason"]) == (
        3, "cc-mode", "failed", "gpu-cc-off",
    )  # fmt: skip
    assert obj["line"].startswith("onboarding 3/6 cc-mode: failed (gpu-cc-off): ")
    assert "\\n<0>forged" in obj["line"]  # escaped: one line
    code, out, _ = main(capsys, "onboard", "status", "--state-dir", str(tmp_path))
    assert code == 1 and "\n<0>" not in out
    all_done(tmp_path)
    assert main(capsys, "onboard", "status", "--state-dir", str(tmp_path))[0] == 0
    assert path.exists()


def test_onboard_alone_is_status_and_run_has_its_options() -> None:
    from confinfer import onboard_cli

    assert cli.build_parser().parse_args(["onboard"]).func is onboard_cli.status
    args = cli.build_parser().parse_args(["onboard", "run", "--retry"])
    assert (args.func, args.retry, str(args.state_dir)) == (
        onboard_cli.run, True, "/var/lib/confinfer",
    )  # fmt: skip
    assert str(args.boot_id_file) == "/proc/sys/kernel/random/boot_id"


def test_onboard_status_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = main(capsys, "onboard", "status", "--state-dir", str(tmp_path))
    assert code == 2
    assert out == f"onboarding: not started (no {tmp_path / 'onboard.json'})\n"


class _Attestd:
    def __init__(self, health: Health | None) -> None:
        self.answer = health

    def __call__(self, socket_path: Any) -> _Attestd:
        return self

    def health(self) -> Health:
        if self.answer is None:
            raise ServiceError(
                "attestd at /run/attestd/attestd.sock: no such socket (is attestd running?)",
                reason=Reason.ATTESTD_UNAVAILABLE,
            )
        return self.answer


def status(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, health: Health | None,
    state: Path, *argv: str,
) -> tuple[int, str, str]:  # fmt: skip
    monkeypatch.setattr(status_cli, "Client", _Attestd(health))
    return main(capsys, "status", "--socket", "/x.sock", "--onboard-state", str(state), *argv)


def test_status_while_onboarding_shows_the_stages_instead_of_failing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = rebooting(tmp_path)
    code, out, err = status(capsys, monkeypatch, None, path)
    assert (code, err) == (2, "")
    assert out.splitlines()[0] == "onboarding: 2/6 driver: installed, rebooting"
    assert out.splitlines()[-1].startswith("attestd:    attestd-unavailable: attestd at ")
    code, out, _ = status(capsys, monkeypatch, None, path, "--format", "json")
    assert code == 2
    obj = json.loads(out)
    assert obj["onboarding"]["state"] == "in-progress"
    assert obj["attestd"]["reason"] == "attestd-unavailable"
    code, out, _ = status(capsys, monkeypatch, None, failed(tmp_path))
    assert code == 1
    assert "  3 cc-mode           failed    " in out


def test_status_after_onboarding_is_attestds_with_the_stages_below(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = all_done(tmp_path)
    code, out, _ = status(capsys, monkeypatch, HEALTHY, path, "--format", "json")
    assert code == 0
    obj = json.loads(out)
    assert obj["state"] == "healthy"
    assert obj["onboarding"]["state"] == "done"
    assert [s["status"] for s in obj["onboarding"]["stages"]] == ["done"] * len(STAGES)
    code, out, _ = status(capsys, monkeypatch, HEALTHY, path)
    assert code == 0
    assert out.splitlines()[0].startswith("state:")
    assert "onboarding: done: 6/6 stages" in out.splitlines()
    # Once done, attestd unreachable is status's usual failure.
    code, out, err = status(capsys, monkeypatch, None, path)
    assert (code, out) == (1, "")
    assert err.startswith("confinfer: attestd-unavailable: ")


def test_status_without_a_state_file_is_attestds_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = status(capsys, monkeypatch, HEALTHY, tmp_path / "none.json", "--format", "json")
    assert code == 0
    assert json.loads(out) == HEALTHY.to_obj()


def test_a_stage_not_done_overrides_attestds_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = status(capsys, monkeypatch, HEALTHY, rebooting(tmp_path))
    assert code == 2
    assert "onboarding: 2/6 driver: installed, rebooting" in out.splitlines()
    revoked = dataclasses.replace(HEALTHY, state=State.REVOKED, reason=Reason.GPU_CC_OFF)
    assert status(capsys, monkeypatch, revoked, failed(tmp_path))[0] == 1
