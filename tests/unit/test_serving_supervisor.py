"""vllm-supervisor without dockerd: the container spec, the hand-off checks, and the readiness,
exit and stop decisions against a strict fake engine (tests/integration/test_serving_docker.py
runs the same code against a real dockerd)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from confinfer import config, sdnotify
from confinfer.attestd_api import Event, State
from confinfer.config import Config
from confinfer.errors import ConfigError, ConfinferError, Reason
from serving import supervisor as supervisor_mod
from serving.container import (
    CACHE_MOUNT,
    CONTAINER_NAME,
    ContainerSpec,
    check_serving_args,
    container_spec,
    engine_command,
)
from serving.engine import create_kwargs
from serving.handoff import MAX_HANDOFF_BYTES, Handoff, handoff_path, read_handoff
from serving.health import Probe
from serving.supervisor import Revocation, Stop, Supervisor, Timing, Wakeup

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """``<tmp>/run/model`` holding a model tree ``m/`` with its config.json."""
    root = tmp_path / "run" / "model"
    (root / "m").mkdir(parents=True)
    (root / "m" / "config.json").write_text("{}")
    return root


def write_handoff(model_dir: Path, doc: object) -> Path:
    path = handoff_path(model_dir)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def cfg_for(model_dir: Path, **values: Any) -> Config:
    return dataclasses.replace(Config(), model_dir=model_dir, **values)


# --- the container spec ----------------------------------------------------------------------


def spec_kwargs(cfg: Config, path: Path, *, entrypoint: bool = True) -> dict[str, Any]:
    spec = container_spec(cfg, Handoff(model_path=path), image_has_entrypoint=entrypoint)
    return create_kwargs(spec)


def test_the_container_is_hardened(model_dir: Path) -> None:
    kw = spec_kwargs(cfg_for(model_dir), model_dir / "m")
    assert kw["name"] == CONTAINER_NAME
    assert kw["user"] == "10001:10001"
    assert kw["network_mode"] == "host"
    assert kw["read_only"] is True
    assert kw["cap_drop"] == ["ALL"]
    assert kw["security_opt"] == ["no-new-privileges"]
    assert kw["init"] is True
    assert kw["shm_size"] == "1g"
    assert kw["pids_limit"] == 8192
    assert kw["restart_policy"] == {"Name": "no"}
    assert kw["labels"]["confinfer.role"] == "serving"
    assert kw["log_config"]["Type"] == "json-file"
    assert kw["log_config"]["Config"]["max-size"]
    assert "privileged" not in kw and "cap_add" not in kw and "ports" not in kw
    assert "volumes" not in kw  # a bind Mount: a missing source fails instead of being created


def test_the_cache_tmpfs_is_noexec_and_world_writable_sticky(model_dir: Path) -> None:
    kw = spec_kwargs(cfg_for(model_dir), model_dir / "m")
    assert set(kw["tmpfs"]) == {CACHE_MOUNT}
    options = kw["tmpfs"][CACHE_MOUNT].split(",")
    assert {"rw", "noexec", "nosuid", "nodev", "mode=1777"} <= set(options)
    assert any(o.startswith("size=") for o in options)


def test_the_model_is_mounted_read_only_at_model(model_dir: Path) -> None:
    kw = spec_kwargs(cfg_for(model_dir), model_dir / "m")
    [mount] = kw["mounts"]
    assert mount["Target"] == "/model"
    assert mount["Source"] == str(model_dir / "m")
    assert mount["Type"] == "bind"
    assert mount["ReadOnly"] is True
    assert mount["BindOptions"] == {"Propagation": "rprivate"}


def test_every_cache_and_home_is_on_the_tmpfs_and_the_engine_is_offline(model_dir: Path) -> None:
    env = spec_kwargs(cfg_for(model_dir), model_dir / "m")["environment"]
    for name in (
        "HOME",
        "TMPDIR",
        "XDG_CACHE_HOME",
        "HF_HOME",
        "VLLM_CACHE_ROOT",
        "VLLM_CONFIG_ROOT",
        "VLLM_RPC_BASE_PATH",
        "TORCHINDUCTOR_CACHE_DIR",
    ):
        assert env[name] == CACHE_MOUNT or env[name].startswith(CACHE_MOUNT + "/"), name
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_NO_USAGE_STATS"] == "1"
    assert env["DO_NOT_TRACK"] == "1"


@pytest.mark.parametrize("gpus", [True, False])
def test_the_gpus_are_requested_only_when_configured(model_dir: Path, gpus: bool) -> None:
    kw = spec_kwargs(cfg_for(model_dir, serving_gpus=gpus), model_dir / "m")
    if not gpus:
        assert "device_requests" not in kw
        return
    [request] = kw["device_requests"]
    assert request["Count"] == -1
    assert request["Capabilities"] == [["gpu"]]


def test_the_command_is_vllm_serve_arguments_after_the_images_entry_point(model_dir: Path) -> None:
    cfg = cfg_for(
        model_dir,
        serving_model_name="llama",
        serving_port=8123,
        serving_args=("--dtype", "float32", "--max-model-len=256"),
    )
    expected = (
        "/model",
        "--served-model-name",
        "llama",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--dtype",
        "float32",
        "--max-model-len=256",
    )
    assert engine_command(cfg, image_has_entrypoint=True) == expected
    assert engine_command(cfg, image_has_entrypoint=False) == ("vllm", "serve", *expected)
    assert spec_kwargs(cfg, model_dir / "m")["command"] == list(expected)


def test_the_engine_flags_come_from_the_configuration_file(tmp_path: Path, model_dir: Path) -> None:
    path = tmp_path / "serving.toml"
    path.write_text(
        'serving_args = ["--dtype", "float32", "--enforce-eager"]\nserving_gpus = false\n'
    )
    cfg = config.load(files=(path,), environ={})
    kw = spec_kwargs(cfg, model_dir / "m")
    assert kw["command"][-3:] == ["--dtype", "float32", "--enforce-eager"]
    assert "device_requests" not in kw


@pytest.mark.parametrize(
    "arg", ["--host", "--host=0.0.0.0", "--port", "--port=80", "--uds", "--served-model-name"]
)
def test_serving_args_may_not_move_the_engine(arg: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_serving_args(("--dtype", "float32", arg, "x"))
    assert err.value.reason is Reason.CONFIG_INVALID


# --- the hand-off ----------------------------------------------------------------------------


def test_a_valid_handoff_selects_the_resolved_model_tree(model_dir: Path) -> None:
    write_handoff(
        model_dir,
        {
            "model_path": str(model_dir / "m" / ".." / "m"),
            "bytes": 3500000,
            "files": 7,
            "unseal_s": 1.25,
            "source": "/srv/pkg",
            "future": "ignored",
        },
    )
    got = read_handoff(model_dir)
    assert got == Handoff(model_dir / "m", 3500000, 7, 1.25, "/srv/pkg")


def test_the_model_dir_itself_may_be_the_tree(model_dir: Path) -> None:
    (model_dir / "config.json").write_text("{}")
    write_handoff(model_dir, {"model_path": str(model_dir)})
    assert read_handoff(model_dir).model_path == model_dir


def test_a_link_that_stays_inside_is_followed(model_dir: Path) -> None:
    (model_dir / "current").symlink_to("m")
    write_handoff(model_dir, {"model_path": str(model_dir / "current")})
    assert read_handoff(model_dir).model_path == model_dir / "m"


def test_a_missing_handoff_says_the_model_is_not_unsealed(model_dir: Path) -> None:
    with pytest.raises(ConfinferError) as err:
        read_handoff(model_dir)
    assert err.value.reason is Reason.HANDOFF_MISSING


def invalid(model_dir: Path) -> str:
    with pytest.raises(ConfinferError) as err:
        read_handoff(model_dir)
    assert err.value.reason is Reason.HANDOFF_INVALID
    assert "\n" not in err.value.one_line()
    return err.value.message


@pytest.mark.parametrize(
    "doc",
    [
        "not json",
        "[1, 2]",
        '"a string"',
        "\xff\xfe",
        "{}",
        {"model_path": 7},
        {"model_path": ""},
        {"model_path": "relative/m"},
        {"model_path": "/etc"},
        {"model_path": "/"},
        {"model_path": "/nonexistent/model"},
        {"model_path": "/run/model\x00/m"},
        {"model_path": "MODEL/m", "bytes": "12"},
        {"model_path": "MODEL/m", "bytes": True},
        {"model_path": "MODEL/m", "files": -1},
        {"model_path": "MODEL/m", "unseal_s": "fast"},
        {"model_path": "MODEL/m", "source": ["x"]},
    ],
)
def test_a_malformed_handoff_is_refused(model_dir: Path, doc: object) -> None:
    if isinstance(doc, dict) and isinstance(doc.get("model_path"), str):
        doc = {**doc, "model_path": doc["model_path"].replace("MODEL", str(model_dir))}
    write_handoff(model_dir, doc)
    invalid(model_dir)


def test_a_model_path_escaping_through_dotdot_is_refused(model_dir: Path) -> None:
    outside = model_dir.parent / "elsewhere"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    write_handoff(model_dir, {"model_path": f"{model_dir}/../elsewhere"})
    assert "outside model_dir" in invalid(model_dir)


def test_a_link_out_of_the_model_dir_is_refused(model_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (model_dir / "evil").symlink_to(outside)
    write_handoff(model_dir, {"model_path": str(model_dir / "evil")})
    assert "outside model_dir" in invalid(model_dir)


def test_a_sibling_with_a_common_prefix_is_outside(model_dir: Path) -> None:
    sibling = model_dir.parent / (model_dir.name + "-other")
    sibling.mkdir()
    (sibling / "config.json").write_text("{}")
    write_handoff(model_dir, {"model_path": str(sibling)})
    assert "outside model_dir" in invalid(model_dir)


def test_a_tree_without_a_regular_config_json_is_refused(model_dir: Path) -> None:
    (model_dir / "empty").mkdir()
    write_handoff(model_dir, {"model_path": str(model_dir / "empty")})
    assert "config.json" in invalid(model_dir)
    (model_dir / "linked").mkdir()
    (model_dir / "linked" / "config.json").symlink_to(model_dir / "m" / "config.json")
    write_handoff(model_dir, {"model_path": str(model_dir / "linked")})
    assert "config.json" in invalid(model_dir)
    write_handoff(model_dir, {"model_path": str(model_dir / "m" / "config.json")})
    assert "not a directory" in invalid(model_dir)


def test_the_handoff_file_itself_may_not_be_a_link_a_directory_or_huge(
    model_dir: Path, tmp_path: Path
) -> None:
    real = tmp_path / "real.json"
    real.write_text(json.dumps({"model_path": str(model_dir / "m")}))
    handoff_path(model_dir).symlink_to(real)
    assert "symbolic link" in invalid(model_dir)
    handoff_path(model_dir).unlink()
    handoff_path(model_dir).mkdir()
    assert "not a regular file" in invalid(model_dir)
    handoff_path(model_dir).rmdir()
    write_handoff(model_dir, " " * (MAX_HANDOFF_BYTES + 1))
    assert "larger than" in invalid(model_dir)


def test_untrusted_text_in_a_refusal_is_one_printable_line(model_dir: Path) -> None:
    write_handoff(model_dir, {"model_path": "/nowhere\n<0>forged\x1b[31m"})
    message = invalid(model_dir)
    assert "\n" not in message and "\x1b" not in message
    assert "\\n<0>forged\\x1b" in message


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@given(
    doc=st.dictionaries(
        st.sampled_from(["model_path", "bytes", "files", "unseal_s", "source"]), JSON
    )
)
def test_any_json_is_accepted_or_refused_as_handoff_invalid(doc: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "model"
        (root / "m").mkdir(parents=True)
        (root / "m" / "config.json").write_text("{}")
        handoff_path(root).write_text(json.dumps(doc))
        try:
            got = read_handoff(root)
        except ConfinferError as exc:
            assert exc.reason is Reason.HANDOFF_INVALID
        else:
            assert got.model_path.is_relative_to(root.resolve())


# --- the supervisor's decisions --------------------------------------------------------------


class Timeline:
    """What happened, in order: probes and sd_notify messages."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, kind: str, value: Any) -> None:
        with self._lock:
            self.events.append((kind, value))

    def notes(self, key: str) -> list[str]:
        return [v[key] for k, v in self.events if k == "notify" and key in v]

    def index(self, kind: str, pred: Callable[[Any], bool]) -> int:
        return next(i for i, (k, v) in enumerate(self.events) if k == kind and pred(v))


