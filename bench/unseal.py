"""Unseal and seal throughput against tar, in one run, on this machine.

Builds a synthetic model (safetensors-sized shards of random-ish bytes plus small JSON files),
seals it with ``confinfer seal`` under a freshly generated RSA KEK, builds the seed tutorial's
layout of the same model, mounts a tmpfs for outputs, and measures (median of ``--repeat`` runs,
caches warm, each after one unmeasured warm-up run):

  a  tar -x of the plaintext tar into the tmpfs                      (baseline of b and c)
  b  confinfer unseal of the sealed package into the tmpfs           target <= 1.25 x a
  c  confinfer unseal of the tutorial layout into the tmpfs          target <= 2 x a
  d  confinfer seal of the model directory, next to the inputs        target <= 1.5 x tar -cf
  d0 tar -cf of the same directory, to the same file system          (baseline of d)

Peak RSS is ``ru_maxrss`` from ``os.wait4`` on each command: Linux reports there the maximum of
the process and of every descendant it reaped, so worker processes count; threads share it.
Unseal peak RSS must stay <= 64 MiB. Run as root (it mounts a tmpfs):

  .venv/bin/python bench/unseal.py [--size-gib 2] [--workdir DIR] [--repeat 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

MiB = 1 << 20
GiB = 1 << 30
MODEL_NAME = "bench-model"
SHARD_MAX = 512 * MiB
BLOCK = 4 * MiB

# Largest acceptable ratio of each measurement's median to its baseline's.
TARGETS = {"b": 1.25, "c": 2.0, "d": 1.5}
UNSEAL_RSS_MIB = 64.0


@dataclass
class Measurement:
    key: str
    label: str
    baseline: str | None
    walls_s: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.walls_s)

    @property
    def min_s(self) -> float:
        return min(self.walls_s)

    @property
    def peak_rss_mib(self) -> float:
        return max(self.rss_kib) / 1024


class CommandFailed(Exception):
    pass


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# -- inputs -----------------------------------------------------------------------------------


def write_model(model: Path, total: int) -> None:
    """Shards of random-ish bytes (a random block, varied per MiB) and tokenizer/config JSON."""
    model.mkdir(parents=True)
    base = os.urandom(BLOCK + MiB)
    shards = max(4, -(-total // SHARD_MAX))
    per_shard = total // shards
    counter = 0
    for i in range(shards):
        path = model / f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            left = per_shard
            while left:
                n = min(MiB, left)
                offset = (counter * 7919) % BLOCK
                os.write(fd, counter.to_bytes(8, "little") + base[offset : offset + n - 8])
                counter += 1
                left -= n
        finally:
            os.close(fd)
    vocab = {f"tok{i:06d}": i for i in range(60_000)}
    (model / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    (model / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096})
    )
    (model / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    (model / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))


def write_kek(work: Path) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    private, public = work / "kek.pem", work / "kek.pub.pem"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def write_tutorial_package(tar: Path, pkg: Path, public_pem: Path) -> None:
    """What the tutorial's ``encrypt_model.py`` writes, done here the way that script does it.

    This stands in for the owner's third-party script, so it deliberately does not use the
    project's own AEAD module: the reader is measured against an independent writer.
    """
    pkg.mkdir()
    dek = os.urandom(32)
    nonce = os.urandom(12)
    encryptor = Cipher(algorithms.AES(dek), modes.GCM(nonce)).encryptor()
    buf = bytearray(8 * MiB)
    out = bytearray(8 * MiB + 16)
    with tar.open("rb", buffering=0) as fin, (pkg / "model_archive.tar.enc").open("wb") as fout:
        fout.write(nonce)
        while n := fin.readinto(buf):
            m = encryptor.update_into(memoryview(buf)[:n], out)
            fout.write(memoryview(out)[:m])
        fout.write(encryptor.finalize())
        fout.write(encryptor.tag)
    key = serialization.load_pem_public_key(public_pem.read_bytes())
    assert isinstance(key, rsa.RSAPublicKey)
    oaep = padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
    )
    (pkg / "wrapped_model_dek.bin").write_bytes(key.encrypt(dek, oaep))


def warm(paths: Sequence[Path]) -> None:
    """Read every input once so that each measured run finds it in the page cache."""
    buf = bytearray(BLOCK)
    for top in paths:
        for path in [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()):
            with path.open("rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


# -- tmpfs ------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: int) -> Iterator[Path]:
    mountpoint.mkdir()
    run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mountpoint)])
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


def filesystem_type(path: Path) -> str:
    """The type of the file system ``path`` lies on, from /proc/self/mounts."""
    target = path.resolve()
    best, kind = "", "unknown"
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) < 3:
                continue
            point = fields[1].replace("\\040", " ")
            inside = target == Path(point) or Path(point) in target.parents
            if inside and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


def run(argv: Sequence[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}")


# -- measuring --------------------------------------------------------------------------------


# Runs one command and reports its exit code, wall time and ru_maxrss (from os.wait4, which on
# Linux covers the command and every descendant it reaped). A fresh, small interpreter starts the
# command: a child forked straight from this process would inherit its high-water mark.
_LAUNCHER = """
import os, sys, time
argv = sys.argv[1:]
null = os.open(os.devnull, os.O_WRONLY)
start = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, null, 1)])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
print(os.waitstatus_to_exitcode(status), wall, usage.ru_maxrss)
"""


def timed(argv: Sequence[str], scratch: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB, over the process tree) of one command."""
    errfile = scratch / "stderr.txt"
    with errfile.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-I", "-c", _LAUNCHER, *argv],
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    try:
        code_text, wall_text, rss_text = out.decode().split()
        code, wall, rss = int(code_text), float(wall_text), int(rss_text)
    except ValueError:
        code, wall, rss = proc.returncode or -1, 0.0, 0
    if code != 0:
        raise CommandFailed(
            f"{' '.join(argv)} exited {code}: {errfile.read_text(errors='replace').strip()[-2000:]}"
        )
    return wall, rss


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


