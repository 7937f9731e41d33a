#!/usr/bin/env bash
# Test-time MODE on CIFAR: collect features once, then print the KNN and CSD tables.
#   CKP=path/to/last.pth ARCH=resnet18-supcon bash demo_cifar.sh
#   IN=CIFAR-100 CKP=path/to/last.pth ARCH=resnet34-supcon bash demo_cifar.sh
# Variables: IN (CIFAR-10), CKP (required), ARCH (read from the checkpoint if unset),
# NAME (run name), DATA (./datasets), OOD (SVHN places365 LSUN iSUN dtd), K_KNN (50 for
# CIFAR-10, 200 for CIFAR-100, as Sun et al.), K_CSD (10), CACHE (./cache), RESULTS
# (./results), PY (python: .venv/bin/python when present).
set -euo pipefail
cd "$(dirname "$0")"
IN=${IN:-CIFAR-10}
DATA=${DATA:-datasets}
OOD=${OOD:-"SVHN places365 LSUN iSUN dtd"}
case "$IN" in CIFAR-100|cifar100) K_KNN=${K_KNN:-200} ;; *) K_KNN=${K_KNN:-50} ;; esac
K_CSD=${K_CSD:-10}
if [ -z "${PY:-}" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
if [ -z "${CKP:-}" ]; then
  echo "error: set CKP to a checkpoint, e.g. CKP=save/SupCon/cifar10_models/<run>/last.pth bash demo_cifar.sh" >&2
  exit 2
fi
if [ ! -f "$CKP" ]; then
  echo "error: checkpoint $CKP does not exist: check CKP" >&2
  exit 2
fi
NAME=${NAME:-$(basename "$(dirname "$CKP")")}
ARGS=(--in-dataset "$IN" --name "$NAME" --ckp "$CKP" --data-root "$DATA" --out-datasets $OOD
      --cache-dir "${CACHE:-cache}")
[ -n "${ARCH:-}" ] && ARGS+=(--model-arch "$ARCH")
"$PY" CSD/feature_collect.py "${ARGS[@]}"
"$PY" CSD/CSD.py "${ARGS[@]}" --method knn csd --k "$K_KNN" "$K_CSD" --output-dir "${RESULTS:-results}"
