"""attestd's socket throughput, its revocation latency and its idle cost, in one run.

  .venv/bin/python -m bench.daemon [--testbed-dir D] [--clients 64] [--requests 20000]
                                    [--rounds 3] [--fast-check-s 1.0] [--flips 5]
                                    [--idle-s 60] [--json PATH]

1. ``/v1/health`` under load: ``--clients`` concurrent keep-alive connections over the Unix
   socket (aiohttp, in a separate load process) send ``--requests`` requests; throughput and
   p50/p99 latency. Baseline, same run, same load process, alternated round by round: a minimal
   aiohttp Unix-socket handler (``UnixSite``) that answers the same health JSON from memory.
   Target: attestd's throughput >= 0.7 x the baseline's.
2. Revocation latency: the fake GPU's CC mode flipped off (the state file the fake NVML reads),
   timed to the ``revoked`` event on ``/v1/events``; ``--flips`` times, CC back on and
   ``healthy`` again between flips. Target: every flip within ``--fast-check-s`` + 0.5 s.
3. Idle: attestd's RSS and CPU share over ``--idle-s`` seconds while healthy (reported).

Without ``--testbed-dir`` it starts a testbed in a fresh directory and brings it down at the
end. attestd runs with its production intervals except the fast checks (``--fast-check-s``).
The exit status is 0 when both targets pass.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.skr import log_line, testbed
from confinfer.attestd_api import Client, State
from testbed.env import ENV_FILE, read_env_file
from testbed.gpu import apply_action

THROUGHPUT_TARGET = 0.7
LATENCY_SLACK_S = 0.5


# --- the load process and the baseline server (this file, run again) ------------------------


async def _load(socket_path: str, clients: int, requests: int) -> dict[str, float]:
    import aiohttp

    latencies: list[float] = []
    remaining = requests
    connector = aiohttp.UnixConnector(path=socket_path, limit=clients)

    warmed = 0
    go = asyncio.Event()

    async def get(session: aiohttp.ClientSession) -> None:
        async with session.get("http://attestd/v1/health") as response:
            await response.read()
            if response.status not in (200, 503):
                raise RuntimeError(f"HTTP {response.status}")

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal remaining, warmed
        await get(session)  # its own connection, opened before the clock starts
        warmed += 1
        if warmed == clients:
            go.set()
        await go.wait()
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await get(session)
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(clients)]
        await go.wait()
        started = time.perf_counter()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "wall_s": wall,
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


async def _baseline(socket_path: str, body: bytes) -> None:
    from aiohttp import web

    async def health(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.UnixSite(runner, socket_path).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def run_load(socket_path: Path, clients: int, requests: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.daemon", "--_load", str(socket_path),
         "--clients", str(clients), "--requests", str(requests)],
        capture_output=True, text=True, check=True, timeout=600,
    )  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout)
    return result


# --- attestd ----------------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_state(client: Client, state: State, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if client.health().state is state:
                return
        except Exception:  # noqa: S110 - the socket is not up yet
            pass
        time.sleep(0.05)
    raise SystemExit(f"bench: attestd did not become {state} in {timeout:g} s")


def revocation_latency(client: Client, state_file: Path, flips: int) -> list[float]:
    """Seconds from writing CC off to reading the ``revoked`` event, per flip."""
    times: list[float] = []
    for _ in range(flips):
        wait_state(client, State.HEALTHY)
        stream = client.events()
        first = next(stream)
        if first.state is not State.HEALTHY:
            raise SystemExit(f"bench: expected healthy first, got {first.state}")
        seen = threading.Event()
        at: list[float] = []

        def read(events: Any = stream, at: list[float] = at, seen: threading.Event = seen) -> None:
            for event in events:
                if event.state is State.REVOKED:
                    at.append(time.perf_counter())
                    seen.set()
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        started = time.perf_counter()
        apply_action(state_file, "cc-off")
        if not seen.wait(60):
            raise SystemExit("bench: no revoked event within 60 s")
        times.append(at[0] - started)
        stream.close()
        reader.join(5)
        apply_action(state_file, "cc-on")
    wait_state(client, State.HEALTHY)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed-dir", type=Path)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fast-check-s", type=float, default=1.0)
    parser.add_argument("--flips", type=int, default=5)
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--_load", help=argparse.SUPPRESS)
    parser.add_argument("--_baseline", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._load:
        print(json.dumps(asyncio.run(_load(args._load, args.clients, args.requests))))
        return 0
    if args._baseline:
        asyncio.run(_baseline(args._baseline[0], Path(args._baseline[1]).read_bytes()))
        return 0

    work = Path(tempfile.mkdtemp(prefix="ab-", dir="/tmp"))
    results: dict[str, Any] = {}
    with testbed(args.testbed_dir) as directory:
        env = {**os.environ, **read_env_file(directory / ENV_FILE)}
        env["CONFINFER_GPU_FAST_CHECK_S"] = str(args.fast_check_s)
        env.pop("NOTIFY_SOCKET", None)
        sock = work / "a"
        attestd = subprocess.Popen(
            [str(Path(sys.executable).with_name("attestd")), "--socket", str(sock)],
            env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=(work / "attestd.log").open("wb"),
        )  # fmt: skip
        baseline = None
        try:
            client = Client(sock, timeout=30)
            started = time.perf_counter()
            wait_state(client, State.HEALTHY)
            results["first_full_pass_s"] = time.perf_counter() - started
            log_line(f"attestd healthy after {results['first_full_pass_s']:.2f} s")

            body = work / "health.json"
            body.write_bytes(client.health().to_json().encode())
            base_sock = work / "b"
            baseline = subprocess.Popen(
                [sys.executable, "-m", "bench.daemon", "--_baseline", str(base_sock), str(body)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert baseline.stdout is not None
            if baseline.stdout.readline().strip() != "ready":
                raise SystemExit("bench: the baseline server did not start")

            rounds: dict[str, list[dict[str, float]]] = {"baseline": [], "attestd": []}
            run_load(sock, args.clients, min(args.requests, 2000))  # warm-up
            run_load(base_sock, args.clients, min(args.requests, 2000))
            for number in range(args.rounds):
                for name, path in (("baseline", base_sock), ("attestd", sock)):
                    rounds[name].append(run_load(path, args.clients, args.requests))
                    r = rounds[name][-1]
                    log_line(
                        f"round {number + 1} {name}: {r['rps']:.0f} req/s, "
                        f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms"
                    )
            med = {
                name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                for name, runs in rounds.items()
            }
            ratio = med["attestd"]["rps"] / med["baseline"]["rps"]
            results["health"] = {"median": med, "rounds": rounds, "ratio": ratio}

            flips = revocation_latency(client, directory / "gpu" / "state", args.flips)
            results["revocation_s"] = flips

            pid = attestd.pid
            cpu0, t0 = proc_cpu_s(pid), time.monotonic()
            rss = [proc_rss_mib(pid)]
            while time.monotonic() - t0 < args.idle_s:
                time.sleep(min(1.0, args.idle_s))
                rss.append(proc_rss_mib(pid))
            idle_cpu = (proc_cpu_s(pid) - cpu0) / (time.monotonic() - t0)
            results["idle"] = {"cpu_share": idle_cpu, "rss_mib_max": max(rss), "s": args.idle_s}
        finally:
            attestd.terminate()
            attestd.wait(30)
            if baseline is not None:
                baseline.terminate()
                baseline.wait(10)

    limit = args.fast_check_s + LATENCY_SLACK_S
    health_ok = results["health"]["ratio"] >= THROUGHPUT_TARGET
    flips_ok = max(results["revocation_s"]) <= limit
    m = results["health"]["median"]
    print(f"{'measure':<34} {'attestd':>12} {'baseline':>12} {'ratio':>7}  verdict")
    print(
        f"{'/v1/health req/s (' + str(args.clients) + ' clients)':<34} "
        f"{m['attestd']['rps']:>12.0f} {m['baseline']['rps']:>12.0f} "
        f"{results['health']['ratio']:>7.2f}  {'PASS' if health_ok else 'FAIL'} (>= 0.7)"
    )
    for key in ("p50_ms", "p99_ms"):
        print(
            f"{'/v1/health ' + key.replace('_ms', '') + ' ms':<34} "
            f"{m['attestd'][key]:>12.2f} {m['baseline'][key]:>12.2f} "
            f"{m['attestd'][key] / m['baseline'][key]:>7.2f}"
        )
    flips = results["revocation_s"]
    print(
        f"{'CC off -> revoked event s':<34} {statistics.median(flips):>12.3f} "
        f"{'max ' + format(max(flips), '.3f'):>12} {'':>7}  "
        f"{'PASS' if flips_ok else 'FAIL'} (<= {limit:g} s)"
    )
    idle = results["idle"]
    print(f"{'idle CPU share':<34} {100 * idle['cpu_share']:>11.2f}%")
    print(f"{'idle RSS MiB (max)':<34} {idle['rss_mib_max']:>12.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0 if health_ok and flips_ok else 1


if __name__ == "__main__":
    sys.exit(main())
