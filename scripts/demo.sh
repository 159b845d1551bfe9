#!/usr/bin/env bash
# Installs jaxpeft and the offline assets (only what is missing or changed, see setup.sh), then runs the demo (the
# project's main job). Extra arguments go to the demo: --causal-lm (the SmolLM2 demo instead), --all (both),
# --output-dir, --steps, --quick; see --help.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh demo
export HF_HUB_OFFLINE=1  # everything the demo reads is on disk
python -m jaxpeft.demo "$@"
