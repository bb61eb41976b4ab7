#!/usr/bin/env bash
# The test command of the README and of CI: set up (system library, venv), then pytest.
# Offline and CPU only: every model and data set the tests use is made by the tests.
set -euo pipefail
cd "$(dirname "$0")"
source ./setup.sh
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 CUDA_VISIBLE_DEVICES=""
# two worker processes, each taking whole test files (their module fixtures are built once)
python -m pytest -q -n 2 --dist loadfile --durations=15 "$@"   # pytest.ini: testpaths = tests, a timeout per test
