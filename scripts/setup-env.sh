#!/usr/bin/env bash
# Create .venv with everything bgevl-export needs to export, run and test on CPU.
# Idempotent: re-running only installs what changed. Used by `make` and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# Debian's python3.11 when present: the Triton python-backend stub of the nvidia-pytriton wheel
# embeds that libpython, so a venv made from it also serves python-backend models.
PYTHON=${PYTHON:-$(command -v /usr/bin/python3.11 || command -v python3)}
stamp="$VENV/.bgevl-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
# torch first and pinned: an unpinned torch pulls the CUDA build (GBs); 2.13.0 is the CPU wheel here.
$PIP install "torch==2.13.0"
$PIP install -c constraints.txt -e ".[cpu,export,serving,bench,openvino,api,corpus,ray,test]"
# perf_analyzer (from the tritonclient 2.51.0 wheel, the last whose binary runs on this OS) into
# $VENV/tools; optional: the tests and bgevl-bench say why they do without it when it is missing.
"$VENV/bin/python" -m bgevl.serving.perf_analyzer --install || echo "perf_analyzer not installed (see above); continuing" >&2
# checkov (a Kubernetes security scanner) in its own environment, so its dependencies leave the pins alone;
# optional: tests/test_deploy.py says why it does without it when missing.
if [ ! -x "$VENV/tools/checkov/bin/checkov" ]; then
  { "$PYTHON" -m venv "$VENV/tools/checkov" \
    && "$VENV/tools/checkov/bin/python" -m pip --disable-pip-version-check -q install "checkov==3.3.30"; } \
    || echo "checkov not installed (see above); continuing" >&2
fi
touch "$stamp"
echo "environment ready: $VENV" >&2