@pytest.fixture
def timeline(monkeypatch: pytest.MonkeyPatch) -> Timeline:
    """sd_notify's messages recorded in order (the wire format is tests/unit/test_sdnotify.py's)."""
    line = Timeline()

    def notify(**fields: str | int) -> bool:
        line.add("notify", {k: str(v) for k, v in fields.items()})
        return True

    monkeypatch.setattr(sdnotify, "notify", notify)
    return line


class FakeEngine:
    """A strict :class:`serving.engine.Engine`: calls out of order fail the test."""

    def __init__(self, *, leftovers: int = 0, logs: str = "", entrypoint: bool = True) -> None:
        self.calls: list[str] = []
        self.spec: ContainerSpec | None = None
        self.logs = logs
        self.leftovers = leftovers
        self.entrypoint = entrypoint
        self.start_error: ConfinferError | None = None
        self.wait_error: ConfinferError | None = None
        self._exited = threading.Event()
        self._code = 0

    def image_has_entrypoint(self, image: str) -> bool:
        self.calls.append("inspect")
        return self.entrypoint

    def remove_leftovers(self) -> int:
        assert not self.calls, self.calls
        self.calls.append("remove_leftovers")
        return self.leftovers

    def start(self, spec: ContainerSpec) -> str:
        assert self.calls[0] == "remove_leftovers" and "start" not in self.calls
        self.calls.append("start")
        self.spec = spec
        if self.start_error is not None:
            raise self.start_error
        return "c0ffee" * 10

    def wait(self) -> int:
        assert "start" in self.calls
        self._exited.wait(30)
        if self.wait_error is not None:
            raise self.wait_error
        return self._code

    def exit(self, code: int) -> None:
        """The engine's process ends with ``code``."""
        self._code = code
        self._exited.set()

    def logs_tail(self, lines: int) -> str:
        return self.logs

    def forward_logs(self, sink: Any) -> None:
        self.calls.append("forward_logs")

    def stop(self, timeout_s: float) -> None:
        assert "start" in self.calls and "stop" not in self.calls
        self.calls.append("stop")
        self.exit(143)

    def kill(self) -> bool:
        had = "start" in self.calls and not {"stop", "kill"} & set(self.calls)
        self.calls.append("kill")
        if had:
            self.exit(137)
        return had

    def close(self) -> None:
        raise AssertionError("the supervisor does not close the engine it was given")


