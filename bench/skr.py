"""Secure Key Release latency per step, against the testbed, in one run, on this machine.

Runs the whole flow of ``confinfer unseal --skr`` up to the KEK (confinfer.skr.release_kek:
vTPM evidence, IMDS THIM, MAA, IMDS token, Key Vault release and its JWS verification, TPM
decrypt, AES-KWP unwrap) ``--repeat`` times after one unmeasured warm-up run, and prints the
median of each step and of the total. Baseline, measured in the same run against the same
vault: a plain Key Vault ``unwrapKey`` of a DEK (managed-identity token plus one authenticated
call), what an unattested VM would do instead; the total is reported as a ratio to it.

  .venv/bin/python bench/skr.py [--testbed-dir D] [--repeat 5] [--algorithm ALG] [--json PATH]

Without ``--testbed-dir`` it starts a testbed in a fresh directory (``python -m testbed up``)
and brings it down at the end, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confinfer import config, skr
from confinfer.config import SKR_ALGORITHMS, Config
from confinfer.errors import ConfinferError
from confinfer.tpm import Vtpm
from loader.keywrap import KeyVaultUnwrapper, KeyVaultWrapper, new_dek, zero
from testbed.env import ENV_FILE, read_env_file

ROWS = (
    ("tpm", "vTPM: HCL report, AK, quote, ephemeral key + certify, MAA answer decrypt"),
    ("imds-thim", "IMDS THIM: VCEK chain"),
    ("maa", "MAA: attest round trip, token decrypt + JWKS verify"),
    ("imds-token", "IMDS: managed-identity token for Key Vault"),
    ("keyvault-release", "Key Vault: release + JWS verification"),
    ("tpm-decrypt", "vTPM: RSA-OAEP decrypt of the transfer key"),
    ("unwrap", "AES-KWP unwrap + PKCS#8 parse of the KEK"),
    ("total", "total (release_kek)"),
)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@contextmanager
def testbed(directory: Path | None) -> Iterator[Path]:
    """The testbed directory: the given one, or a fresh testbed brought down afterwards."""
    if directory is not None:
        if not (directory / ENV_FILE).is_file():
            raise SystemExit(f"bench: {directory / ENV_FILE} does not exist (is it a testbed?)")
        yield directory
        return
    work = Path(tempfile.mkdtemp(prefix="confinfer-bench-skr-"))
    cli = [sys.executable, "-m", "testbed"]
    try:
        up = subprocess.run([*cli, "up", "--dir", str(work)], capture_output=True, text=True,
                            check=False, timeout=120)
        if up.returncode != 0:
            raise SystemExit(f"bench: testbed up failed: {up.stderr.strip()}")
        log(up.stdout.strip())
        yield work
    finally:
        subprocess.run([*cli, "down", "--dir", str(work)], capture_output=True, check=False,
                       timeout=120)
        shutil.rmtree(work, ignore_errors=True)


def load_config(directory: Path) -> Config:
    env = read_env_file(directory / ENV_FILE)
    # The managed-identity credential reads its IMDS address from the process environment.
    os.environ.update(env)
    with tempfile.TemporaryDirectory() as empty:
        return config.load(Path(empty), environ=env)


def one_release(cfg: Config, algorithm: str) -> dict[str, float]:
    timings = skr.Timings()
    assert cfg.key_id
    with Vtpm(cfg.tpm_tcti) as vtpm:
        skr.release_kek(cfg, cfg.key_id, vtpm, algorithm=algorithm, timings=timings).close()
    return timings.totals()


def one_unwrap(cfg: Config, wrapped: bytes) -> float:
    assert cfg.key_id
    start = time.perf_counter()
    dek = KeyVaultUnwrapper(cfg.key_id, cfg).unwrap(wrapped, cfg.key_id)
    spent = time.perf_counter() - start
    zero(dek)
    return spent


def bench(cfg: Config, repeat: int, algorithm: str) -> dict[str, Any]:
    assert cfg.key_id
    log(f"warm-up, then {repeat} measured runs of release_kek ({algorithm})")
    one_release(cfg, algorithm)
    runs = [one_release(cfg, algorithm) for _ in range(repeat)]

    dek = new_dek()
    wrapped = KeyVaultWrapper(cfg.key_id, cfg).wrap(dek).wrapped
    zero(dek)
    log(f"baseline: warm-up, then {repeat} Key Vault unwrapKey calls")
    one_unwrap(cfg, wrapped)
    baseline = [one_unwrap(cfg, wrapped) for _ in range(repeat)]

    steps = {
        name: sorted(run.get(name, 0.0) for run in runs) for name, _ in ROWS
    }
    return {
        "algorithm": algorithm,
        "repeat": repeat,
        "key_id": cfg.key_id,
        "steps_s": steps,
        "median_s": {name: statistics.median(values) for name, values in steps.items()},
        "baseline_unwrapkey_s": sorted(baseline),
        "baseline_median_s": statistics.median(baseline),
    }


def report(result: dict[str, Any]) -> str:
    median = result["median_s"]
    total = median["total"]
    lines = [
        f"Secure Key Release, {result['algorithm']}, median of {result['repeat']} runs",
        f"{'step':<17} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'share':>6}  what",
    ]
    for name, what in ROWS:
        values = result["steps_s"][name]
        share = f"{100 * median[name] / total:5.1f}%" if total else "-"
        lines.append(
            f"{name:<17} {1000 * median[name]:>10.1f} {1000 * values[0]:>8.1f} "
            f"{1000 * values[-1]:>8.1f} {share:>6}  {what}"
        )
    base = result["baseline_median_s"]
    lines.append(
        f"{'baseline':<17} {1000 * base:>10.1f} {'':>8} {'':>8} {'':>6}  Key Vault unwrapKey "
        "(token + one call, no attestation)"
    )
    lines.append(f"total / baseline: {total / base:.1f} x" if base else "")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed-dir", type=Path,
                        help="use this running testbed instead of starting one")
    parser.add_argument("--repeat", type=int, default=5, help="measured runs (default 5)")
    parser.add_argument("--algorithm", choices=SKR_ALGORITHMS, default="RSA_AES_KEY_WRAP_256")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be positive")
    try:
        with testbed(args.testbed_dir) as directory:
            result = bench(load_config(directory), args.repeat, args.algorithm)
    except ConfinferError as exc:
        log(f"failed: {exc.one_line()}")
        return 1
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
