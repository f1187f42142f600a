#!/usr/bin/env bash
# Creates .venv with every dependency and generates the gRPC code from protos/. Idempotent.
# CPU hosts get torch 2.13.0 (CPU build); a host whose system Python already has a CUDA torch keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "bootstrap: host torch has CUDA; the venv sees the system site-packages"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  pip install -q torch==2.13.0
fi
# Triton: CUDA hosts have the one their torch was built with; CPU hosts get it for its interpreter, which runs the
# hash-grid kernels' tests (tests/test_triton_encoding.py).
if ! "$VENV/bin/python" -c 'import triton' 2>/dev/null; then
  pip install -q triton==3.9.0
fi
pip install -q -e ".[dev]"
# The web page's browser test (tests/test_web_page.py) drives Debian's chromium through Playwright (Playwright's own
# browser download is not used): installed only where it is missing and apt can run as root; elsewhere that test skips.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "bootstrap: could not install chromium; tests/test_web_page.py's browser test will skip"
fi
scripts/gen_protos.sh
echo "bootstrap: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
