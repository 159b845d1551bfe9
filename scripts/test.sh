#!/usr/bin/env bash
# Installs jaxpeft with its test dependencies, lints, and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh test
python -m ruff check jaxpeft tests benchmarks
# One numpy BLAS thread per test worker: the workers already fill the cores, and more threads only contend.
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"
python -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