FAST = Timing(ready_timeout_s=5.0, ready_poll_s=0.005, health_interval_s=0.005)


@dataclasses.dataclass
class Run:
    supervisor: Supervisor
    engine: FakeEngine
    stop: Stop
    probes: list[bool]


def make(
    model_dir: Path,
    timeline: Timeline,
    script: Callable[[int, Run], bool],
    *,
    engine: FakeEngine | None = None,
    timing: Timing = FAST,
    watchdog: bool = False,
) -> Run:
    """A supervisor whose n-th /health probe answers ``script(n, run)``."""
    engine = engine or FakeEngine()
    wakeup = Wakeup()
    stop = Stop(wakeup)
    run: Run

    def probe(port: int, timeout: float) -> Probe:
        assert port == 8000
        ok = script(len(run.probes), run)
        run.probes.append(ok)
        timeline.add("probe", ok)
        return Probe(ok, "200" if ok else "ConnectionRefusedError: [Errno 111]")

    sup = Supervisor(
        cfg_for(model_dir),
        Handoff(model_path=model_dir / "m"),
        engine,
        timing=timing,
        wakeup=wakeup,
        stop=stop,
        probe=probe,
        watchdog=watchdog,
    )
    run = Run(sup, engine, stop, [])
    return run


def failure(run: Run) -> ConfinferError:
    with pytest.raises(ConfinferError) as err:
        run.supervisor.run()
    assert run.engine.calls[-1] == "stop", "the container is removed on every way out"
    return err.value


