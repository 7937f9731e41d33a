#!/usr/bin/env bash
# The main job: set up, then MODE on Fashion-MNIST (ID classes 0-5) with no download —
# trains Base, ALPA-finetune and ALPA-train, scores KNN and CSD, prints the tables and
# writes figures to runs/fmnist/figures/. Extra arguments go to experiments/mode_fmnist.py;
# `bash demo.sh --released` trains nothing: it scores the released checkpoints
# (checkpoints/manifest.json) with the same tables and figures, in runs/fmnist_released/.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh --with-fashion-mnist
exec .venv/bin/python experiments/mode_fmnist.py --seeds 0 --figures "$@"
