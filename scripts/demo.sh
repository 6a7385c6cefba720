#!/usr/bin/env bash
# make demo: the daily VA assignment end to end, on this machine.
#
# Starts (or reuses) Redis and PostgreSQL, builds the binaries, migrates, creates a demo tenant
# (reused on later runs), starts the local Airtable fake and a small worker fleet, seeds
# generated profiles, runs `herald assign --wait` with its progress bar, and prints what landed
# in the fake, table by table. Everything it started is stopped on exit (Ctrl-C included).
#
# Knobs (environment):
#   DEMO_PROFILES   (15000) generated profiles added to the pool
#   DEMO_TABLES     (80)    VA tables (Airtable tables Daily_Outreach_Table_01 …)
#   DEMO_PER_TABLE  (180)   positions per table; the campaign takes DEMO_TABLES × DEMO_PER_TABLE
#   DEMO_RPS        (50)    the fake's (and herald's) Airtable limit, requests/s per base,
#                           raised from Airtable's real 5 so the demo takes well under a minute;
#                           5 is Airtable's real limit: 1,800 records = 180 requests ≈ 36 s
#   DEMO_WORKERS    (2)     herald-worker processes
#   DEMO_DATE       (next free day)  the campaign's date, YYYY-MM-DD
#   DEMO_FRESH      (1)     0: reuse the demo tenant recorded by the last run (its next free day)
#   HERALD_DATABASE_URL (postgres://root@127.0.0.1:5432/herald)   REDIS_URL (redis://127.0.0.1:6379)
#
# The defaults are the seed's full day: 15,000 profiles, 14,400 assigned to 80 tables × 180,
# 600 left unused (≈ 29 s of sync at 50 req/s). At Airtable's real limit (≈ 288 s):
#   DEMO_RPS=5 make demo
# A quick look: DEMO_PROFILES=2000 DEMO_TABLES=10 make demo
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

PROFILES="${DEMO_PROFILES:-15000}"
TABLES="${DEMO_TABLES:-80}"
PER_TABLE="${DEMO_PER_TABLE:-180}"
RPS="${DEMO_RPS:-50}"
WORKERS="${DEMO_WORKERS:-2}"
FRESH="${DEMO_FRESH:-1}"
DB_URL="${HERALD_DATABASE_URL:-postgres://root@127.0.0.1:5432/herald}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
NAMESPACE="herald-demo"
AIRTABLE_TOKEN="patHeraldDemoToken"
AIRTABLE_BASE="appHeraldDemo"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
BIN="$TARGET_DIR/release"
STATE_DIR="$TARGET_DIR/demo"
STATE_FILE="$STATE_DIR/tenant.env"

say() { printf '\033[1mdemo:\033[0m %s\n' "$*" >&2; }
die() { printf 'demo: error: %s\n' "$*" >&2; exit 1; }

for knob in PROFILES TABLES PER_TABLE RPS WORKERS; do
  [[ ${!knob} =~ ^[1-9][0-9]*$ ]] || die "DEMO_$knob must be a whole number ≥ 1, got '${!knob}'"
done
(( TABLES <= 99 )) || die "DEMO_TABLES must be 1 to 99"
TARGET=$((TABLES * PER_TABLE))
# Herald paces itself under the token limit too; Airtable's is 50 req/s.
TOKEN_RPS=$(( RPS > 50 ? RPS : 50 ))

command -v cargo >/dev/null 2>&1 ||
  die "cargo not found: install Rust from https://rustup.rs, then run make demo again"

# ------------------------------------------------------------------ processes we start

