#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite on the CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh --with-fashion-mnist
MODE_NO_PROGRESS=1 exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
