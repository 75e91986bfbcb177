#!/usr/bin/env bash
# Creates .venv (if missing) with torch, triton and the test/runtime dependencies, then builds the
# extension in place. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  # A system python that already has a CUDA torch keeps it: the venv sees its site-packages.
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
    echo "bootstrap: using the system CUDA torch"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q "torch==2.13.0"
fi
if ! "$VPY" -c "import triton" 2>/dev/null; then
  "$VPY" -m pip install -q "triton==3.9.0"
fi
stamp="$VENV/.deps-$(cksum requirements.txt | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  "$VPY" -m pip install -q -r requirements.txt
  touch "$stamp"
fi
# Rebuild the extension when csrc/ or setup.py is newer than the last build.
bstamp="$VENV/.ext-built"
if [ ! -f "$bstamp" ] || [ -n "$(find csrc setup.py -newer "$bstamp" 2>/dev/null | head -1)" ] \
   || ! "$VPY" -c "import sag_fast, sys; sys.exit(0 if sag_fast.extension_available() else 1)" 2>/dev/null; then
  "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
  touch "$bstamp"
fi
