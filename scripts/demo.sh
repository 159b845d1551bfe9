#!/usr/bin/env bash
# Installs jaxpeft and runs the offline demo (the project's main job). Extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
python -m jaxpeft.demo "$@"
