#!/usr/bin/env bash
# BullMQ peer benchmark (see bench/bullmq/README.md). Arguments go to bench.mjs, e.g.
#   scripts/bench-bullmq.sh --redis redis://127.0.0.1:6379 --jobs 100000 --concurrency 50 --prefix bq-$$
# The last two lines printed are `bullmq: enqueue_jobs_per_sec <f>` and `bullmq: process_jobs_per_sec <f>`.
set -euo pipefail

dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/../bench/bullmq" && pwd)"
command -v node >/dev/null 2>&1 || { echo "bench-bullmq: node not found (Node 20+ needed)" >&2; exit 1; }
command -v npm >/dev/null 2>&1 || { echo "bench-bullmq: npm not found" >&2; exit 1; }

if [[ ! -d "$dir/node_modules/bullmq" ]]; then
  echo "bench-bullmq: installing npm dependencies (npm ci) in bench/bullmq" >&2
  (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error </dev/null >&2)
fi

exec node "$dir/bench.mjs" "$@"
