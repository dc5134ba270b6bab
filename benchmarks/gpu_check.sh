#!/usr/bin/env bash
# The GPU path, checked on a machine with a CUDA GPU (issue 16). Prints a short table:
#   1. the device-parametrized tests (tests/test_devices.py: solvers, certificates, a model that
#      trains, quantizes and certifies; every one runs on cpu and on cuda) and the model-level API
#      tests;
#   2. one training epoch of the paper's model on the GPU, with its time and solve counts;
#   3. the solver benchmark on the GPU;
#   4. a conv operator's spectra and proved certificate (c = 64, 28 x 28) on the GPU;
#   5. torch.compile against eager for the PR iteration on the GPU.
#   bash benchmarks/gpu_check.sh            (MONQUANT_DATA must point at MNIST for step 2)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
"$PY" - <<'PYEOF'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}",
      f"({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
PYEOF
status=()
"$PY" -m pytest -q tests/test_devices.py tests/api > "$OUT/tests.txt" 2>&1
status+=("device tests: $(tail -1 "$OUT/tests.txt")")
"$PY" benchmarks/train_epoch.py --epochs 1 --device cuda --json "$OUT/epoch.json" > "$OUT/epoch.txt" 2>&1
status+=("training epoch (cuda): $(grep -E '^epoch 1:' "$OUT/epoch.txt" || tail -1 "$OUT/epoch.txt")")
"$PY" benchmarks/solvers.py --device cuda --repeats 5 > "$OUT/solvers.txt" 2>&1
status+=("solver benchmark (cuda): $(grep -c 'a=' "$OUT/solvers.txt") rows, see $OUT/solvers.txt")
"$PY" benchmarks/conv_operator.py --device cuda --repeats 3 > "$OUT/conv.txt" 2>&1
status+=("conv certificate (cuda): $(grep -E '^proved certificate' "$OUT/conv.txt" || tail -1 "$OUT/conv.txt")")
"$PY" benchmarks/pr_compile.py --device cuda > "$OUT/compile.txt" 2>&1
status+=("torch.compile (cuda): $(grep -E 'torch.compile ' "$OUT/compile.txt" || tail -1 "$OUT/compile.txt")")
printf '%s\n' "${status[@]}"