def test_ready_only_after_health_answers_and_a_stop_removes_the_container(
    model_dir: Path, timeline: Timeline
) -> None:
    def script(n: int, run: Run) -> bool:
        if n == 0:
            return False  # before start: the port is free
        if n >= 6:
            run.stop.request(signal.SIGTERM)
        return n >= 4

    run = make(model_dir, timeline, script)
    assert run.supervisor.run() == 0
    assert run.engine.calls == ["remove_leftovers", "inspect", "start", "forward_logs", "stop"]
    ready = timeline.index("notify", lambda v: "READY" in v)
    first_ok = timeline.index("probe", lambda ok: ok)
    assert ready > first_ok
    assert not any(ok for k, ok in timeline.events[:first_ok] if k == "probe")
    assert timeline.events[ready][1]["STATUS"].startswith(
        "serving model on 127.0.0.1:8000 (engine ready in "
    )
    assert timeline.notes("STATUS")[0].startswith("waiting for the engine's /health")
    assert timeline.index("notify", lambda v: "STOPPING" in v) > ready
    assert not timeline.notes("WATCHDOG")


def test_the_watchdog_is_fed_from_the_health_loop(model_dir: Path, timeline: Timeline) -> None:
    def script(n: int, run: Run) -> bool:
        if n >= 5:
            run.stop.request()
        return n >= 1

    run = make(model_dir, timeline, script, watchdog=True)
    assert run.supervisor.run() == 0
    ready = timeline.index("notify", lambda v: "READY" in v)
    assert len([1 for k, v in timeline.events[ready:] if k == "notify" and "WATCHDOG" in v]) >= 3


