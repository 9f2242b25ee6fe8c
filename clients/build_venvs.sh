#!/usr/bin/env bash
# Build the client venvs that the client checks (tests/test_clients.py) run our bundles in.
# optimum-onnx and optimum-intel pin optimum/transformers versions that fit neither our venv nor
# each other, so each client lives in its own venv (versions from ../shared/FINDINGS.md). torch is
# installed first (the CPU build) and named again in the same pip command so pip keeps it.
#   clients/build_venvs.sh [DIR]    (default: .client-venvs in the repository root)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENVS="${1:-$ROOT/.client-venvs}"
PYTHON="${PYTHON:-python3}"
TORCH="torch==2.13.0"

build() {
  local name="$1"; shift
  local venv="$VENVS/$name"
  if [ -f "$venv/.installed" ]; then echo "$name: $venv is built"; return 0; fi
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "$TORCH"
  "$venv/bin/pip" install -q "$TORCH" "numpy>=2.3,<2.4" "$@"
  touch "$venv/.installed"
  echo "$name: built $venv"
}

build optimum-onnx "optimum-onnx==0.1.0" "optimum==2.1.0" "onnxruntime==1.32.0" \
  "diffusers==0.39.0" "huggingface_hub==0.36.2" "transformers==4.57.6"
if [ ! -f "$VENVS/optimum-intel/.installed" ]; then
  build optimum-intel "optimum-intel==2.2.0" "optimum==2.3.0" "openvino==2026.4.1" \
    "diffusers==0.39.0" "huggingface_hub==1.21.0" "transformers==5.5.4"
  # optimum-intel pulls a CUDA torchvision that fails to load beside CPU torch (torchvision::nms);
  # its diffusion pipelines do not use it
  "$VENVS/optimum-intel/bin/pip" uninstall -y -q torchvision
fi
