"""``confinfer attest``: attest this VM's vTPM with MAA and print the verified claims.

Configuration comes from /etc/confinfer/*.toml and CONFINFER_* variables (confinfer.config);
flags override both. The claims (JSON) go to stdout only once the token has verified against
the issuer's JWKS, is bound to this attestation's TPM key and nonce, and, with ``--policy``,
satisfies the release policy. Any refusal is one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register_attest(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "attest",
        help="attest the vTPM with Microsoft Azure Attestation and print the verified claims",
        description=(
            "Collect evidence from the vTPM, attest it with Microsoft Azure Attestation and "
            "print the token's claims as JSON, once the token has verified against the "
            "issuer's keys and is bound to this attestation's TPM key and nonce. Settings come "
            "from /etc/confinfer/*.toml and CONFINFER_* variables; flags override them. A "
            "refusal is one line on stderr and a non-zero exit."
        ),
    )
    parser.add_argument(
        "--maa-url",
        metavar="URL",
        help="attestation provider (default: maa_url from the configuration)",
    )
    parser.add_argument(
        "--nonce", metavar="N", help="text bound into the token's client payload (default: random)"
    )
    parser.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="release policy (Key Vault grammar) the claims must satisfy",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from confinfer import config, maa, policy
    from confinfer.tpm import Vtpm

    cfg = config.override(config.load(), maa_url=args.maa_url)
    rules = policy.load(args.policy) if args.policy is not None else None
    nonce = args.nonce.encode("utf-8") if args.nonce is not None else None
    with Vtpm(cfg.tpm_tcti) as vtpm:
        result = maa.attest(vtpm, cfg, nonce=nonce)
    if rules is not None:
        policy.evaluate(rules, result.claims, str(result.claims.get("iss", "")))
    json.dump(result.claims, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0
