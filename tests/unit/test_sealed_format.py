"""The sealed format: what seal writes is the spec (read back independently), round trips,
geometry, strict header parsing, key wrapping and the AEAD module."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confinfer.errors import (
    ConfinferError,
    FormatError,
    IntegrityError,
    KeyUnwrapError,
    Reason,
    UsageError,
)
from loader import format as fmt
from loader.aead import ChunkCipher, GcmStreamDecryptor, chunk_nonce, derive_chunk_key
from loader.dest import Destination
from loader.keywrap import (
    PemUnwrapper,
    PemWrapper,
    fingerprint,
    key_ids_match,
)
from loader.progress import Progress, human_bytes
from loader.seal import scan, seal_model, write_package
from loader.unseal import inspect_package, unseal_package
from loader.workers import run_chunks
from tests import sealedref

pytestmark = pytest.mark.unit


def make_model(root: Path, files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def seal(
    model: Path, pkg: Path, *, chunk_size: int = 64, workers: int | None = None, kek_n: int = 0
) -> fmt.Header:
    with Destination(pkg) as out:
        return seal_model(
            model,
            out,
            PemWrapper(sealedref.kek(kek_n).public_key()),
            chunk_size=chunk_size,
            workers=workers,
        )


def unseal(
    pkg: Path,
    dest: Path,
    *,
    kek_n: int = 0,
    workers: int | None = None,
    max_bytes: int | None = None,
) -> fmt.Header:
    with Destination(dest, max_bytes=max_bytes) as d:
        return unseal_package(pkg, d, PemUnwrapper(sealedref.kek(kek_n)), workers=workers)


FILES = {
    "config.json": b'{"model": "tiny"}',
    "weights/shard-1.bin": os.urandom(200),
    "weights/shard-2.bin": os.urandom(128),
    "weights/empty": b"",
    "tokenizer/a/b/c.txt": b"x" * 63,
}


# -- the spec, read and written independently -------------------------------------------------


def test_an_independent_reader_reads_what_seal_writes(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", FILES, dirs=("empty-dir",))
    header = seal(model, tmp_path / "pkg")
    data = (tmp_path / "pkg/model.sealed").read_bytes()
    obj, files = sealedref.read(data, sealedref.kek())
    assert files == {k: FILES[k] for k in files}
    assert set(files) == set(FILES)
    assert obj == header.to_json()
    assert obj["key_id"] == sealedref.fingerprint()
    # A directory is listed after its parent; files in stream order: depth-first, a
    # directory's own files before its subdirectories', names in byte order.
    assert [d["path"] for d in obj["manifest"]["directories"]] == [
        "empty-dir",
        "tokenizer",
        "weights",
        "tokenizer/a",
        "tokenizer/a/b",
    ]
    assert [f["path"] for f in obj["manifest"]["files"]] == [
        "config.json",
        "tokenizer/a/b/c.txt",
        "weights/empty",
        "weights/shard-1.bin",
        "weights/shard-2.bin",
    ]


def test_unseal_reads_what_an_independent_writer_writes(tmp_path: Path) -> None:
    spec = sealedref.Spec(
        files={"a": os.urandom(130), "d/b": b"", "d/c": os.urandom(64)},
        directories=["d"],
        chunk_size=64,
    )
    sealedref.install(sealedref.build(spec), tmp_path / "pkg")
    unseal(tmp_path / "pkg", tmp_path / "out")
    assert sealedref.tree(tmp_path / "out") == {
        "a": ("file", 0o644, spec.files["a"]),
        "d": ("dir", 0o755, b""),
        "d/b": ("file", 0o644, b""),
        "d/c": ("file", 0o644, spec.files["d/c"]),
    }


# The package for fixed inputs. A change here is a format change: bump the version.
KAT_SHA256 = "6efaf754d72248b1cb47bb14cdd4c9a1e72aeea55a619d6f9977269f4930e1ae"


def kat_inputs(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    model = make_model(tmp_path / "model", {"a.txt": b"hello world", "d/e": b""})
    os.chmod(model / "a.txt", 0o644)
    os.chmod(model / "d", 0o755)  # noqa: S103 - the mode the known answer records
    os.chmod(model / "d/e", 0o600)
    return model, {
        "dek": bytearray(range(32)),
        "wrapped_dek": b"\x5a" * 256,
        "key_id": "sha256:" + "00" * 32,
        "salt": bytes(range(32, 64)),
        "created": "2026-01-01T00:00:00Z",
        "chunk_size": 4,
    }


def test_known_answer(tmp_path: Path) -> None:
    model, inputs = kat_inputs(tmp_path)
    with Destination(tmp_path / "pkg") as out:
        write_package(scan(model), out, **inputs)
    data = (tmp_path / "pkg/model.sealed").read_bytes()
    # The same bytes from the spec alone.
    spec = sealedref.Spec(
        files={"a.txt": b"hello world", "d/e": b""},
        directories=["d"],
        chunk_size=4,
        dek=bytes(range(32)),
        salt=bytes(range(32, 64)),
        modes={"d/e": 0o600},
    )
    header = spec.header()
    header["wrapped_dek"] = base64.b64encode(b"\x5a" * 256).decode()
    header["key_id"] = "sha256:" + "00" * 32
    assert data == sealedref.build(spec, header)
    assert len(data) == 12 + int.from_bytes(data[8:12], "big") + 16 + 11 + 3 * 16
    assert hashlib.sha256(data).hexdigest() == KAT_SHA256


# -- round trips -------------------------------------------------------------------------------


NAME = st.text(alphabet=st.sampled_from("abcxyz019._-é模 "), min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")
)


@st.composite
def trees(draw: st.DrawFn) -> tuple[int, dict[str, int], list[str]]:
    chunk = draw(st.sampled_from([1, 3, 16, 64]))
    dirs: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        parent = draw(st.sampled_from(["", *dirs]))
        dirs.append(f"{parent}/{draw(NAME)}" if parent else draw(NAME))
    sizes = st.one_of(
        st.sampled_from([0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk, 3 * chunk + 1]),
        st.integers(0, 5 * chunk),
    )
    files: dict[str, int] = {}
    for _ in range(draw(st.integers(0, 6))):
        parent = draw(st.sampled_from(["", *dirs]))
        name = draw(NAME)
        files[f"{parent}/{name}" if parent else name] = max(draw(sizes), 0)
    return chunk, files, dirs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees(), workers=st.integers(1, 3), seed=st.integers(0, 2**32))
def test_round_trip_over_generated_trees(
    tree: tuple[int, dict[str, int], list[str]], workers: int, seed: int
) -> None:
    chunk, sizes, dirs = tree
    rng = random.Random(seed)  # noqa: S311 - test content, reproducible from the seed
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        model = base / "model"
        model.mkdir()
        for d in dirs:
            try:
                (model / d).mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                pass
        for rel, size in sizes.items():
            path = model / rel
            if path.exists() or any(p.is_file() for p in path.parents):
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(size))
            path.chmod(rng.choice([0o644, 0o600, 0o755, 0o4755, 0o666]))
        header = seal(model, base / "pkg", chunk_size=chunk, workers=workers)
        assert header.chunk_count == max(1, sum(-(-f.size // chunk) for f in header.files))
        info = inspect_package(base / "pkg")
        assert info["structure"]["file_bytes"] == info["structure"]["package_bytes"]
        unseal(base / "pkg", base / "out", workers=workers)
        before, after = sealedref.tree(model), sealedref.tree(base / "out")
        assert after.keys() == before.keys()
        for rel, (kind, mode, data) in before.items():
            expect = (mode & 0o755) | (0o700 if kind == "dir" else 0o400)
            assert after[rel] == (kind, expect, data)


def test_empty_model_has_one_empty_final_chunk(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", {}, dirs=("only/dirs",))
    header = seal(model, tmp_path / "pkg")
    assert header.chunk_count == 1
    data = (tmp_path / "pkg/model.sealed").read_bytes()
    assert len(data) == 12 + int.from_bytes(data[8:12], "big") + 16 + 16
    unseal(tmp_path / "pkg", tmp_path / "out")
    assert sealedref.tree(tmp_path / "out") == {
        "only": ("dir", 0o755, b""),
        "only/dirs": ("dir", 0o755, b""),
    }


def test_only_empty_files(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", {"a": b"", "b/c": b""})
    assert seal(model, tmp_path / "pkg").chunk_count == 1
    unseal(tmp_path / "pkg", tmp_path / "out")
    assert (tmp_path / "out/b/c").read_bytes() == b""


def test_default_chunk_size_and_many_chunks(tmp_path: Path) -> None:
    big = os.urandom(fmt.DEFAULT_CHUNK_SIZE * 2 + 5)
    model = make_model(tmp_path / "model", {"w.bin": big, "small": b"s"})
    with Destination(tmp_path / "pkg") as out:
        header = seal_model(model, out, PemWrapper(sealedref.kek().public_key()))
    assert header.chunk_size == fmt.DEFAULT_CHUNK_SIZE
    assert header.chunk_count == 4
    unseal(tmp_path / "pkg", tmp_path / "out", workers=2)
    assert (tmp_path / "out/w.bin").read_bytes() == big


def test_size_cap_equal_to_the_model_is_enough(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", {"a": b"12345", "b": b"678"})
    seal(model, tmp_path / "pkg")
    unseal(tmp_path / "pkg", tmp_path / "out", max_bytes=8)
    assert (tmp_path / "out/b").read_bytes() == b"678"


# -- seal input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["symlink", "fifo", "dangling"])
def test_seal_refuses_links_and_special_files(tmp_path: Path, kind: str) -> None:
    model = make_model(tmp_path / "model", {"a": b"a"})
    if kind == "symlink":
        (model / "link").symlink_to(model / "a")
    elif kind == "fifo":
        os.mkfifo(model / "sub-fifo")
    else:
        (model / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(UsageError) as info:
        seal(model, tmp_path / "pkg")
    assert info.value.reason == "unsupported-file"
    assert not (tmp_path / "pkg").exists()


def test_seal_refuses_a_missing_model_and_a_bad_chunk_size(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as info:
        seal(tmp_path / "nope", tmp_path / "pkg")
    assert info.value.reason == "model-dir"
    model = make_model(tmp_path / "model", {"a": b"a"})
    for size in (0, fmt.MAX_CHUNK_SIZE + 1):
        with pytest.raises(UsageError) as info:
            seal(model, tmp_path / "pkg", chunk_size=size)
        assert info.value.reason == "chunk-size"
    assert not (tmp_path / "pkg").exists()


def test_seal_notices_a_file_that_changes(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", {"a": b"a" * 100})
    tree = scan(model)
    (model / "a").write_bytes(b"b" * 10)
    with pytest.raises(ConfinferError) as info, Destination(tmp_path / "pkg") as out:
        write_package(
            tree,
            out,
            dek=bytearray(32),
            wrapped_dek=b"w",
            key_id="k",
            salt=bytes(32),
            created="c",
            chunk_size=16,
        )
    assert info.value.reason == "model-changed"
    assert not (tmp_path / "pkg").exists()


# -- geometry ------------------------------------------------------------------------------------


@given(sizes=st.lists(st.integers(0, 50), max_size=6), chunk=st.integers(1, 20))
def test_layout_records_tile_the_package(sizes: list[int], chunk: int) -> None:
    files = tuple(fmt.FileEntry(f"f{n}", s, 0o644) for n, s in enumerate(sizes))
    header = fmt.Header(chunk, bytes(32), "k", b"w", "c", fmt.chunk_count(files, chunk), (), files)
    layout = fmt.Layout(header, 100)
    offset, per_file = layout.data_offset, [0] * len(files)
    for ref in layout:
        assert ref.package_offset == offset
        assert ref.final == (ref.index == layout.count - 1)
        if ref.file >= 0:
            assert ref.file_offset == per_file[ref.file]
            assert ref.index in layout.chunks_of(ref.file)
            per_file[ref.file] += ref.length
            assert 0 < ref.length <= chunk
        offset += ref.length + fmt.TAG_LEN
    assert offset == layout.package_size
    assert per_file == sizes


# -- strict header parsing ------------------------------------------------------------------------


def valid_header() -> dict[str, Any]:
    return sealedref.Spec(files={"a": b"12345"}, directories=["d"], chunk_size=4).header()


def mutate(path: list[str], value: Any) -> dict[str, Any]:
    obj: Any = valid_header()
    target = obj
    for key in path[:-1]:
        target = target[int(key)] if isinstance(target, list) else target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return dict(obj)


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (["version"], 2, "unsupported-format"),
        (["version"], True, "unsupported-format"),
        (["cipher"], "AES-128-GCM", "unsupported-format"),
        (["wrap"], "RSA-OAEP", "unsupported-format"),
        (["kdf"], "none", "unsupported-format"),
        (["chunk_size"], 0, "header-invalid"),
        (["chunk_size"], fmt.MAX_CHUNK_SIZE + 1, "header-invalid"),
        (["chunk_size"], 4.0, "header-invalid"),
        (["salt"], "AAAA", "header-invalid"),
        (["salt"], "not base64!", "header-invalid"),
        (["wrapped_dek"], 7, "header-invalid"),
        (["key_id"], "", "header-invalid"),
        (["created"], None, "header-invalid"),
        (["chunk_count"], 0, "header-invalid"),
        (["extra"], 1, "header-invalid"),
        (["manifest"], KeyError, "header-invalid"),
        (["manifest", "files"], {}, "header-invalid"),
        (["manifest", "extra"], [], "header-invalid"),
        (["manifest", "files", "0", "size"], -1, "header-invalid"),
        (["manifest", "files", "0", "size"], True, "header-invalid"),
        (["manifest", "files", "0", "mode"], 0o10000, "header-invalid"),
        (["manifest", "files", "0", "path"], 5, "header-invalid"),
        (["manifest", "files", "0", "owner"], "root", "header-invalid"),
        (["manifest", "directories", "0", "mode"], KeyError, "header-invalid"),
    ],
)
def test_header_schema_is_strict(path: list[str], value: Any, reason: str) -> None:
    raw = json.dumps(mutate(path, value)).encode()
    with pytest.raises(FormatError) as info:
        fmt.parse_header(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b"\xff\xfe",
        b'{"version": 1, "version": 1}',
        b'{"version": NaN}',
        b"[" * 100000,
        b'{"version": 1' + b"0" * 5000 + b"}",
        b"\xef\xbb\xbf{}",
    ],
)
def test_header_that_is_not_strict_json_is_refused(raw: bytes) -> None:
    with pytest.raises(FormatError) as info:
        fmt.parse_header(raw)
    assert info.value.reason == "header-invalid"


def test_prefix_checks() -> None:
    with pytest.raises(FormatError) as info:
        fmt.read_prefix(b"PK\x03\x04" + bytes(8), 1000)
    assert info.value.reason == "bad-magic"
    with pytest.raises(FormatError) as info:
        fmt.read_prefix(b"CFSEALv2" + bytes(4), 1000)
    assert info.value.reason == "unsupported-format"
    with pytest.raises(FormatError) as info:
        fmt.read_prefix(fmt.MAGIC + (fmt.MAX_HEADER_LEN + 1).to_bytes(4, "big"), 1 << 30)
    assert info.value.reason == "header-invalid"
    with pytest.raises(FormatError):
        fmt.read_prefix(fmt.MAGIC + bytes(4), 1000)
    with pytest.raises(IntegrityError) as integrity:
        fmt.read_prefix(fmt.MAGIC + (100).to_bytes(4, "big"), 12 + 100 + 15)
    assert integrity.value.reason == "truncated"
    assert fmt.read_prefix(fmt.MAGIC + (100).to_bytes(4, "big"), 12 + 100 + 16) == 100


def test_inspect_describes_without_a_key(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", FILES)
    header = seal(model, tmp_path / "pkg")
    info = inspect_package(tmp_path / "pkg")
    assert info["header"] == header.to_json()
    size = (tmp_path / "pkg/model.sealed").stat().st_size
    assert info["structure"]["file_bytes"] == info["structure"]["package_bytes"] == size
    assert info["structure"]["chunks"] == header.chunk_count
    assert info["structure"]["plaintext_bytes"] == sum(len(v) for v in FILES.values())


# -- key wrapping --------------------------------------------------------------------------------


def test_pem_wrap_round_trip_and_key_ids(tmp_path: Path) -> None:
    private, public = sealedref.write_pem(tmp_path)
    wrapper = PemWrapper.from_file(public)
    unwrapper = PemUnwrapper.from_file(private)
    dek = bytearray(os.urandom(32))
    wrapped = wrapper.wrap(dek)
    assert wrapped.key_id == unwrapper.key_id == sealedref.fingerprint()
    assert unwrapper.unwrap(wrapped.wrapped, wrapped.key_id) == dek
    assert unwrapper.unwrap(wrapped.wrapped, None) == dek
    # A certificate for the key gives the same id.
    assert fingerprint(sealedref.kek().public_key()) == wrapped.key_id


def test_pem_unwrap_refuses_other_keys_and_damage(tmp_path: Path) -> None:
    unwrapper = PemUnwrapper(sealedref.kek(0))
    other = PemWrapper(sealedref.kek(1).public_key()).wrap(bytearray(32))
    with pytest.raises(KeyUnwrapError) as info:
        unwrapper.unwrap(other.wrapped, other.key_id)
    assert info.value.reason == "key-mismatch"
    with pytest.raises(KeyUnwrapError) as info:
        unwrapper.unwrap(other.wrapped, "https://vault.example/keys/k/1")
    assert info.value.reason == "key-unwrap"
    short = PemWrapper(sealedref.kek(0).public_key())
    blob = short.public_key.encrypt(b"too short", sealedref.OAEP)
    with pytest.raises(KeyUnwrapError) as info:
        unwrapper.unwrap(blob, None)
    assert info.value.reason == "dek-length"


def test_pem_files_are_checked(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    (tmp_path / "small.pem").write_bytes(
        small.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (tmp_path / "locked.pem").write_bytes(
        sealedref.kek().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    for path, loader in [
        (tmp_path / "junk.pem", PemWrapper.from_file),
        (tmp_path / "junk.pem", PemUnwrapper.from_file),
        (tmp_path / "small.pem", PemWrapper.from_file),
        (tmp_path / "locked.pem", PemUnwrapper.from_file),
        (tmp_path / "missing.pem", PemWrapper.from_file),
    ]:
        with pytest.raises(UsageError) as info:
            loader(path)
        assert info.value.reason == "key-file"


def test_key_id_matching() -> None:
    kid = "https://vault.example.net/keys/model-kek"
    assert key_ids_match(kid, kid + "/0123abcd")
    assert key_ids_match(kid + "/0123abcd", kid + "/0123abcd")
    assert not key_ids_match(kid + "/0123abcd", kid + "/ffff")
    assert not key_ids_match(kid, "https://vault.example.net/keys/other/1")
    assert not key_ids_match(kid, sealedref.fingerprint())
    assert key_ids_match(sealedref.fingerprint(), sealedref.fingerprint())


# -- the AEAD module -----------------------------------------------------------------------------


def test_chunk_cipher_matches_one_shot_gcm() -> None:
    dek, salt, aad = os.urandom(32), os.urandom(32), os.urandom(32)
    key = derive_chunk_key(dek, salt)
    assert bytes(key) == sealedref.chunk_key(dek, salt)
    cipher = ChunkCipher(key, aad)
    plain = os.urandom(100)
    out = memoryview(bytearray(100 + 15))
    tag = cipher.seal_into(7, True, plain, out)
    assert bytes(out[:100]) + tag == AESGCM(bytes(key)).encrypt(
        sealedref.nonce(7, True), plain, aad
    )
    back = memoryview(bytearray(115))
    assert cipher.open_into(7, True, out[:100], tag, back) == 100
    assert bytes(back[:100]) == plain
    for index, final in ((7, False), (8, True)):
        with pytest.raises(IntegrityError) as info:
            cipher.open_into(index, final, out[:100], tag, back)
        assert info.value.reason == "chunk-integrity"
    assert chunk_nonce(1, False) == bytes(7) + b"\x01" + bytes(4)


def test_gcm_stream_decryptor_in_pieces() -> None:
    key, nonce = os.urandom(32), os.urandom(12)
    plain = os.urandom(10000)
    sealed = AESGCM(key).encrypt(nonce, plain, None)
    body, tag = sealed[:-16], sealed[-16:]
    dec = GcmStreamDecryptor(key, nonce)
    out, buf = bytearray(), bytearray(1000 + 15)
    for start in range(0, len(body), 999):
        n = dec.update_into(body[start : start + 999], buf)
        out += buf[:n]
    dec.finalize(tag)
    assert bytes(out) == plain
    bad = GcmStreamDecryptor(key, nonce)
    bad.update_into(body, bytearray(len(body) + 15))
    with pytest.raises(IntegrityError) as info:
        bad.finalize(bytes(16))
    assert info.value.reason == "integrity"
    with pytest.raises(IntegrityError):
        GcmStreamDecryptor(key, nonce).finalize(b"short")


# -- workers and progress -----------------------------------------------------------------------


def test_first_worker_failure_stops_the_rest() -> None:
    done: list[int] = []

    def work(index: int, inbuf: memoryview, outbuf: memoryview) -> None:
        if index == 3:
            raise IntegrityError("bad", reason=Reason.CHUNK_INTEGRITY)
        done.append(index)

    with pytest.raises(IntegrityError):
        run_chunks(10_000, work, buffer_size=16, workers=2)
    assert len(done) < 10_000


def test_progress_draws_only_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    with Progress("unseal", stream=tty, interval_s=0) as progress:
        progress.set_total(4 << 20)
        progress.advance(1 << 20)
        progress.advance(1 << 20)
    text = tty.getvalue()
    assert "unseal" in text and "50.0%" in text and "100.0%" not in text
    assert "2.0 MiB / 4.0 MiB" in text and "ETA" in text and text.endswith("\n")
    pipe = io.StringIO()
    with Progress("seal", stream=pipe, interval_s=0) as quiet:
        quiet.advance(10)
    assert pipe.getvalue() == ""
    assert human_bytes(512) == "512 B" and human_bytes(3 << 30) == "3.0 GiB"


def test_modes_in_the_package_are_sanitised(tmp_path: Path) -> None:
    model = make_model(tmp_path / "model", {"run": b"#!", "d/x": b"x"})
    (model / "run").chmod(0o4777)
    (model / "d").chmod(0o3777)
    header = seal(model, tmp_path / "pkg")
    modes = {d.path: d.mode for d in header.directories}
    modes.update({f.path: f.mode for f in header.files})
    assert modes == {"run": 0o755, "d": 0o755, "d/x": 0o644}
    unseal(tmp_path / "pkg", tmp_path / "out")
    assert stat.S_IMODE((tmp_path / "out/run").stat().st_mode) == 0o755
