#!/usr/bin/env bash
# Full-size evidence on a CUDA machine: install the wheels carried in .whl/ (`make gpu-wheels`)
# into a scratch site, then run scripts/gpu_evidence.py from this source tree. Arguments go to
# gpu_evidence.py; the JSON goes to $OUT when set, else runs/gpu-evidence/. PYTHON picks the
# interpreter (default python3, the one with CUDA torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
SITE="${SD35TRT_WHEEL_SITE:-/tmp/sd35trt-wheels}"
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_evidence.py "$@"
