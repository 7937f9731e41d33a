#!/usr/bin/env bash
# Set up a virtual environment in .venv with the tested versions (idempotent: skipped when
# requirements.txt has not changed since the last successful install), and, where apt is
# available as root, Debian's Fashion-MNIST (the data of the main job; no other download).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements.txt into .venv (about a minute; torch is large)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
fi
if [ "${1:-}" = "--with-fashion-mnist" ] && [ ! -f datasets/FashionMNIST/raw/train-images-idx3-ubyte.gz ] \
   && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian's dataset-fashion-mnist"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
      || echo "[setup] apt could not install dataset-fashion-mnist; the job will try torchvision's download (--download)"
  else
    echo "[setup] no apt as root: Fashion-MNIST will be fetched by torchvision (--download) into datasets/FashionMNIST"
  fi
fi
