#!/usr/bin/env bash
# Set up a virtual environment in .venv with the tested versions (idempotent: skipped when
# the requirements have not changed since the last successful install), install this
# checkout into it in editable mode (so `python ALPA/main_supcon.py` imports ALPA/, CSD/,
# util/ without touching sys.path), and, where apt is available as root, Debian's
# Fashion-MNIST (the data of the main job; no other download), linked into datasets/.
#   bash setup.sh [--dev] [--with-fashion-mnist]     --dev adds pytest, hypothesis, ruff
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
dev=0; fmnist=0
for a in "$@"; do
  case "$a" in --dev) dev=1 ;; --with-fashion-mnist) fmnist=1 ;; *) echo "setup.sh: unknown option $a" >&2; exit 2 ;; esac
done
req=requirements.txt; [ $dev = 1 ] && req=requirements-dev.txt
stamp=.venv/.requirements.sha256
want=$(cat "$req" requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing $req into .venv (about a minute; torch is large)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi
if [ $fmnist = 1 ] && [ ! -f datasets/FashionMNIST/raw/train-images-idx3-ubyte.gz ]; then
  debian=/usr/share/datasets/fashion-mnist
  if [ ! -f $debian/train-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "[setup] installing Debian's dataset-fashion-mnist"
      apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
        || echo "[setup] apt could not install dataset-fashion-mnist; the job will try torchvision's download (--download)"
    else
      echo "[setup] no apt as root: Fashion-MNIST will be fetched by torchvision (--download) into datasets/FashionMNIST"
    fi
  fi
  if [ -f $debian/train-images-idx3-ubyte.gz ]; then
    mkdir -p datasets/FashionMNIST/raw
    for f in $debian/*-ubyte.gz; do ln -sf "$f" datasets/FashionMNIST/raw/; done
  fi
fi
