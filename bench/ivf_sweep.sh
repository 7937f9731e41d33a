#!/usr/bin/env bash
# IVF recall against speed on real features: one checkpoint's cached store, exact torch search
# first, then --search ivf at each nprobe; every run prints its time in the table titles and,
# for ivf, recall@k and the FPR/AUROC change against exact search on a 1,000-image sample.
#   bash bench/ivf_sweep.sh CKP OUT [NPROBE ...]      (default nprobe 1 4 32)
#   bash bench/ivf_sweep.sh checkpoints/fmnist_Base_seed0.pth runs/ivf_sweep
set -euo pipefail
ckp=$1; out=$2; shift 2
probes=("${@:-1 4 32}")
py=${PYTHON:-.venv/bin/python}
common=(--in-dataset fashion-mnist --ckp "$ckp" --method knn csd --dtype fp32 --num-workers 1
        --out-datasets fashion-mnist-heldout digits --cache-dir "$out/cache" --output-dir "$out/results")
"$py" CSD/CSD.py "${common[@]}" --search torch
for p in ${probes[@]}; do
  "$py" CSD/CSD.py "${common[@]}" --search ivf --ivf-nprobe "$p"
done
