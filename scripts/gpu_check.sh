#!/usr/bin/env bash
# GPU check on a machine with no downloads: 7B-shaped random LLaVA-1.5 / LLaVA-NeXT, every baseline plugin
# vs oracle vs full (prefill and decode). Expects torch and transformers installed; mmtoken is imported from
# this checkout, so nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3 || command -v python)}
timeout 300 "$PY" scripts/gpu_check.py "$@"
