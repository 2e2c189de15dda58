#!/bin/sh
# confinfer-bootstrap: installs the appliance on a stock VM and hands over to onboarding. The user
# data (cloud-init/user-data.yaml.tmpl) writes it to /usr/local/sbin/confinfer-bootstrap and
# runs it once from runcmd, after cloud-init has installed docker.io, caddy and python3-venv:
#
#   confinfer-bootstrap --wheelhouse URL --sha256 HEX
#
# 1. fetches the wheelhouse (an https:// URL, a file:// URL or an absolute path) and refuses it
#    unless its SHA-256 is the pinned one: nothing of it is used before that check;
# 2. makes the virtualenv /opt/confinfer and installs the wheelhouse's requirements.lock into it
#    with pip --no-index --require-hashes: only the archive's wheels, each checked again against
#    the lock (bin/ then holds attestd, model-loader, vllm-supervisor and confinfer);
# 3. stops and disables Debian's own caddy.service (its package started it on port 80), then
#    `confinfer install-units` copies the units, drop-ins, Caddyfile and caddy-run from the
#    installed package, and systemd reloads;
# 4. enables confinfer-onboard.service and starts it without waiting: it runs after cloud-init's
#    final stage, reboots as its stages need, and enables confinfer.target at the end.
#
# Safe to run again. A failure is one line on stderr (in /var/log/cloud-init-output.log) and a
# non-zero exit. The URL's query, which may hold a SAS token, is never printed.
# CONFINFER_BOOTSTRAP_ROOT (tests only) moves /opt/confinfer and /etc/systemd/system under it.
set -eu

root=${CONFINFER_BOOTSTRAP_ROOT:-}
prefix=$root/opt/confinfer

fail() {
    printf 'confinfer-bootstrap: %s\n' "$1" >&2
    exit 1
}
say() {
    printf 'confinfer-bootstrap: %s\n' "$1" >&2
}

url=
sha256=
while [ $# -gt 0 ]; do
    case $1 in
    --wheelhouse) [ $# -ge 2 ] || fail "--wheelhouse needs a value"; url=$2; shift 2 ;;
    --sha256) [ $# -ge 2 ] || fail "--sha256 needs a value"; sha256=$2; shift 2 ;;
    *) fail "unknown argument (usage: confinfer-bootstrap --wheelhouse URL --sha256 HEX)" ;;
    esac
done
[ -n "$url" ] || fail "--wheelhouse URL is required"
case $sha256 in
*[!0-9a-f]* | "") fail "--sha256 must be 64 lower-case hexadecimal digits" ;;
esac
[ ${#sha256} -eq 64 ] || fail "--sha256 must be 64 lower-case hexadecimal digits"
shown=${url%%\?*}

work=$(mktemp -d "${TMPDIR:-/var/tmp}/confinfer-bootstrap.XXXXXX")
trap 'rm -rf "$work"' EXIT
archive=$work/wheelhouse.tar.gz

say "fetching the wheelhouse from $shown"
case $url in
https://*)
    curl --proto =https --proto-redir =https --tlsv1.2 --fail --silent --show-error \
        --location --retry 5 --retry-delay 5 --max-time 1800 --output "$archive" "$url" ||
        fail "cannot download $shown"
    ;;
file:///*) cp "${url#file://}" "$archive" || fail "cannot read $shown" ;;
/*) cp "$url" "$archive" || fail "cannot read $shown" ;;
*) fail "the wheelhouse must be an https:// or file:// URL, or an absolute path" ;;
esac
got=$(sha256sum "$archive" | cut -d' ' -f1)
[ "$got" = "$sha256" ] ||
    fail "the wheelhouse's SHA-256 is $got, not the pinned $sha256: refused, nothing installed"

mkdir "$work/wheels"
tar -xzf "$archive" -C "$work/wheels" --no-same-owner --no-same-permissions ||
    fail "the wheelhouse is not a tar.gz archive"
[ -f "$work/wheels/requirements.lock" ] || fail "the wheelhouse has no requirements.lock"

# The appliance needs Python 3.11 or newer; Ubuntu 22.04's python3 is 3.10, with 3.11 beside it.
python=
for candidate in python3 python3.13 python3.12 python3.11; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        python=$(command -v "$candidate")
        break
    fi
done
if [ -z "$python" ]; then
    say "installing python3.11 (python3 is older than 3.11)"
    DEBIAN_FRONTEND=noninteractive apt-get -y -o DPkg::Lock::Timeout=600 install \
        python3.11 python3.11-venv >/dev/null || fail "cannot install python3.11"
    python=$(command -v python3.11)
fi

say "installing the appliance into $prefix ($($python -V 2>&1))"
rm -rf "$prefix"
"$python" -m venv "$prefix" || fail "cannot make the virtualenv $prefix (is python3-venv installed?)"
PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    "$prefix/bin/python" -m pip install --quiet --no-input --no-index --only-binary :all: \
    --find-links "$work/wheels" --require-hashes -r "$work/wheels/requirements.lock" ||
    fail "pip could not install the wheelhouse (built for another Python or platform?)"
[ -x "$prefix/bin/confinfer" ] || fail "the wheelhouse did not install the confinfer command"

units=$root/etc/systemd/system
if [ ! -e "$units/caddy.service" ]; then
    # Debian's Caddy, started by its package on port 80; ours replaces it (confinfer.target).
    systemctl disable --now caddy.service >/dev/null 2>&1 || true
fi
"$prefix/bin/confinfer" install-units --root "${root:-/}" >/dev/null ||
    fail "cannot install the units"
systemctl daemon-reload || fail "systemctl daemon-reload failed"
systemctl enable confinfer-onboard.service || fail "cannot enable confinfer-onboard.service"
systemctl start --no-block confinfer-onboard.service ||
    fail "cannot start confinfer-onboard.service"
say "installed; onboarding starts after cloud-init (confinfer onboard status)"