def test_an_engine_already_on_the_port_is_refused_before_anything_starts(
    model_dir: Path, timeline: Timeline
) -> None:
    run = make(model_dir, timeline, lambda n, run: True)
    with pytest.raises(ConfinferError) as err:
        run.supervisor.run()
    assert err.value.reason is Reason.ENGINE_START_FAILED
    assert "start" not in run.engine.calls and "stop" not in run.engine.calls
    assert not timeline.notes("READY")


def test_an_exit_before_ready_fails_with_its_code_and_escaped_output(
    model_dir: Path, timeline: Timeline
) -> None:
    def script(n: int, run: Run) -> bool:
        if n == 2:
            run.engine.exit(3)
        return False

    engine = FakeEngine(logs="Traceback (most recent call last):\nRuntimeError: no\x1b[31m GPU")
    run = make(model_dir, timeline, script, engine=engine)
    err = failure(run)
    assert err.reason is Reason.ENGINE_EXITED
    assert err.details == {"exit_code": 3}
    line = err.one_line()
    assert "exited with code 3 before it was ready" in line
    assert "\n" not in line and "\x1b" not in line
    assert "Traceback (most recent call last):\\nRuntimeError: no\\x1b[31m GPU" in line
    assert not timeline.notes("READY")
    assert err.exit_code == 74


def test_an_exit_while_serving_fails_the_unit(model_dir: Path, timeline: Timeline) -> None:
    def script(n: int, run: Run) -> bool:
        if n == 4:
            run.engine.exit(0)  # even a clean exit: the service is gone
            return False
        return n >= 1

    run = make(model_dir, timeline, script)
    err = failure(run)
    assert err.reason is Reason.ENGINE_EXITED
    assert "exited with code 0 while serving; no output" in err.message
    assert timeline.notes("READY") == ["1"]


def test_no_health_within_the_deadline_fails(model_dir: Path, timeline: Timeline) -> None:
    timing = dataclasses.replace(FAST, ready_timeout_s=0.1)
    run = make(model_dir, timeline, lambda n, run: False, timing=timing)
    err = failure(run)
    assert err.reason is Reason.ENGINE_NOT_READY
    assert "within 0.1 s (last: ConnectionRefusedError" in err.message
    assert not timeline.notes("READY")


def test_a_hung_engine_fails_after_consecutive_health_failures(
    model_dir: Path, timeline: Timeline
) -> None:
    ok = [False, True, True, False, False, True, False, False, False]

    def script(n: int, run: Run) -> bool:
        return ok[n] if n < len(ok) else False

    run = make(model_dir, timeline, script)
    err = failure(run)
    assert err.reason is Reason.ENGINE_UNHEALTHY
    assert "failed 3 times in a row" in err.message
    assert run.probes == ok  # two failures in a row were forgiven; the third of a run was not
    statuses = timeline.notes("STATUS")
    unhealthy = "engine unhealthy (2 of 3): ConnectionRefusedError: [Errno 111]"
    assert statuses[statuses.index(unhealthy) + 1].startswith("serving model on")