PIDS=()
stop_all() {
  local status=$?
  trap - EXIT INT TERM
  if ((${#PIDS[@]})); then
    say "stopping the workers and the Airtable fake"
    kill -TERM "${PIDS[@]}" 2>/dev/null || true
    local deadline=$((SECONDS + 15))
    for pid in "${PIDS[@]}"; do
      while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
      kill -KILL "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    done
  fi
  exit "$status"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

# http_get HOST:PORT PATH: the body of a GET (curl when present, else bash's /dev/tcp).
http_get() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS "http://$1$2"
  else
    local reply
    exec 3<>"/dev/tcp/${1%:*}/${1##*:}"
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$2" "$1" >&3
    reply=$(cat <&3)
    exec 3<&-
    printf '%s' "${reply#*$'\r\n\r\n'}"
  fi
}

# ------------------------------------------------------------------ services, build, schema

say "Redis and PostgreSQL (started if not running)"
scripts/services.sh up

say "building herald, herald-worker and herald-fake-airtable (release; the first build takes a few minutes)"
cargo build --release --locked -q -p herald-cli -p herald-worker -p herald-fakes --bins
for bin in herald herald-worker herald-fake-airtable; do
  [[ -x "$BIN/$bin" ]] || die "missing $BIN/$bin after the build"
done

export DATABASE_URL="$DB_URL" REDIS_URL HERALD_NAMESPACE="$NAMESPACE"
herald() { "$BIN/herald" "$@"; }

say "migrating $(printf '%s' "$DB_URL" | sed -E 's#//[^@/]*@#//#')"
herald migrate >/dev/null

# ------------------------------------------------------------------ the demo tenant

mkdir -p "$STATE_DIR"
TENANT=""
if [[ $FRESH != 1 && -f $STATE_FILE ]]; then
  TENANT=$(sed -n 's/^TENANT=//p' "$STATE_FILE")
  if [[ -n $TENANT ]] && herald profiles stats --tenant "$TENANT" >/dev/null 2>&1; then
    say "reusing demo tenant $TENANT (from $STATE_FILE; DEMO_FRESH=1 for a new one)"
  else
    TENANT=""
  fi
fi
if [[ -z $TENANT ]]; then
  created=$(herald tenant create "demo-$(date +%Y%m%d-%H%M%S)")
  TENANT=$(printf '%s\n' "$created" | sed -n 's/^tenant \([0-9a-f-]*\) created.*/\1/p')
  [[ -n $TENANT ]] || die "could not read the tenant id from: $created"
  printf 'TENANT=%s\n' "$TENANT" >"$STATE_FILE"
  say "created demo tenant $TENANT"
fi

# The campaign's day: DEMO_DATE, else today, else (today's already done) the day after the
# tenant's latest campaign — one campaign per tenant and day.
today=$(date -u +%F)
latest=$(herald campaigns --tenant "$TENANT" | awk 'NR > 1 && $1 ~ /^[0-9]{4}-/ { print $1 }' | sort | tail -n 1)
if [[ -n ${DEMO_DATE:-} ]]; then
  DAY=$DEMO_DATE
elif [[ -z $latest || $latest < $today ]]; then
  DAY=$today
else
  DAY=$(date -u -d "$latest + 1 day" +%F)
fi

# ------------------------------------------------------------------ Airtable fake and workers

if (( RPS > 5 )); then
  say "starting the Airtable fake: $RPS requests/s per base (raised from Airtable's 5 so the demo takes well under a minute; DEMO_RPS=5 for the real limit), $TOKEN_RPS per token, 30 s lock-out after a 429"
else
  say "starting the Airtable fake: $RPS requests/s per base (Airtable's real limit), $TOKEN_RPS per token, 30 s lock-out after a 429"
fi
"$BIN/herald-fake-airtable" --addr 127.0.0.1:0 --per-base-rps "$RPS" --per-token-rps "$TOKEN_RPS" \
  --token "$AIRTABLE_TOKEN" --base "$AIRTABLE_BASE" \
  >"$STATE_DIR/fake-airtable.out" 2>"$STATE_DIR/fake-airtable.log" &
PIDS+=($!)
FAKE=""
for _ in $(seq 100); do
  FAKE=$(sed -n 's#^listening on http://##p' "$STATE_DIR/fake-airtable.out")
  [[ -n $FAKE ]] && break
  kill -0 "${PIDS[-1]}" 2>/dev/null || { tail -n 20 "$STATE_DIR/fake-airtable.log" >&2; die "the Airtable fake exited"; }
  sleep 0.1
done
[[ -n $FAKE ]] || die "the Airtable fake did not start (see $STATE_DIR/fake-airtable.log)"
say "Airtable fake at http://$FAKE"

say "starting $WORKERS herald-worker process(es) on every queue (logs: $STATE_DIR/worker-N.log)"
for n in $(seq "$WORKERS"); do
  AIRTABLE_API_URL="http://$FAKE" AIRTABLE_TOKEN="$AIRTABLE_TOKEN" AIRTABLE_BASE_ID="$AIRTABLE_BASE" \
  HERALD_AIRTABLE_BASE_RPS="$RPS" HERALD_AIRTABLE_TOKEN_RPS="$TOKEN_RPS" \
    "$BIN/herald-worker" --queues all --metrics-addr 127.0.0.1:0 >"$STATE_DIR/worker-$n.log" 2>&1 &
  PIDS+=($!)
done
sleep 1
for pid in "${PIDS[@]}"; do
  if ! kill -0 "$pid" 2>/dev/null; then
    for log in "$STATE_DIR"/worker-*.log; do tail -n 5 "$log" >&2; done
    die "a worker exited at start-up (logs above)"
  fi
done

# ------------------------------------------------------------------ profiles and the assignment

from=$(herald profiles stats --tenant "$TENANT" | awk '/^pool:/ { print $2 }')
say "seeding $PROFILES generated profiles"
herald seed profiles "$PROFILES" --from "${from:-0}" --tenant "$TENANT" | sed 's/^/  /'

sync_secs=$(( (TARGET + 9) / 10 / RPS ))
say "assigning $TARGET profiles for $DAY: $TABLES tables × $PER_TABLE, synced 10 records per request at $RPS req/s (≈ ${sync_secs} s)"
started=$SECONDS
if ! herald assign --tenant "$TENANT" --date "$DAY" --target "$TARGET" --tables "$TABLES" \
  --per-table "$PER_TABLE" --wait; then
  for log in "$STATE_DIR"/worker-*.log; do echo "--- $log" >&2; tail -n 10 "$log" >&2; done
  die "the assignment did not complete (worker logs above)"
fi
elapsed=$((SECONDS - started))

# ------------------------------------------------------------------ what Airtable holds

tables_json=$(http_get "$FAKE" "/__fake/bases/$AIRTABLE_BASE/tables")
stats_json=$(http_get "$FAKE" "/__fake/stats")
echo
echo "Airtable (the fake at http://$FAKE, base $AIRTABLE_BASE):"
printf '%s' "$tables_json" | grep -o '"name":"[^"]*","records":[0-9]*' |
  sed 's/"name":"\([^"]*\)","records":\([0-9]*\)/\1 \2/' |
  awk '{ printf "  %s %5d%s", $1, $2, (NR % 3 == 0 ? "\n" : "   "); total += $2; tables++ }
       END { if (NR % 3) printf "\n"; printf "  %d records in %d tables\n", total, tables }'
requests=$(printf '%s' "$stats_json" | grep -o '"requests":[0-9]*' | head -n 1 | cut -d: -f2)
limited=$(printf '%s' "$stats_json" | grep -o '"rate_limited":[0-9]*' | head -n 1 | cut -d: -f2)
echo "  $requests requests, $limited answered 429"
herald profiles stats --tenant "$TENANT" | sed 's/^/  /'
echo
say "done in ${elapsed}s. Again: make demo · at Airtable's real 5 req/s: DEMO_RPS=5 make demo"
