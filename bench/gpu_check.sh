#!/usr/bin/env bash
# The GPU check (issue 13): every CUDA path users run first, one PASS/FAIL line per path.
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
MODE_NO_PROGRESS=1 timeout 480 "$PY" -m pytest -p no:cacheprovider -v -s -rA tests/test_cuda.py >"$log" 2>&1
rc=$?
grep -E '^(peak above|bank |ALPA|resnet|Base |ALPA-train|ours|reference|speed-up|bare faiss|streamed GPU|ivf |torchrun with)' "$log" | sed 's/^/  /'
grep -E '^tests/test_cuda.py::[^ ]+ (PASSED|FAILED|ERROR|SKIPPED)' "$log" \
  | sed -E 's/^tests\/test_cuda.py::([^ ]+) (PASSED|FAILED|ERROR|SKIPPED).*/\2 \1/; s/^PASSED/PASS/; s/^FAILED|^ERROR/FAIL/'
echo "gpu_check: pytest exit $rc; full log: $log"
[ $rc -eq 0 ] || { grep -E '^E ' "$log" | head -40; exit 1; }
