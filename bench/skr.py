"""Secure Key Release latency per step, against the testbed, in one run, on this machine.

Runs the key path of ``confinfer unseal --skr`` (loader.keywrap.SkrUnwrapper: attest, release
the KEK with confinfer.release.release_kek, unwrap the DEK with it: vTPM evidence, IMDS THIM,
MAA, IMDS token, Key Vault release and its JWS verification, TPM decrypt, AES-KWP unwrap, the
DEK's RSA-OAEP unwrap) ``--repeat`` times after one unmeasured warm-up run, and prints the
median of each step (confinfer.log.recording) and of the total. Baseline, measured in the same
run against the same vault and the same wrapped DEK: a plain Key Vault ``unwrapKey``
(loader.keywrap.KeyVaultUnwrapper: a credential's token plus one authenticated call), what an
unattested VM would do instead; the total is reported as a ratio to it. Every run starts with
the in-process caches (IMDS tokens, JWKS) empty, as each ``confinfer unseal`` process does.

  .venv/bin/python bench/skr.py [--testbed-dir D] [--repeat 5] [--algorithm ALG] [--json PATH]

Without ``--testbed-dir`` it starts a testbed in a fresh directory (``python -m testbed up``)
and brings it down at the end, also on failure.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from confinfer import config, imds, log, release, token
from confinfer.config import SKR_ALGORITHMS, Config
from confinfer.errors import ConfinferError
from loader.keywrap import KeyVaultUnwrapper, KeyVaultWrapper, SkrUnwrapper, new_dek, zero
from testbed.env import ENV_FILE, read_env_file

WHAT = {
    "tpm": "vTPM: HCL report, AK, quote, ephemeral key + certify, MAA answer decrypt",
    "imds-thim": "IMDS THIM: VCEK chain",
    "maa": "MAA: attest round trip, token decrypt + JWKS verify",
    "imds-token": "IMDS: managed-identity token for Key Vault",
    "keyvault-release": "Key Vault: release + JWS verification",
    "tpm-decrypt": "vTPM: RSA-OAEP decrypt of the transfer key",
    "unwrap": "AES-KWP unwrap + PKCS#8 parse of the KEK",
    "dek-unwrap": "RSA-OAEP-256 unwrap of the DEK with the released KEK",
}
# release_kek's steps in flow order, then SkrUnwrapper's own; "other" is time outside any step
# (opening the vTPM, key choice, checks between steps).
STEPS = (*release.STEPS, "dek-unwrap")
TOTAL = "total"


def log_line(message: str) -> None:
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
        up = subprocess.run(
            [*cli, "up", "--dir", str(work)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if up.returncode != 0:
            raise SystemExit(f"bench: testbed up failed: {up.stderr.strip()}")
        log_line(up.stdout.strip())
        yield work
    finally:
        subprocess.run(
            [*cli, "down", "--dir", str(work)], capture_output=True, check=False, timeout=120
        )
        shutil.rmtree(work, ignore_errors=True)


def load_config(directory: Path) -> Config:
    env = read_env_file(directory / ENV_FILE)
    # The managed-identity credential reads its IMDS address from the process environment.
    os.environ.update(env)
    with tempfile.TemporaryDirectory() as empty:
        return config.load(Path(empty), environ=env)


def fresh_process() -> None:
    """Empty the in-process caches a new ``confinfer unseal`` process starts without."""
    imds.forget_tokens()
    token.CACHE.clear()


def one_release(cfg: Config, wrapped: bytes, key_id: str) -> dict[str, float]:
    """One SKR unwrap of ``wrapped``: seconds per step, plus ``other`` and ``total``."""
    fresh_process()
    with log.recording() as steps:
        start = time.perf_counter()
        dek = SkrUnwrapper(cfg).unwrap(wrapped, key_id)
        spent = time.perf_counter() - start
    zero(dek)
    totals = steps.totals()
    totals["other"] = max(0.0, spent - sum(totals.values()))
    totals[TOTAL] = spent
    return totals


def one_unwrap(cfg: Config, wrapped: bytes, key_id: str) -> float:
    fresh_process()
    start = time.perf_counter()
    dek = KeyVaultUnwrapper(cfg).unwrap(wrapped, key_id)
    spent = time.perf_counter() - start
    zero(dek)
    return spent


def rows(runs: Sequence[dict[str, float]]) -> list[str]:
    """The steps to print: the known ones in flow order, then any other a run recorded."""
    seen = [name for run in runs for name in run]
    extra = [n for n in dict.fromkeys(seen) if n not in STEPS and n not in ("other", TOTAL)]
    return [*STEPS, *extra, "other", TOTAL]


def bench(cfg: Config, repeat: int, algorithm: str) -> dict[str, Any]:
    assert cfg.key_id
    cfg = dataclasses.replace(cfg, skr_algorithm=algorithm)
    dek = new_dek()
    wrapped = KeyVaultWrapper(cfg).wrap(dek)
    zero(dek)

    log_line(f"warm-up, then {repeat} measured SKR unwraps ({algorithm})")
    one_release(cfg, wrapped.wrapped, wrapped.key_id)
    runs = [one_release(cfg, wrapped.wrapped, wrapped.key_id) for _ in range(repeat)]

    log_line(f"baseline: warm-up, then {repeat} Key Vault unwrapKey calls")
    one_unwrap(cfg, wrapped.wrapped, wrapped.key_id)
    baseline = [one_unwrap(cfg, wrapped.wrapped, wrapped.key_id) for _ in range(repeat)]

    names = rows(runs)
    steps = {name: sorted(run.get(name, 0.0) for run in runs) for name in names}
    return {
        "algorithm": algorithm,
        "repeat": repeat,
        "key_id": wrapped.key_id,
        "rows": names,
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
    for name in result["rows"]:
        values = result["steps_s"][name]
        what = WHAT.get(name, "")
        if name == "other":
            what = "outside the steps: vTPM open, key choice, checks"
        elif name == TOTAL:
            what = "total (SkrUnwrapper.unwrap: release_kek + dek-unwrap)"
        share = f"{100 * median[name] / total:5.1f}%" if total else "-"
        lines.append(
            f"{name:<17} {1000 * median[name]:>10.1f} {1000 * values[0]:>8.1f} "
            f"{1000 * values[-1]:>8.1f} {share:>6}  {what}"
        )
    base = result["baseline_median_s"]
    lines.append(
        f"{'baseline':<17} {1000 * base:>10.1f} {1000 * result['baseline_unwrapkey_s'][0]:>8.1f} "
        f"{1000 * result['baseline_unwrapkey_s'][-1]:>8.1f} {'':>6}  Key Vault unwrapKey "
        "(token + one call, no attestation)"
    )
    lines.append(f"total / baseline: {total / base:.1f} x" if base else "")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--testbed-dir", type=Path, help="use this running testbed instead of starting one"
    )
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
        log_line(f"failed: {exc.one_line()}")
        return 1
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
