#!/usr/bin/env bash
# GPU check on a machine with no downloads: 7B-shaped random LLaVA-1.5 / LLaVA-NeXT, every baseline plugin
# vs oracle vs full (prefill and decode). Expects torch and transformers installed; installs mmtoken from
# this checkout if it is not importable.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import mmtoken" 2>/dev/null || pip install --no-deps -q .
timeout 300 python scripts/gpu_check.py "$@"
