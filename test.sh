#!/usr/bin/env bash
# Set up (see setup.sh, with the dev tools) and run the linter and the test suite on the
# CPU. Extra arguments go to pytest, e.g. `bash test.sh -m "not slow"` for a quick loop.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh --dev --with-fashion-mnist
.venv/bin/ruff check .
MODE_NO_PROGRESS=1 exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
