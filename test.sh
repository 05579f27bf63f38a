#!/usr/bin/env bash
# The test suite: installs what is missing, then runs every tier this machine supports
# (tier 0 always, tier 1 through the Triton interpreter without a GPU, tier 2 with one).
#   bash test.sh                 everything
#   bash test.sh -m "not slow"   any pytest arguments
set -euo pipefail
cd "$(dirname "$0")"
bash install.sh
exec ${PYTHON:-python3} -m pytest -q "$@"
