#!/usr/bin/env bash
# The README's test command: install the project (venv), bring up the local Kafka + Redis, run lint, types
# and the whole pytest suite against them. Extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
source deploy/local/env.sh
bash deploy/local/infra.sh up
ruff check .
ruff format --check .
mypy
python -m pytest "$@"
