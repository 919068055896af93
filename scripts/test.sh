#!/usr/bin/env bash
# Set everything up, start a throw-away PostgreSQL for the integration tests, run the test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k search).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh || exit 1
# shellcheck disable=SC1091
source "${POCKETFLOW_VENV:-$ROOT/.venv}/bin/activate"

if url="$(bash scripts/postgres.sh start)"; then
  export POCKETFLOW_TEST_PG_URL="$url"
  trap 'bash scripts/postgres.sh stop' EXIT
else
  echo "[test] PostgreSQL could not be started: PostgreSQL tests will be skipped" >&2
fi

python -m pytest -ra "$@"
rc=$?
if [ "$rc" = 5 ]; then
  echo "[test] pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
