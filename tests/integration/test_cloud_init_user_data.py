"""The rendered user data against the real cloud-init (Debian's package): ``cloud-init schema``
accepts it (both templates, with Caddy's environment file and the API key), and cloud-init's own
YAML loader and runcmd quoting (``cloudinit.util``) turn the bootstrap's command line, hostile
URL and all, into exactly the argv that was meant, and the files into exactly their content."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from confinfer import deploy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CLOUD_INIT = shutil.which("cloud-init")
SYSTEM_PYTHON = "/usr/bin/python3"  # the interpreter Debian's cloud-init package runs on
DIGEST = "9a1e94954b59589aa98e48c90552072dcdbfa142372260faaf0c89a28cfbddbe"
API_KEY = "Test-Key_0123456789abcdefghijklmnopqrstuvwxyz"  # a test value

if CLOUD_INIT is None:
    pytest.skip("cloud-init is missing (apt-get install cloud-init)", allow_module_level=True)


def plan(tmp_path: Path, appliance: str = "", bootstrap: str | None = None) -> deploy.Plan:
    key = tmp_path / "id.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI x@y\n")
    text = (
        "[azure]\n"
        'resource_group = "confinfer"\nlocation = "eastus2"\nname_prefix = "cinf"\n'
        f'vault_name = "cinf-kv-0001"\nssh_public_key = {json.dumps(str(key))}\n'
        '[appliance]\nmodel_source = "https://acct.blob.core.windows.net/models/m"\n'
        f"{appliance}\n"
        '[caddy]\nacme_email = "ops@example.com"\n'
    )
    if bootstrap is not None:
        text += f"[bootstrap]\nwheelhouse_url = {json.dumps(bootstrap)}\n"
        text += f'wheelhouse_sha256 = "{DIGEST}"\n'
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    return deploy.load_plan(path)


def schema(path: Path) -> subprocess.CompletedProcess[str]:
    assert CLOUD_INIT is not None
    return subprocess.run(
        [CLOUD_INIT, "schema", "--config-file", str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


HOSTILE = (
    'serving_model_name = "x: |\\\\n  evil \' \\" $(reboot) `reboot` @CONFIG@ #cloud-config"\n'
    'serving_args = ["--a", "- path: /etc/shadow", "}} {{", "\\u00e9\\U0001F600"]\n'
    'onboard_hardware = "testbed"\n'
)


@pytest.mark.parametrize("with_bootstrap", [True, False])
def test_cloud_init_schema_accepts_the_rendered_user_data(
    tmp_path: Path, with_bootstrap: bool
) -> None:
    wheelhouse = "https://acct.blob.core.windows.net/r/wh.tar.gz" if with_bootstrap else None
    data = deploy.user_data(plan(tmp_path, HOSTILE, wheelhouse), api_key=API_KEY)
    path = tmp_path / "user-data"
    path.write_text(data)
    done = schema(path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Valid cloud-config" in done.stdout


def test_cloud_init_schema_would_catch_a_broken_document(tmp_path: Path) -> None:
    """The check is real: the same document with a wrongly typed key is refused."""
    data = deploy.user_data(plan(tmp_path, "", "/srv/wh.tar.gz"), api_key=API_KEY)
    path = tmp_path / "user-data"
    path.write_text(data.replace("package_update: true", "package_update: [1]"))
    assert schema(path).returncode != 0


RUN_AS_CLOUD_INIT = r"""
import json, subprocess, sys
from cloudinit import util
doc = util.load_yaml(open(sys.argv[1]).read())
files = {f["path"]: f for f in doc["write_files"]}
argv = doc["runcmd"][0]
argv[0] = sys.argv[2]  # the recorder stands in for /usr/local/sbin/confinfer-bootstrap
open(sys.argv[3], "w").write(util.shellify(doc["runcmd"]))
print(json.dumps({
    "config": files["/etc/confinfer/confinfer.toml"]["content"],
    "key": files["/etc/confinfer/api-key"]["content"],
    "key_mode": files["/etc/confinfer/api-key"]["permissions"],
    "env": files["/etc/confinfer/caddy.env"]["content"],
}))
"""


@pytest.mark.parametrize(
    "url",
    [
        "https://h.example/$(touch$IFS/tmp/pwned)",
        "https://h.example/a'b';touch$IFS/tmp/pwned;'",
        "https://acct.blob.core.windows.net/r/wh.tar.gz?sv=2024&sig=a%2Bb&x=$HOME",
        "file:///srv/confinfer/wheelhouse.tar.gz",
    ],
)
def test_cloud_inits_runcmd_hands_the_bootstrap_exactly_its_arguments(
    tmp_path: Path, url: str
) -> None:
    data = deploy.user_data(plan(tmp_path, HOSTILE, url), api_key=API_KEY)
    user_data = tmp_path / "user-data"
    user_data.write_text(data)
    recorder = tmp_path / "recorder"
    received = tmp_path / "argv.json"
    recorder.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(received)!r}, 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    recorder.chmod(0o755)
    script = tmp_path / "runcmd"
    loaded = subprocess.run(
        [SYSTEM_PYTHON, "-c", RUN_AS_CLOUD_INIT, str(user_data), str(recorder), str(script)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    done = subprocess.run(
        ["sh", str(script)], capture_output=True, text=True, timeout=60, check=False,
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(received.read_text()) == ["--wheelhouse", url, "--sha256", DIGEST]
    assert not Path("/tmp/pwned").exists()
    written = json.loads(loaded.stdout)
    assert 'onboard_hardware = "testbed"' in written["config"].splitlines()
    assert written["key"] == API_KEY + "\n" and written["key_mode"] == "0600"
    assert 'CONFINFER_CADDY_TLS="ops@example.com"' in written["env"].splitlines()
