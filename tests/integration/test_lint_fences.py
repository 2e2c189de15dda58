"""The import rules of DESIGN.md §2 and the hazmat fence are enforced by ruff (TID251).

Each case feeds ruff one import as if it were a file in the package, and expects a refusal;
the allowed imports beside them pass, so the fence is neither missing nor too wide.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RUFF = Path(sys.executable).parent / "ruff"


def banned(path: str, source: str) -> bool:
    done = subprocess.run(
        [str(RUFF), "check", "--select", "TID251", "--stdin-filename", path, "-"],
        input=source,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=60,
    )
    assert done.returncode in (0, 1), done.stderr
    return "TID251" in done.stdout


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("confinfer/x.py", "import loader.keywrap\n"),
        ("confinfer/x.py", "from attestd import state\n"),
        ("confinfer/x.py", "import testbed.pki\n"),
        ("confinfer/x.py", "from cryptography.hazmat.primitives.ciphers import Cipher\n"),
        ("confinfer/x.py", "from cryptography.hazmat.primitives.ciphers import modes\n"),
        ("loader/x.py", "import attestd\n"),
        ("loader/x.py", "from testbed import keyvault\n"),
        ("loader/x.py", "from cryptography.hazmat.primitives.ciphers.aead import AESGCM\n"),
        ("attestd/x.py", "from loader import dest\n"),
        ("testbed/x.py", "from confinfer import jose\n"),
        ("testbed/x.py", "import loader\n"),
        ("testbed/x.py", "import serving\n"),
        ("serving/x.py", "import loader\n"),
        ("serving/x.py", "from attestd import state\n"),
        ("serving/x.py", "import testbed\n"),
        ("loader/x.py", "import serving.supervisor\n"),
        ("attestd/x.py", "from serving import supervisor\n"),
    ],
)
def test_forbidden_imports_are_refused(path: str, source: str) -> None:
    assert banned(path, source)


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("loader/x.py", "from confinfer import keyvault\n"),
        ("attestd/x.py", "from confinfer import maa\n"),
        ("loader/aead.py", "from cryptography.hazmat.primitives.ciphers.aead import AESGCM\n"),
        ("confinfer/x.py", "from cryptography.hazmat.primitives.ciphers.aead import AESGCM\n"),
        ("tests/x.py", "import testbed\nimport loader\n"),
        ("serving/x.py", "from confinfer import attestd_api\n"),
    ],
)
def test_allowed_imports_pass(path: str, source: str) -> None:
    assert not banned(path, source)