Run = tuple[Measurement, Sequence[str], Path]  # what, the command, the output it makes


def measure(runs: Sequence[Run], repeat: int, scratch: Path) -> None:
    """One warm-up round, then ``repeat`` measured rounds, each running every command once.

    Interleaving the commands round by round means a change in the machine's load during the
    benchmark affects a command and its baseline alike, rather than whichever ran later.
    ``output`` is removed after each run.
    """
    log("measuring, interleaved: " + ", ".join(f"{m.key}: {m.label}" for m, _, _ in runs))
    for i in range(repeat + 1):
        for m, argv, output in runs:
            remove(output)
            os.sync()  # do not let one run's writeback land in the next run's time
            wall, rss = timed(argv, scratch)
            if i:
                m.walls_s.append(wall)
                m.rss_kib.append(rss)
            remove(output)


def model_root(tree: Path) -> Path:
    """The directory holding config.json in an extracted tree."""
    for candidate in (tree, *sorted(p for p in tree.iterdir() if p.is_dir())):
        if (candidate / "config.json").is_file():
            return candidate
    raise CommandFailed(f"no config.json under {tree}")


def digest(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with path.open("rb", buffering=0) as f:
            buf = bytearray(BLOCK)
            while n := f.readinto(buf):
                h.update(memoryview(buf)[:n])
        out[path.relative_to(root).as_posix()] = h.hexdigest()
    return out


# -- the run ----------------------------------------------------------------------------------


def bench(args: argparse.Namespace, work: Path) -> dict[str, object]:
    confinfer = str(Path(sys.executable).with_name("confinfer"))
    total = int(args.size_gib * GiB)
    src = work / "src"
    model = src / MODEL_NAME
    log(f"writing a {total / GiB:.2f} GiB model under {model}")
    write_model(model, total)
    model_bytes = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    private_pem, public_pem = write_kek(work)

    plain_tar = work / "model.tar"
    log("plaintext tar (shutil.make_archive, as the tutorial does)")
    shutil.make_archive(str(plain_tar.with_suffix("")), "tar", root_dir=src, base_dir=MODEL_NAME)
    log("tutorial layout")
    tutorial_pkg = work / "tutorial-pkg"
    write_tutorial_package(plain_tar, tutorial_pkg, public_pem)
    sealed_pkg = work / "sealed-pkg"
    log("sealed package (confinfer seal)")
    timed([confinfer, "seal", str(model), "--out", str(sealed_pkg),
           "--kek-public-key", str(public_pem)], work)  # fmt: skip
    warm([plain_tar, tutorial_pkg, sealed_pkg, model])

    tmpfs_size = model_bytes + model_bytes // 8 + 64 * MiB
    results: dict[str, Measurement] = {}
    with tmpfs(work / "tmpfs", tmpfs_size) as mnt:
        out = mnt / "out"
        verify: dict[str, dict[str, str]] = {}

        def check_output(key: str, argv: list[str]) -> None:
            remove(out)
            timed(argv, work)
            verify[key] = digest(model_root(out))
            remove(out)

        unseal = [confinfer, "unseal", "--dest", str(out), "--kek-private-key", str(private_pem)]
        # tar -x needs its target directory; the unseals create theirs.
        tar_x = ["sh", "-c", 'mkdir "$1" && exec tar -xf "$2" -C "$1"', "sh", str(out),
                 str(plain_tar)]  # fmt: skip
        cmds = {
            "a": (tar_x, "tar -x (plaintext tar)", None),
            "b": ([*unseal, str(sealed_pkg)], "confinfer unseal (sealed)", "a"),
            "c": ([*unseal, str(tutorial_pkg)], "confinfer unseal (tutorial layout)", "a"),
        }
        for key, (argv, _label, _base) in cmds.items():
            check_output(key, argv)
        if not verify["a"] == verify["b"] == verify["c"]:
            raise CommandFailed("unsealed trees differ from the plaintext tar's")
        log(f"outputs verified ({len(verify['a'])} files identical)")
        for key, (_argv, label, base) in cmds.items():
            results[key] = Measurement(key, label, base)
        measure([(results[k], argv, out) for k, (argv, _, _) in cmds.items()], args.repeat, work)

    seal_out = work / "seal-out"
    tar_out = work / "seal-baseline.tar"
    results["d0"] = Measurement("d0", "tar -cf (model dir)", None)
    results["d"] = Measurement("d", "confinfer seal", "d0")
    measure(
        [
            (results["d0"], ["tar", "-cf", str(tar_out), "-C", str(src), MODEL_NAME], tar_out),
            (results["d"], [confinfer, "seal", str(model), "--out", str(seal_out),
                            "--kek-public-key", str(public_pem)], seal_out),
        ],
        args.repeat, work,
    )  # fmt: skip
    _, floor_kib = timed(["true"], work)
    return report(results, args, model_bytes, floor_kib)


def report(
    results: dict[str, Measurement], args: argparse.Namespace, model_bytes: int, floor_kib: int
) -> dict[str, object]:
    rows: list[dict[str, object]] = []
    lines = [
        f"{'':4}{'measurement':36}{'median s':>9}{'GiB/s':>7}{'ratio':>7}{'min ratio':>10}"
        f"{'peak RSS':>10}  verdict",
    ]
    lines.append("-" * len(lines[0]))
    for key in ("a", "b", "c", "d0", "d"):
        m = results[key]
        ratio = m.median_s / results[m.baseline].median_s if m.baseline else None
        # Best run against best run: noise only ever adds time, so this shows the cost of
        # the work itself. The verdict stays on the (stricter, noisier) median ratio.
        min_ratio = m.min_s / results[m.baseline].min_s if m.baseline else None
        checks: dict[str, bool] = {}
        if key in TARGETS and ratio is not None:
            checks[f"ratio <= {TARGETS[key]:g}"] = ratio <= TARGETS[key]
        if key in ("b", "c"):
            checks[f"RSS <= {UNSEAL_RSS_MIB:g} MiB"] = m.peak_rss_mib <= UNSEAL_RSS_MIB
        verdict = ("PASS" if all(checks.values()) else "FAIL") if checks else "baseline"
        rows.append(
            {
                **asdict(m),
                "median_s": m.median_s,
                "gib_per_s": model_bytes / GiB / m.median_s,
                "ratio": ratio,
                "min_s": m.min_s,
                "min_ratio": min_ratio,
                "peak_rss_mib": m.peak_rss_mib,
                "checks": checks,
                "verdict": verdict,
            }
        )
        failed = [name for name, ok in checks.items() if not ok]
        why = f"  (missed: {', '.join(failed)})" if failed else ""
        lines.append(
            f"{key:4}{m.label:36}{m.median_s:9.3f}{model_bytes / GiB / m.median_s:7.2f}"
            f"{'-' if ratio is None else f'{ratio:.2f}':>7}"
            f"{'-' if min_ratio is None else f'{min_ratio:.2f}':>10}{m.peak_rss_mib:7.1f} MiB"
            f"  {verdict}{why}"
        )
    overall = "FAIL" if any(row["verdict"] == "FAIL" for row in rows) else "PASS"
    print("\n".join(lines))
    print(
        f"\noverall: {overall}  ({model_bytes / GiB:.2f} GiB model, median of {args.repeat}; "
        f"RSS cannot read below the launcher's {floor_kib / 1024:.1f} MiB)"
    )
    return {
        "model_bytes": model_bytes,
        "rss_floor_mib": floor_kib / 1024,
        "repeat": args.repeat,
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "targets": {
            **{f"{k}_ratio": v for k, v in TARGETS.items()},
            "unseal_rss_mib": UNSEAL_RSS_MIB,
        },
        "results": rows,
        "overall": overall,
    }


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0, help="model size (default 2)")
    parser.add_argument(
        "--workdir", type=Path, help="where to put generated data (default: a new dir in /var/tmp)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="measured runs each (default 5)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    args = parser.parse_args(argv)
    if args.size_gib <= 0 or args.repeat < 1:
        parser.error("--size-gib and --repeat must be positive")
    if os.geteuid() != 0:
        parser.error("run as root: the benchmark mounts a tmpfs for the outputs")
    # /var/tmp rather than /tmp: inputs must sit on a disk, and /tmp is often a tmpfs.
    parent = args.workdir or Path("/var/tmp")  # noqa: S108 - a private mkdtemp below it
    parent.mkdir(parents=True, exist_ok=True)
    if filesystem_type(parent) in ("tmpfs", "ramfs"):
        log(
            f"warning: {parent} is in memory; the inputs (about 4 x the model) will take RAM "
            "and the page-cache warm-up means nothing (give --workdir on a disk)"
        )
    work = Path(tempfile.mkdtemp(prefix="confinfer-bench-", dir=parent))
    signal.signal(signal.SIGTERM, _stop)
    try:
        result = bench(args, work)
    except CommandFailed as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["overall"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
