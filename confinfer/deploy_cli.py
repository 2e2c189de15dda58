"""``confinfer deploy [create|what-if|outputs|destroy] --config deploy.toml``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register_deploy(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "deploy",
        help="deploy the appliance to Azure (Bicep through the az CLI)",
        description=(
            "Deploy bicep-wrapper/main.bicep with the Azure CLI: checks deploy.toml and the SSH "
            "key, then the login, the Key Vault provider, the VM size and quota in the region "
            "(this deployment's own VMs counted) and an existing key, renders the VM's user "
            "data (configuration, Caddy's settings, the API key: made on the first create, in "
            "api_key_file), keeps the parameters in <deployment>.parameters.json (0600) next "
            "to deploy.toml, then creates the deployment. what-if shows the changes (or, "
            "before the resource group exists, the parameters); outputs prints the FQDN, key "
            "id and identity; destroy deletes the resource group (exit 1 when declined)."
        ),
    )
    parser.add_argument(
        "action",
        nargs="?",
        default="create",
        choices=("create", "what-if", "outputs", "destroy"),
        help="what to do (default: create)",
    )
    parser.add_argument("--config", type=Path, required=True, metavar="FILE", help="deploy.toml")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print every az command and the parameters (API key left out); run and write nothing",
    )
    parser.add_argument("--yes", action="store_true", help="destroy without asking")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from confinfer import deploy

    plan = deploy.load_plan(args.config)
    az = deploy.Az(dry_run=args.dry_run)
    if args.action == "outputs":
        found = deploy.outputs(plan, az)
        if found is not None:
            json.dump(found, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
        return 0
    if args.action == "destroy":
        if not deploy.destroy(plan, az, yes=args.yes):
            print("confinfer: declined: nothing deleted", file=sys.stderr)
            return 1
        return 0
    result = deploy.deploy(plan, az, what_if=args.action == "what-if")
    if args.action == "create" and isinstance(result, dict):
        found = deploy.outputs(plan, az)
        if found:
            json.dump(found, sys.stdout, indent=2, sort_keys=True)
            sys.stdout.write("\n")
    return 0
