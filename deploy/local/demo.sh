#!/usr/bin/env bash
# The README's first command: install, bring up local Kafka + Redis, start the worker in the background
# (log: .local/worker.log), send N sample comparisons (default 20) and print their results.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
source deploy/local/env.sh
bash deploy/local/infra.sh up
mkdir -p .local
# Still the worker started here? (after a reboot the pid may be another process's)
if [ -f .local/worker.pid ] && grep -qa llm-worker "/proc/$(cat .local/worker.pid)/cmdline" 2>/dev/null; then
  echo "[demo] worker already running (pid $(cat .local/worker.pid))"
else
  MOCK_LATENCY_MS=${MOCK_LATENCY_MS:-200} MOCK_JITTER_MS=${MOCK_JITTER_MS:-100} \
    nohup llm-worker run > .local/worker.log 2>&1 &
  echo $! > .local/worker.pid
  echo "[demo] worker started (pid $(cat .local/worker.pid), log .local/worker.log)"
fi
llm-worker send -n "${1:-20}" --timeout 60
echo "[demo] the worker keeps running; stop it with: kill \$(cat .local/worker.pid)"
