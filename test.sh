#!/usr/bin/env bash
# Set up (see setup.sh, with the dev tools) and run the linter and the test suite on the
# CPU. Extra arguments go to pytest, e.g. `bash test.sh -m "not slow"` for a quick loop
# (`-n 0` runs in one process).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh --dev --with-fashion-mnist
.venv/bin/ruff check .
# Two pytest-xdist workers, one torch thread each (tests/conftest.py), whole modules per
# worker (their module fixtures run once): 1.25x faster than one process on 2 cores.
MODE_NO_PROGRESS=1 exec .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadscope "$@" tests
