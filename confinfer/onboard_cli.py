"""``confinfer onboard [run|status]`` and ``confinfer install-units``: the bootstrap's commands.

``onboard run`` is ``confinfer-onboard.service``'s ExecStart (confinfer/onboard.py); ``onboard
status`` reads the state file and exits like ``confinfer status``: 0 done, 2 in progress (or
not started), 1 a stage failed. ``install-units`` copies the units and Caddy's files from the
package into the system (confinfer/units.py); cloud-init's bootstrap runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from confinfer.onboard_state import BOOT_ID, STATE_DIR, STATE_NAME, StateFile, progress_obj

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_IN_PROGRESS = 2
_EXIT = {"done": EXIT_DONE, "in-progress": EXIT_IN_PROGRESS, "failed": EXIT_FAILED}


def register_onboard(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "onboard",
        help="onboarding: kernel, NVIDIA driver, CC mode, tools, then the appliance",
        description=(
            "Onboard this VM stage by stage across the reboots it needs (run), or show where "
            "it stands (status, the default). The state is in STATE_DIR/onboard.json."
        ),
    )
    parser.set_defaults(func=status, state_dir=STATE_DIR, format="table")
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    run_parser = actions.add_parser(
        "run",
        help="apply what is not done yet (confinfer-onboard.service runs this at every boot)",
        description=(
            "Walk the stages in order: done stages are skipped, a stage whose effect is already "
            "in place is marked done, a stage that needs a reboot records it and reboots the "
            "machine (systemctl reboot). When every stage is done it sends READY=1."
        ),
    )
    _state_dir(run_parser)
    run_parser.add_argument(
        "--retry",
        action="store_true",
        help="try failed stages again (their attempts start over)",
    )
    run_parser.add_argument(
        "--boot-id-file",
        type=Path,
        default=BOOT_ID,
        metavar="PATH",
        help="where this boot's id is read (default: %(default)s; tests give another)",
    )
    run_parser.set_defaults(func=run)
    status_parser = actions.add_parser("status", help="show each stage's state")
    _state_dir(status_parser)
    status_parser.add_argument(
        "--format", choices=("table", "json"), default="table", help="table (default) or json"
    )
    status_parser.set_defaults(func=status)


def register_install_units(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = subparsers.add_parser(
        "install-units",
        help="install the appliance's systemd units and Caddy files from the package",
        description=(
            "Copy the units and drop-ins into ROOT/etc/systemd/system and Caddy's Caddyfile "
            "and caddy-run into ROOT/opt/confinfer, from the installed package's data (or "
            "--source). Nothing is enabled; run `systemctl daemon-reload` next."
        ),
    )
    parser.add_argument(
        "--root", type=Path, default=Path("/"), metavar="DIR", help="install under DIR"
    )
    parser.add_argument(
        "--source",
        type=Path,
        metavar="DIR",
        help="a folder holding systemd/ and caddy/ (default: the package's share/confinfer)",
    )
    parser.set_defaults(func=install_units)


def _state_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=STATE_DIR,
        metavar="DIR",
        help="where onboard.json is kept (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    from confinfer import config
    from confinfer.onboard import Appliance, Machine, Onboarding, TestbedMachine
    from confinfer.onboard_azure import AzureMachine
    from confinfer.onboard_commands import checked, subprocess_runner
    from confinfer.onboard_state import read_boot_id

    cfg = config.load()
    store = StateFile(args.state_dir / STATE_NAME)
    boot_id_file: Path = args.boot_id_file
    machine: Machine
    if cfg.onboard_hardware == "testbed":
        machine = TestbedMachine(
            subprocess_runner,
            args.state_dir / "testbed",
            boot_id_file=boot_id_file,
            state_file=store.path,
        )
    else:
        machine = AzureMachine(
            subprocess_runner,
            nvattest_url=cfg.onboard_nvattest_url,
            nvattest_sha256=cfg.onboard_nvattest_sha256,
        )

    def reboot() -> None:
        checked(subprocess_runner, ["systemctl", "reboot"], timeout=120.0)

    Onboarding(
        store=store,
        machine=machine,
        appliance=Appliance(subprocess_runner, cfg.serving_image),
        hardware=cfg.onboard_hardware,
        boot_id=lambda: read_boot_id(boot_id_file),
        reboot=reboot,
    ).run(retry=args.retry)
    return 0


def status(args: argparse.Namespace) -> int:
    from confinfer.status_cli import onboarding_table

    path = args.state_dir / STATE_NAME
    state = StateFile(path).load()
    if state is None:
        if args.format == "json":
            obj = {"state": "not-started", "line": f"onboarding has not started (no {path})"}
            json.dump(obj, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(f"onboarding: not started (no {path})\n")
        return EXIT_IN_PROGRESS
    if args.format == "json":
        json.dump(progress_obj(state), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(onboarding_table(state, time.time()))
    return _EXIT[state.progress().state]


def install_units(args: argparse.Namespace) -> int:
    from confinfer import units

    for path in units.install(units.find_sources(args.source), args.root):
        print(path)
    return 0


__all__ = ["register_install_units", "register_onboard"]