def test_a_stop_before_the_start_starts_nothing(model_dir: Path, timeline: Timeline) -> None:
    run = make(model_dir, timeline, lambda n, run: False)
    run.stop.request(signal.SIGTERM)
    assert run.supervisor.run() == 0
    assert run.engine.calls == []
    assert timeline.notes("STOPPING") == ["1"]


def test_a_stop_while_starting_removes_the_container_without_ready(
    model_dir: Path, timeline: Timeline
) -> None:
    def script(n: int, run: Run) -> bool:
        if n == 3:
            run.stop.request(signal.SIGINT)
        return False

    run = make(model_dir, timeline, script)
    assert run.supervisor.run() == 0
    assert run.engine.calls[-1] == "stop"
    assert not timeline.notes("READY")
    assert timeline.notes("STOPPING") == ["1"]


def test_a_failed_start_still_removes_what_was_created(model_dir: Path, timeline: Timeline) -> None:
    engine = FakeEngine()
    engine.start_error = ConfinferError("dockerd refused", reason=Reason.ENGINE_START_FAILED)
    run = make(model_dir, timeline, lambda n, run: False, engine=engine)
    assert failure(run).reason is Reason.ENGINE_START_FAILED


def test_losing_the_container_engine_fails_the_unit(model_dir: Path, timeline: Timeline) -> None:
    def script(n: int, run: Run) -> bool:
        if n == 3:
            run.engine.wait_error = ConfinferError("gone", reason=Reason.DOCKER_UNAVAILABLE)
            run.engine.exit(-1)
        return n >= 1

    run = make(model_dir, timeline, script)
    assert failure(run).reason is Reason.DOCKER_UNAVAILABLE


def test_an_image_without_an_entry_point_gets_vllm_serve(
    model_dir: Path, timeline: Timeline
) -> None:
    def script(n: int, run: Run) -> bool:
        if n == 2:
            run.stop.request()
        return n >= 1

    run = make(model_dir, timeline, script, engine=FakeEngine(entrypoint=False))
    assert run.supervisor.run() == 0
    assert run.engine.spec is not None
    assert run.engine.spec.command[:3] == ("vllm", "serve", "/model")


def test_probes_fit_inside_half_the_watchdog_timeout(model_dir: Path) -> None:
    timing = Timing.for_service(cfg_for(model_dir), 6.0)
    assert timing.health_interval_s + timing.probe_timeout_s <= 3.0
    assert Timing.for_service(cfg_for(model_dir), None).health_interval_s == 5.0


def test_the_wakeup_pipe_wakes_a_sleeper_and_is_consumed() -> None:
    wakeup = Wakeup()
    try:
        for _ in range(10000):  # more than the pipe holds: set() never blocks
            wakeup.set()
        wakeup.wait(5)
        start = time.monotonic()
        wakeup.wait(0.05)
        assert time.monotonic() - start >= 0.04
    finally:
        wakeup.close()


# --- the command -----------------------------------------------------------------------------


