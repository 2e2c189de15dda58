"""model-loader's decisions without a mount, a network or attestd: tmpfs options and size, the
mounts it calls its own, hostile blob listings, the hand-off file, where the engine's model
lies, and what each attestd event means once the model is loaded."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from confinfer.attestd_api import Event, State
from confinfer.config import Config
from confinfer.errors import ConfinferError, Interrupted, Reason, ServiceError
from confinfer.follow import Follower
from loader import blob, tmpfs
from loader.service import (
    Guard,
    Lost,
    Phase,
    Service,
    Stopper,
    Verdict,
    Watch,
)
from loader.tmpfs import find_model_path, remove_handoff, write_handoff

pytestmark = pytest.mark.unit

MiB = 1 << 20


def event(state: State, reason: Reason, line: str = "a line") -> Event:
    return Event(state, reason, line, time.time(), None)


HEALTHY = event(State.HEALTHY, Reason.ATTESTD_HEALTHY, "attested")
DEGRADED = event(State.DEGRADED, Reason.MAA_UNAVAILABLE, "MAA unreachable")
STARTING = event(State.STARTING, Reason.ATTESTD_STARTING, "first pass")
REVOKED = event(State.REVOKED, Reason.GPU_CC_OFF, "confidential computing is off")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- tmpfs: options, size, ownership of a mount -------------------------------------------------


def test_size_is_the_plaintext_plus_pages_margin_and_floor() -> None:
    size = tmpfs.tmpfs_size(100 * MiB, entries=10)
    assert size == -(-(int((100 * MiB + 10 * 4096) * 1.05 + 0.999) + 16 * MiB) // 4096) * 4096
    assert size % 4096 == 0
    assert tmpfs.tmpfs_size(0) == 16 * MiB  # an empty model still gets the floor


def test_configured_size_wins() -> None:
    assert tmpfs.tmpfs_size(100 * MiB, entries=10, configured=5 * MiB) == 5 * MiB


def test_mount_options() -> None:
    assert tmpfs.mount_data(1 << 30, noswap=True) == "mode=0700,size=1073741824,uid=0,gid=0,noswap"
    assert "noswap" not in tmpfs.mount_data(1 << 30, noswap=False)


@pytest.mark.parametrize(
    ("noswap", "swap_on", "allow", "refused"),
    [
        (True, True, False, False),  # noswap: pages never reach swap
        (True, False, False, False),
        (False, False, False, False),  # no noswap, but no swap either
        (False, True, True, False),  # the operator accepts (encrypted swap)
        (False, True, False, True),
    ],
)
def test_swap_decision(noswap: bool, swap_on: bool, allow: bool, refused: bool) -> None:
    refusal = tmpfs.swap_refusal(noswap, swap_on, allow)
    assert (refusal is not None) == refused
    if refusal is not None:
        assert refusal.reason is Reason.MODEL_SWAP
        assert refusal.exit_code == 77


def test_swap_active_reads_proc_swaps() -> None:
    header = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
    assert not tmpfs.swap_active(header)
    assert tmpfs.swap_active(header + "/dev/sda2  partition  8388604  0  -2\n")


OURS = (
    "45 27 0:40 / /run/confinfer/model rw,nosuid,nodev,noexec,relatime - tmpfs "
    "confinfer-model rw,size=19904k,mode=700,noswap"
)
FOREIGN_TMPFS = "46 27 0:41 / /run/confinfer/model rw,relatime - tmpfs tmpfs rw,size=1024k"
FOREIGN_MODE = (
    "47 27 0:42 / /run/confinfer/model rw,relatime - tmpfs confinfer-model rw,size=1k,mode=755"
)
SPACED = r"48 27 0:43 / /tmp/a\040b rw - tmpfs confinfer-model rw,mode=700"


def test_mountinfo_parsing_and_what_is_ours() -> None:
    mounts = tmpfs.parse_mountinfo("\n".join([OURS, FOREIGN_TMPFS, FOREIGN_MODE, SPACED, "junk"]))
    assert [m.ours for m in mounts] == [True, False, False, True]
    assert mounts[0].super_options == ("rw", "size=19904k", "mode=700", "noswap")
    assert mounts[3].mount_point == "/tmp/a b"
    assert tmpfs.mounts_at(Path("/tmp/a b"), SPACED)[0].source == "confinfer-model"
    assert tmpfs.mounts_at(Path("/run/confinfer"), OURS) == []


def test_a_mount_that_is_not_ours_is_refused(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(FOREIGN_TMPFS + "\n", encoding="utf-8")
    with pytest.raises(ConfinferError) as err:
        tmpfs.clean_stale(Path("/run/confinfer/model"), mountinfo=info)
    assert err.value.reason is Reason.MODEL_DIR_BUSY
    assert tmpfs.clean_stale(tmp_path / "elsewhere", mountinfo=info) == 0


def test_mount_point_refuses_a_symbolic_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConfinferError) as err:
        tmpfs.mount_point(tmp_path / "link")
    assert err.value.reason is Reason.MODEL_DIR_BUSY
    with pytest.raises(ConfinferError):
        tmpfs.mount_point(tmp_path / "link" / "m")  # below a link
    made = tmpfs.mount_point(tmp_path / "new" / "m")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700


def test_clear_tree_removes_read_only_trees(tmp_path: Path) -> None:
    root = tmp_path / "m"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "w").write_bytes(b"x" * 100)
    (root / "f").write_bytes(b"y")
    (root / "a" / "b" / "w").chmod(0o440)
    (root / "a" / "b").chmod(0o550)
    (root / "a").chmod(0o550)
    assert tmpfs.clear_tree(root) == 0
    assert root.is_dir() and not any(root.iterdir())


# --- Blob: the URL and hostile listings ---------------------------------------------------------


def test_blob_urls() -> None:
    azure = blob.BlobSource.parse("https://acct1.blob.core.windows.net/models/llama/v1")
    assert azure == blob.BlobSource("https://acct1.blob.core.windows.net", "models", "llama/v1/")
    flat = blob.BlobSource.parse("https://acct1.blob.core.windows.net/models")
    assert flat.prefix == ""
    emulator = blob.BlobSource.parse("https://127.0.0.1:10000/devstoreaccount1/models/tiny/")
    assert emulator.account_url == "https://127.0.0.1:10000/devstoreaccount1"
    assert (emulator.container, emulator.prefix) == ("models", "tiny/")
    assert blob.is_blob_url("https://x") and not blob.is_blob_url("/srv/pkg")


@pytest.mark.parametrize(
    "url",
    [
        "http://acct.blob.core.windows.net/models/p",  # not TLS
        "https://acct.blob.core.windows.net/models/p?sv=2024&sig=abc",  # a SAS in the URL
        "https://user@acct.blob.core.windows.net/models/p",
        "https://acct.blob.core.windows.net/",  # no container
        "https://acct.blob.core.windows.net/Models/p",  # not a container name
        "https://acct.blob.core.windows.net/models/a/../b",
        "https://127.0.0.1:10000/models",  # path-style without an account
        "ftp://acct.blob.core.windows.net/models",
    ],
)
def test_bad_blob_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfinferError) as err:
        blob.BlobSource.parse(url)
    assert err.value.reason is Reason.MODEL_SOURCE_INVALID
    assert err.value.exit_code == 78


@pytest.mark.parametrize(
    "name",
    [
        "pkg/../x",
        "pkg/..",
        "pkg//etc/passwd",
        "pkg/sub/model.sealed",  # nested: a package is flat
        "pkg/.",
        "pkg/a\\b",
        "pkg/model.sealed\n<0>forged",
        "pkg/\x1b[31mred",
        "other/model.sealed",  # outside the prefix asked for
        "pkg/" + "a" * 256,
    ],
)
def test_hostile_blob_names_are_refused(name: str) -> None:
    with pytest.raises(ConfinferError) as err:
        blob.file_name(name, "pkg/")
    assert err.value.reason is Reason.BLOB_NAME_UNSAFE
    assert err.value.exit_code == 65
    assert "\n" not in err.value.one_line() and "\x1b" not in err.value.one_line()


def test_one_hostile_name_refuses_the_whole_listing() -> None:
    listing = [("pkg/model.sealed", 100), ("pkg/../x", 1)]
    with pytest.raises(ConfinferError) as err:
        blob.choose_files(listing, "pkg/")
    assert err.value.reason is Reason.BLOB_NAME_UNSAFE


def test_the_package_files_are_chosen_from_a_listing() -> None:
    sealed = [("pkg/", 0), ("pkg/model.sealed", 100), ("pkg/README", 5)]
    assert blob.choose_files(sealed, "pkg/") == {"model.sealed": ("pkg/model.sealed", 100)}
    tut = [("model_archive.tar.enc", 50), ("wrapped_model_dek.bin", 256)]
    assert set(blob.choose_files(tut, "")) == {"model_archive.tar.enc", "wrapped_model_dek.bin"}
    both = [*sealed, ("pkg/model_archive.tar.enc", 1), ("pkg/wrapped_model_dek.bin", 1)]
    assert set(blob.choose_files(both, "pkg/")) == {"model.sealed"}  # the sealed format wins
    for incomplete in ([], [("pkg/model_archive.tar.enc", 1)], [("pkg/README", 1)]):
        with pytest.raises(ConfinferError) as err:
            blob.choose_files(incomplete, "pkg/")
        assert err.value.reason is Reason.BLOB_NOT_FOUND


def test_staging_directory_is_private_and_goes_away(tmp_path: Path) -> None:
    with blob.staging_dir({"STATE_DIRECTORY": f"{tmp_path}:/elsewhere"}) as staging:
        assert staging.parent == tmp_path
        assert stat.S_IMODE(staging.stat().st_mode) == 0o700
        (staging / "model.sealed").write_bytes(b"ciphertext")
    assert not staging.exists()
    assert blob.staging_root({"CACHE_DIRECTORY": "/var/cache/x"}) == Path("/var/cache/x")


# --- the hand-off -------------------------------------------------------------------------------


def test_handoff_file_is_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    data = {"model_path": "/run/confinfer/model", "bytes": 3, "files": 1, "unseal_s": 0.1}
    old = os.umask(0o077)
    try:
        write_handoff(path, {**data, "source": "/srv/pkg"})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert json.loads(path.read_text("utf-8")) == {**data, "source": "/srv/pkg"}
    write_handoff(path, {**data, "bytes": 4, "source": "/srv/pkg"})  # replaces it
    assert json.loads(path.read_text("utf-8"))["bytes"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]  # no temporary left
    remove_handoff(path)
    remove_handoff(path)  # idempotent
    assert not path.exists()


def test_model_path_of_a_sealed_package_is_the_root(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.json").write_text("{}")  # deeper: not the model's
    assert find_model_path(tmp_path) == tmp_path


def test_model_path_of_the_tutorial_layout_is_one_deeper(tmp_path: Path) -> None:
    (tmp_path / "Llama").mkdir()
    (tmp_path / "Llama" / "config.json").write_text("{}")
    assert find_model_path(tmp_path) == tmp_path / "Llama"


def test_no_model_or_two_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfinferError) as err:
        find_model_path(tmp_path)
    assert err.value.reason is Reason.MODEL_LAYOUT
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    with pytest.raises(ConfinferError) as err:
        find_model_path(tmp_path)
    assert err.value.reason is Reason.MODEL_LAYOUT


def test_a_linked_config_does_not_count(tmp_path: Path) -> None:
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "config.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(ConfinferError) as err:
        find_model_path(tmp_path)
    assert err.value.reason is Reason.MODEL_LAYOUT


# --- following attestd --------------------------------------------------------------------------


def test_revoked_ends_with_attestds_reason() -> None:
    watch = Watch(30.0)
    assert watch.event(HEALTHY, 0.0) is None
    verdict = watch.event(REVOKED, 1.0)
    assert verdict is not None
    assert verdict.reason is Reason.GPU_CC_OFF
    assert verdict.exit_code == 77
    assert "confidential computing is off" in verdict.message


def test_degraded_keeps_serving() -> None:
    watch = Watch(30.0)
    assert watch.event(DEGRADED, 0.0) is None
    assert watch.expired(10_000.0) is None  # degraded is attestd's grace, not ours


def test_unreachable_past_the_grace_ends() -> None:
    watch = Watch(30.0)
    watch.event(HEALTHY, 0.0)
    assert watch.lost("no such socket", 10.0) is None
    assert watch.lost("no such socket", 39.0) is None  # the clock runs from the first loss
    verdict = watch.lost("no such socket", 41.0)
    assert isinstance(verdict, ServiceError)
    assert verdict.reason is Reason.ATTESTD_UNAVAILABLE
    assert "31 s" in verdict.message and "no such socket" in verdict.message


def test_a_reconnect_resets_the_grace() -> None:
    watch = Watch(30.0)
    watch.lost("refused", 0.0)
    assert watch.event(HEALTHY, 20.0) is None
    assert watch.lost("refused", 40.0) is None
    assert watch.expired(69.0) is None
    assert watch.expired(71.0) is not None


def test_starting_counts_against_the_grace() -> None:
    watch = Watch(30.0)
    watch.event(HEALTHY, 0.0)
    assert watch.event(STARTING, 5.0) is None
    assert watch.expired(36.0) is not None


def test_guard_delivers_nothing_while_waiting() -> None:
    clock = Clock()
    guard = Guard(30.0, clock=clock)
    guard.on_event(REVOKED)  # revoked before the model is there: keep waiting for healthy
    assert guard.items.get_nowait() == REVOKED
    assert guard.items.empty()
    guard.on_event(HEALTHY)
    guard.begin(Phase.LOADING)


def test_guard_raises_at_once_when_loading_starts_after_a_revocation() -> None:
    guard = Guard(30.0, clock=Clock())
    guard.on_event(HEALTHY)
    guard.on_event(REVOKED)
    with pytest.raises(ConfinferError) as err:
        guard.begin(Phase.LOADING)
    assert err.value.reason is Reason.GPU_CC_OFF


def test_guard_interrupts_loading_and_queues_serving_verdicts() -> None:
    clock = Clock()
    interrupted: list[ConfinferError] = []
    guard = Guard(30.0, clock=clock, interrupt=interrupted.append)
    guard.on_event(HEALTHY)
    guard.begin(Phase.LOADING)
    guard.on_lost("refused")
    clock.now += 31
    guard.check()
    assert [e.reason for e in interrupted] == [Reason.ATTESTD_UNAVAILABLE]

    serving = Guard(30.0, clock=clock, interrupt=interrupted.append)
    serving.on_event(HEALTHY)
    serving.begin(Phase.SERVING)
    serving.on_event(DEGRADED)
    serving.on_event(REVOKED)
    serving.on_event(REVOKED)
    items = [serving.items.get_nowait() for _ in range(serving.items.qsize())]
    verdicts = [i for i in items if isinstance(i, Verdict)]
    assert len(verdicts) == 1  # one verdict, once
    assert verdicts[0].error.reason is Reason.GPU_CC_OFF
    assert len(interrupted) == 1  # serving verdicts are not interrupts


class FakeStream:
    """A scripted event stream: events, then an error (or blocking until closed)."""

    def __init__(self, events: list[Event], error: ConfinferError | None) -> None:
        self._events = list(events)
        self._error = error
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[Event]:
        yield from self._events
        if self._error is not None:
            raise self._error
        self.closed.wait(5)

    def close(self) -> None:
        self.closed.set()


class FakeClient:
    """``events()`` answers from a script: a stream, or an error (the socket missing)."""

    def __init__(self, script: list[FakeStream | ConfinferError]) -> None:
        self.script = script
        self.calls = 0

    def events(self, *, idle_timeout: float | None = None) -> FakeStream:
        self.calls += 1
        step = self.script[min(self.calls, len(self.script)) - 1]
        if isinstance(step, ConfinferError):
            raise step
        return step


def unavailable(why: str) -> ServiceError:
    return ServiceError(f"attestd at /s: {why}", reason=Reason.ATTESTD_UNAVAILABLE)


def test_feed_reconnects_after_a_broken_stream() -> None:
    last = FakeStream([HEALTHY], None)
    client = FakeClient(
        [
            unavailable("no such socket"),
            FakeStream([STARTING, HEALTHY], unavailable("the event stream ended")),
            last,
        ]
    )
    guard = Guard(30.0)
    feed = Follower(client, guard, backoff=(0.01, 0.02))
    feed.start()
    try:
        seen: list[object] = []
        deadline = time.monotonic() + 5
        while len(seen) < 5 and time.monotonic() < deadline:
            seen.append(guard.items.get(timeout=5))
    finally:
        feed.close()
    assert client.calls == 3
    assert [type(s).__name__ for s in seen] == ["Lost", "Event", "Event", "Lost", "Event"]
    assert isinstance(seen[0], Lost) and "no such socket" in seen[0].why
    assert seen[-1] == HEALTHY


# --- the serving loop ---------------------------------------------------------------------------


def service(tmp_path: Path, client: FakeClient) -> Service:
    cfg = Config(model_dir=tmp_path / "run" / "m", model_source=str(tmp_path / "pkg"))
    return Service(cfg, environ={}, client=client)


def test_follow_keeps_serving_while_degraded_and_ends_on_revoked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    statuses: list[str] = []
    monkeypatch.setattr("confinfer.sdnotify.status", statuses.append)
    svc = service(tmp_path, FakeClient([]))
    svc.guard.on_event(HEALTHY)
    svc.guard.begin(Phase.SERVING)
    for item in (DEGRADED, HEALTHY, REVOKED):
        svc.guard.on_event(item)
    with pytest.raises(ConfinferError) as err:
        svc._follow("model ready: 1 MiB in 0.1 s (/m)")
    assert err.value.reason is Reason.GPU_CC_OFF
    assert statuses == [
        "model ready: 1 MiB in 0.1 s (/m); attestd degraded (maa-unavailable)",
        "model ready: 1 MiB in 0.1 s (/m)",
        "wiping the model: gpu-cc-off",
    ]


def test_follow_ends_when_the_grace_runs_out(tmp_path: Path) -> None:
    svc = service(tmp_path, FakeClient([]))
    clock = Clock()
    svc.guard = Guard(0.5, clock=clock)
    svc.guard.on_event(HEALTHY)
    svc.guard.begin(Phase.SERVING)
    svc.guard.on_lost("refused")
    clock.now += 1.0  # checked on the loop's own tick, with no event coming
    with pytest.raises(ConfinferError) as err:
        svc._follow("ready")
    assert err.value.reason is Reason.ATTESTD_UNAVAILABLE
    assert err.value.exit_code == 69


def test_service_fails_fast_on_a_bad_source(tmp_path: Path) -> None:
    cfg = Config(model_dir=tmp_path / "m", model_source="http://acct.blob.core.windows.net/c/p")
    with pytest.raises(ConfinferError) as err:
        Service(cfg, environ={}, client=FakeClient([])).run()
    assert err.value.reason is Reason.MODEL_SOURCE_INVALID
    with pytest.raises(ConfinferError) as err:
        Service(Config(model_dir=tmp_path / "m"), environ={}, client=FakeClient([])).run()
    assert err.value.reason is Reason.MODEL_SOURCE_INVALID


def test_stopper_raises_once_and_prefers_a_pending_verdict(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("confinfer.sdnotify.stopping", lambda status=None: True)
    stopper = Stopper()
    with pytest.raises(Interrupted):
        stopper._handle(signal.SIGTERM, None)
    assert stopper.signum == signal.SIGTERM
    stopper._handle(signal.SIGTERM, None)  # a second signal during cleanup: only noted

    revoked = Stopper()
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(signal, "pthread_kill", lambda ident, sig: sent.append((ident, sig)))
    verdict = ConfinferError("revoked", reason=Reason.GPU_CC_OFF)
    revoked.interrupt(verdict)
    assert sent == [(threading.main_thread().ident, signal.SIGTERM)]
    with pytest.raises(ConfinferError) as err:
        revoked._handle(signal.SIGTERM, None)
    assert err.value is verdict
    assert revoked.signum is None  # not a stop request: the verdict's code applies
