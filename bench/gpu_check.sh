#!/usr/bin/env bash
# The GPU check: every CUDA path users run first, one PASS/FAIL/SKIP line per test.
# At most ~8 minutes on one GPU. Run it from the repository root on a CUDA machine:
#     bash bench/gpu_check.sh            # uses .venv/bin/python when present
# Without CUDA it says so and exits 0. The checks themselves are tests/test_cuda.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA here (torch.cuda.is_available() is False); nothing to check."
  "$PY" -c 'from util.misc import nvidia_device_present, CUDA_HELP; nvidia_device_present() and print("gpu_check: but an NVIDIA GPU is present:", CUDA_HELP)' 2>/dev/null
  exit 0
fi
"$PY" - <<'PYEOF'
import torch, faiss, platform
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: {torch.cuda.device_count()} x {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB), "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}), faiss {faiss.__version__} "
      f"(GPUs seen by faiss: {faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0}), Python {platform.python_version()}")
PYEOF
log=$(mktemp)
# -rA: a summary line per test; no -s, so printed figures go to pytest's PASSES section and
# the -v progress lines stay one per test (bench/pytest_results.py reads both).
MODE_NO_PROGRESS=1 timeout 480 "$PY" -m pytest -p no:cacheprovider -v -rA tests/test_cuda.py >"$log" 2>&1
rc=$?
grep -E '^(sm_|peak |bank |ALPA|resnet|Base |ALPA-train|ours|reference|speed-up|bare faiss|streamed GPU|ivf |torchrun with)' "$log" | sed 's/^/  /'
"$PY" bench/pytest_results.py "$log"
parsed=$?
echo "gpu_check: pytest exit $rc; full log: $log"
[ $rc -eq 0 ] && [ $parsed -eq 0 ] || { grep -E '^E ' "$log" | head -40; exit 1; }