def run_main(
    tmp_path: Path,
    model_dir: Path,
    capsys: pytest.CaptureFixture[str],
    *flags: str,
    **values: Any,
) -> tuple[int, str]:
    lines = [f'model_dir = "{model_dir}"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    path = tmp_path / "serving.toml"
    path.write_text("\n".join(lines) + "\n")
    code = supervisor_mod.main(["--config", str(path), *flags])
    return code, capsys.readouterr().err


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("CONFINFER_") or name in ("NOTIFY_SOCKET", "WATCHDOG_USEC"):
            monkeypatch.delenv(name)
    # main() installs its SIGTERM/SIGINT handlers; put the previous ones back afterwards.
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.mark.usefixtures("clean_env")
def test_main_without_a_handoff_is_one_line_and_74(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_main(tmp_path, model_dir, capsys)
    assert code == 74
    assert err.startswith("vllm-supervisor: handoff-missing: ")
    assert err.splitlines()[1].startswith("hint: ")


@pytest.mark.usefixtures("clean_env")
def test_main_refuses_serving_args_that_move_the_engine(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_handoff(model_dir, {"model_path": str(model_dir / "m")})
    code, err = run_main(tmp_path, model_dir, capsys, serving_args=["--host", "0.0.0.0"])  # noqa: S104
    assert code == 78
    assert err.startswith("vllm-supervisor: config-invalid: serving_args may not set --host")


@pytest.mark.usefixtures("clean_env")
def test_main_without_a_container_engine_is_docker_unavailable(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_handoff(model_dir, {"model_path": str(model_dir / "m")})
    code, err = run_main(
        tmp_path, model_dir, capsys, docker_host=f"unix://{tmp_path}/no-docker.sock"
    )
    assert code == 74
    *logged, failed, hint = err.splitlines()
    assert logged == [f"model hand-off: {model_dir / 'm'} ()"]
    assert failed.startswith("vllm-supervisor: docker-unavailable: ")
    assert hint == "hint: is docker.service running, and is docker_host its socket?"


@pytest.mark.usefixtures("clean_env")
def test_cleanup_needs_no_handoff_but_the_container_engine(
    tmp_path: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_main(
        tmp_path, model_dir, capsys, "--cleanup", docker_host=f"unix://{tmp_path}/none.sock"
    )
    assert code == 74
    assert err.startswith("vllm-supervisor: docker-unavailable: ")


# --- revocation -------------------------------------------------------------------------------


def _event(state: State, reason: Reason = Reason.ATTESTD_HEALTHY) -> Event:
    return Event(state, reason, f"attestd {state}", time.time(), None)


def test_a_revocation_kills_the_engine_at_once_and_stops(
    model_dir: Path, timeline: Timeline
) -> None:
    revocation: Revocation

    def script(n: int, run: Run) -> bool:
        if n == 3:
            for state in (State.HEALTHY, State.DEGRADED, State.STARTING):
                revocation.on_event(_event(state))  # not a revocation: nothing happens
            assert "kill" not in run.engine.calls and not run.stop
            revocation.on_event(_event(State.REVOKED, Reason.GPU_CC_OFF))
            revocation.on_event(_event(State.REVOKED, Reason.GPU_CC_OFF))  # only once
            revocation.on_lost("attestd went away")  # a lost stream is not a revocation
        return n >= 2

    run = make(model_dir, timeline, script)
    revocation = Revocation(run.engine, run.stop)
    assert run.supervisor.run() == 0  # the container's exit (137) is the expected one
    # killed from the listener, the main loop's removal finds nothing: never a graceful stop
    assert run.engine.calls[-3:] == ["forward_logs", "kill", "kill"]
    assert "stop" not in run.engine.calls
    assert revocation.event is not None and revocation.event.reason is Reason.GPU_CC_OFF
    stopping = [v for k, v in timeline.events if k == "notify" and "STOPPING" in v]
    assert stopping[0]["STATUS"] == (
        "stopping the engine: attestd revoked attestation (gpu-cc-off)"
    )


def test_a_revocation_before_the_start_starts_nothing(model_dir: Path, timeline: Timeline) -> None:
    run = make(model_dir, timeline, lambda n, run: False)
    Revocation(run.engine, run.stop).on_event(_event(State.REVOKED, Reason.MAA_REFUSED))
    assert run.supervisor.run() == 0
    assert run.engine.calls == ["kill"]


def test_a_kill_that_fails_is_logged_and_the_stop_still_happens(
    model_dir: Path, timeline: Timeline, caplog: pytest.LogCaptureFixture
) -> None:
    engine = FakeEngine()

    def broken() -> bool:
        raise ConfinferError("dockerd is gone", reason=Reason.DOCKER_UNAVAILABLE)

    engine.kill = broken  # type: ignore[method-assign]
    run = make(model_dir, timeline, lambda n, run: False, engine=engine)
    Revocation(run.engine, run.stop).on_event(_event(State.REVOKED, Reason.GPU_CC_OFF))
    assert run.stop.why == "attestd revoked attestation (gpu-cc-off)"
    assert "could not kill the serving container" in caplog.text
