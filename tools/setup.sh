#!/usr/bin/env bash
# Install the project (idempotent). torch is installed first, pinned, so no dependency pulls another
# build. By default into .venv; with SPECDEC_PYTHON=python3 into that interpreter (the container image
# does this, so Ray's own Python runs the project). CI and the Dockerfile both run this script.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${SPECDEC_PYTHON:-.venv/bin/python}"
EXTRAS="${SPECDEC_EXTRAS:-[dev]}"
if [ -z "${SPECDEC_PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! "$PY" -c "import cluster, torch, transformers, ray, grpc_reflection, specdec" 2>/dev/null \
   || { [ -n "$EXTRAS" ] && ! "$PY" -c "import pytest, openai, matplotlib" 2>/dev/null; }; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q torch==2.13.0
  "$PY" -m pip install -q -e ".${EXTRAS}"
fi
# Build the native bf16 kernel ahead of the first pass (cached; says "unavailable" where the CPU or
# compiler lacks what it needs, and the backends then use F.linear).
"$PY" -m cluster.models.native || true
