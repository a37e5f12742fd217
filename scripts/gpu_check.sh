#!/usr/bin/env bash
# GPU check of the memory estimator: lorafit's training step on CUDA (random-weight Llama-3.2-1B shape and a
# small Qwen2 shape), peak from torch.cuda.max_memory_allocated, next to `lorafit.memory.estimate`.
# Prints one table and writes benchmarks/results/estimate_vs_measured_cuda.json, then runs the PEFT peer
# benchmark on CUDA (benchmarks/results/peer_cuda.json). About 5-8 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); nothing to check" >&2
  exit 3
fi
"$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB, torch {torch.__version__}")'
PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} timeout 280 "$PY" benchmarks/estimate_vs_measured.py --cuda --steps 3 "$@"
echo "estimate for the article case on this GPU's memory:"
PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} "$PY" -m lorafit.cli estimate llama-3.1-8b --compare --dtype bf16 --micro-batch 1 \
  --seq-len 2048 --r 16 --targets all-linear --gpu-mem "$("$PY" -c 'import torch; print(torch.cuda.get_device_properties(0).total_memory)')B"
echo "lorafit vs PEFT on CUDA (Llama-3.2-1B shape, random weights; tokens/s and max_memory_allocated):"
PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} timeout 280 "$PY" benchmarks/peer.py --device cuda
