#!/usr/bin/env bash
# Regenerate requirements/lock.txt, the exact versions CI and the README install with (as pip
# constraints). Run it after changing the dependencies in pyproject.toml, or to move to newer releases.
#
# The lock is the freeze of a fresh venv that installed the project exactly as CI does, but without
# constraints: a developer's own venv would add whatever else was installed in it. It covers only the
# platform and Python it was made on (uname -m, python3 --version: the header says which).
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/lock.txt
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

python3 -m venv "$WORK/venv"
# shellcheck disable=SC1091
. "$WORK/venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The lock itself must not decide what gets locked.
unset PIP_CONSTRAINT
pip install -q torch==2.13.0 && pip install -q -e '.[dev]'

{
    echo "# Exact versions, used as pip constraints (PIP_CONSTRAINT=$LOCK, or pip install -c $LOCK):"
    echo "# the extras asked for decide what is installed, this file which version. Made by"
    echo "# requirements/update_lock.sh on $(uname -s) $(uname -m), Python $(python -c 'import platform; print(platform.python_version())')."
    # --all: setuptools is a dependency of torch, which plain freeze leaves out; pip is not installed by
    # these commands, so pinning it would only stop a user upgrading it.
    pip freeze --all --exclude-editable | grep -v '^pip=='
} >"$WORK/lock.txt"

# A torch resolved from an index that serves the CUDA build drags in nvidia-* wheels (gigabytes); the
# lock is meant to pin the CPU build.
if grep -iE '^(nvidia-|cuda-)' "$WORK/lock.txt"; then
    echo "update_lock.sh: the install pulled CUDA packages (above); make pip find torch's CPU build," \
        "e.g. --extra-index-url https://download.pytorch.org/whl/cpu, and rerun" >&2
    exit 1
fi
if ! grep -qE '^torch==2\.13\.0\+cpu$' "$WORK/lock.txt"; then
    echo "update_lock.sh: expected torch==2.13.0+cpu in the freeze, got: $(grep -E '^torch[=@ ]' "$WORK/lock.txt")" >&2
    exit 1
fi
mv "$WORK/lock.txt" "$LOCK"
echo "wrote $LOCK ($(grep -vc '^#' "$LOCK") packages)"
