#!/usr/bin/env bash
# make bench-queue: herald's queue against BullMQ on the same Redis, in the same run.
#
#   scripts/bench-queue.sh            (JOBS=100000 IDLE_SAMPLES=200 REDIS_URL=redis://127.0.0.1:6379)
#
# Runs, one after another: herald at concurrency 1 and 50 (bulk enqueue + drain of JOBS no-op
# jobs by one worker process), BullMQ the same (bench/bullmq/bench.mjs), then herald's idle
# pickup latency. Prints a table and ends with `bench: <name> <value> <unit>` lines.
# Retention is the same on both sides: BullMQ with removeOnComplete/removeOnFail true, herald
# with no completed jobs kept (herald-bench --keep-completed 0); both keep dedupe state.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
JOBS="${JOBS:-100000}"
IDLE_SAMPLES="${IDLE_SAMPLES:-200}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET_DIR/release/herald-bench"

log() { echo "bench-queue: $*" >&2; }

log "building herald-bench (release)"
cargo build --release --locked -q -p herald-bench
[[ -x "$BIN" ]] || { log "missing $BIN"; exit 1; }

# value KEY FILE: the value of `<who>: KEY <value>` in FILE.
value() { awk -v k="$2" '$2 == k { v = $3 } END { if (v == "") exit 1; print v }' "$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

for c in 1 50; do
  log "herald: $JOBS jobs, concurrency $c"
  "$BIN" --redis "$REDIS_URL" --jobs "$JOBS" --concurrency "$c" | tee "$tmp/herald-c$c" >&2
  log "bullmq: $JOBS jobs, concurrency $c"
  scripts/bench-bullmq.sh --redis "$REDIS_URL" --jobs "$JOBS" --concurrency "$c" \
    --prefix "herald-bench-bullmq-$$-$c" | tee "$tmp/bullmq-c$c" >&2
done
log "herald: idle pickup, $IDLE_SAMPLES samples"
"$BIN" --redis "$REDIS_URL" --jobs 0 --idle-samples "$IDLE_SAMPLES" | tee "$tmp/idle" >&2

h_enq1=$(value "$tmp/herald-c1" enqueue_jobs_per_sec)
h_enq50=$(value "$tmp/herald-c50" enqueue_jobs_per_sec)
b_enq1=$(value "$tmp/bullmq-c1" enqueue_jobs_per_sec)
b_enq50=$(value "$tmp/bullmq-c50" enqueue_jobs_per_sec)
h_p1=$(value "$tmp/herald-c1" process_jobs_per_sec)
h_p50=$(value "$tmp/herald-c50" process_jobs_per_sec)
b_p1=$(value "$tmp/bullmq-c1" process_jobs_per_sec)
b_p50=$(value "$tmp/bullmq-c50" process_jobs_per_sec)
p50=$(value "$tmp/idle" idle_pickup_p50_ms)
p99=$(value "$tmp/idle" idle_pickup_p99_ms)
# Enqueue: the better of each side's two runs (both are the same bulk enqueue of JOBS jobs).
h_enq=$(awk -v a="$h_enq1" -v b="$h_enq50" 'BEGIN { print (a > b ? a : b) }')
b_enq=$(awk -v a="$b_enq1" -v b="$b_enq50" 'BEGIN { print (a > b ? a : b) }')

printf '\n%-28s %14s %14s %8s\n' "figure ($JOBS jobs)" herald bullmq ratio
printf '%-28s %14s %14s %7sx\n' "bulk enqueue jobs/s" "$h_enq" "$b_enq" "$(ratio "$h_enq" "$b_enq")"
printf '%-28s %14s %14s %7sx\n' "process jobs/s, c=1" "$h_p1" "$b_p1" "$(ratio "$h_p1" "$b_p1")"
printf '%-28s %14s %14s %7sx\n' "process jobs/s, c=50" "$h_p50" "$b_p50" "$(ratio "$h_p50" "$b_p50")"
printf '%-28s %14s\n' "idle pickup p50 / p99 ms" "$p50 / $p99"
echo
echo "bench: herald_enqueue $h_enq jobs/s"
echo "bench: bullmq_enqueue $b_enq jobs/s"
echo "bench: enqueue_ratio_vs_bullmq $(ratio "$h_enq" "$b_enq") x"
echo "bench: herald_process_c1 $h_p1 jobs/s"
echo "bench: bullmq_process_c1 $b_p1 jobs/s"
echo "bench: process_ratio_vs_bullmq_c1 $(ratio "$h_p1" "$b_p1") x"
echo "bench: herald_process_c50 $h_p50 jobs/s"
echo "bench: bullmq_process_c50 $b_p50 jobs/s"
echo "bench: process_ratio_vs_bullmq_c50 $(ratio "$h_p50" "$b_p50") x"
echo "bench: idle_pickup_p50 $p50 ms"
echo "bench: idle_pickup_p99 $p99 ms"
