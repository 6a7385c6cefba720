#!/usr/bin/env bash
# Local Redis + PostgreSQL for herald's tests, demo and benchmarks.
#
#   scripts/services.sh up      start whatever is not already listening (never restarts anything)
#   scripts/services.sh down    stop only what `up` started (recorded in a state file)
#   scripts/services.sh status  say whether each service answers (exit 0 if both do, 3 if not)
#
# Environment (defaults are what herald's DATABASE_URL / REDIS_URL defaults expect):
#   HERALD_REDIS_PORT   (6379)  Redis port on 127.0.0.1
#   HERALD_PG_PORT      (5432)  PostgreSQL port on 127.0.0.1
#   HERALD_PG_CLUSTER   (main, or "herald-<port>" if "main" already exists on another port)
#   HERALD_SERVICES_TIMEOUT (30) seconds to wait for each service to answer
#
# Progress goes to stderr, one short line per step. Debian 12 (apt, postgresql-common) assumed.
set -euo pipefail

REDIS_PORT="${HERALD_REDIS_PORT:-6379}"
PG_PORT="${HERALD_PG_PORT:-5432}"
TIMEOUT="${HERALD_SERVICES_TIMEOUT:-30}"
STATE_DIR="${XDG_RUNTIME_DIR:-/tmp}/herald-services"
REDIS_STATE="$STATE_DIR/redis-$REDIS_PORT.started"
PG_STATE="$STATE_DIR/postgres-$PG_PORT.started"
HERALD_DB="herald"

log() { echo "services: $*" >&2; }
die() { echo "services: error: $*" >&2; exit 1; }

# Run a command as root (directly, or through passwordless sudo).
as_root() {
  if [[ $EUID -eq 0 ]]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else die "need root to run: $*"
  fi
}

# Run a command as the postgres OS user.
as_postgres() {
  if [[ $(id -un) == postgres ]]; then "$@"
  elif [[ $EUID -eq 0 ]] && command -v runuser >/dev/null 2>&1; then runuser -u postgres -- "$@"
  else as_root su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
  fi
}

port_open() { timeout 2 bash -c "</dev/tcp/127.0.0.1/$1" 2>/dev/null; }

apt_updated=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install $* by hand"
  if [[ $apt_updated -eq 0 ]]; then
    log "apt-get update"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    apt_updated=1
  fi
  log "apt-get install -y $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# wait_for NAME CMD...: poll CMD until it succeeds or TIMEOUT seconds pass.
wait_for() {
  local name=$1; shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    (( SECONDS < deadline )) || die "$name did not answer within ${TIMEOUT}s"
    sleep 0.2
  done
}

# ---------------------------------------------------------------- Redis

# redis_cmd ARGS...: one command to the local Redis; prints the reply.
# Uses redis-cli when present, else a minimal inline-protocol exchange over /dev/tcp.
redis_cmd() {
  if command -v redis-cli >/dev/null 2>&1; then
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"
  else
    # Inline command; read the reply's first line, plus one more for a bulk/array reply.
    local reply more=""
    exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" || return 1
    printf '%s\r\n' "$*" >&3
    IFS= read -r -t 2 reply <&3 || { exec 3<&-; return 1; }
    case $reply in \$*|\**) IFS= read -r -t 2 more <&3 || true ;; esac
    exec 3<&-
    reply=${reply%$'\r'}
    case $reply in
      -*) echo "${reply#-}"; return 1 ;;
      [+:]*) echo "${reply:1}" ;;
      *) echo "${more%$'\r'}" ;;
    esac
  fi
}

redis_ping() { [[ $(redis_cmd PING 2>/dev/null) == PONG ]]; }

redis_policy() {
  if command -v redis-cli >/dev/null 2>&1; then
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" config get maxmemory-policy 2>/dev/null | sed -n 2p
  fi
}

redis_up() {
  if port_open "$REDIS_PORT"; then
    log "redis: already listening on 127.0.0.1:$REDIS_PORT, leaving it running"
  else
    if ! command -v redis-server >/dev/null 2>&1; then
      apt_install redis-server
    fi
    # The package's own init may have started one on the default port.
    if port_open "$REDIS_PORT"; then
      log "redis: listening on 127.0.0.1:$REDIS_PORT after install"
    else
      as_root mkdir -p /var/lib/redis /var/log/redis
      local logfile=/var/log/redis/ci.log
      [[ $REDIS_PORT == 6379 ]] || logfile=/var/log/redis/herald-$REDIS_PORT.log
      log "redis: starting redis-server on 127.0.0.1:$REDIS_PORT (no persistence)"
      as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir /var/lib/redis --logfile "$logfile" >&2
      mkdir -p "$STATE_DIR"
      echo "$REDIS_PORT" >"$REDIS_STATE"
    fi
  fi
  wait_for redis redis_ping
  # herald refuses evicting policies: a queue that silently drops keys loses jobs.
  local policy
  policy=$(redis_policy || true)
  if [[ $policy != noeviction ]]; then
    log "redis: setting maxmemory-policy noeviction (was ${policy:-unknown})"
    [[ $(redis_cmd CONFIG SET maxmemory-policy noeviction 2>&1) == OK ]] \
      || die "redis: could not set maxmemory-policy noeviction"
  fi
  log "redis: ok (127.0.0.1:$REDIS_PORT, maxmemory-policy noeviction)"
}

redis_down() {
  if [[ -f $REDIS_STATE ]]; then
    if redis_ping; then
      log "redis: shutting down 127.0.0.1:$REDIS_PORT (started by up)"
      redis_cmd SHUTDOWN NOSAVE >/dev/null 2>&1 || true
      local deadline=$((SECONDS + TIMEOUT))
      while port_open "$REDIS_PORT" && (( SECONDS < deadline )); do sleep 0.2; done
      port_open "$REDIS_PORT" && die "redis: still listening after shutdown"
    else
      log "redis: started by up but no longer answers"
    fi
    rm -f "$REDIS_STATE"
  else
    log "redis: not started by up, leaving it alone"
  fi
}

# ---------------------------------------------------------------- PostgreSQL

pg_ready() { pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; }

# Prints "<version> <name>" of the local cluster configured for PG_PORT, if any.
pg_find_cluster() {
  pg_lsclusters -h 2>/dev/null | awk -v p="$PG_PORT" '$3 == p { print $1, $2; exit }'
}

pg_latest_version() { ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1; }

# Trust for local socket and loopback TCP: a throwaway dev/CI cluster only.
pg_trust_hba() {
  local ver=$1 name=$2 hba
  hba=/etc/postgresql/$ver/$name/pg_hba.conf
  log "postgres: trust auth for local and 127.0.0.1/::1 in $hba"
  as_root cp -n "$hba" "$hba.herald-orig"
  as_root tee "$hba" >/dev/null <<'EOF'
# Written by herald scripts/services.sh for a local dev/CI cluster (original: pg_hba.conf.herald-orig).
# TYPE  DATABASE        USER            ADDRESS                 METHOD
local   all             all                                     trust
host    all             all             127.0.0.1/32            trust
host    all             all             ::1/128                 trust
local   replication     all                                     trust
host    replication     all             127.0.0.1/32            trust
host    replication     all             ::1/128                 trust
EOF
}

pg_up() {
  local fresh=0 cluster ver name
  if port_open "$PG_PORT"; then
    log "postgres: already listening on 127.0.0.1:$PG_PORT, leaving it running"
  else
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || [[ -z $(pg_latest_version) ]]; then
      apt_install postgresql
      fresh=1   # the package creates its cluster with peer/scram auth
    fi
    cluster=$(pg_find_cluster)
    if [[ -z $cluster ]]; then
      ver=$(pg_latest_version)
      [[ -n $ver ]] || die "postgres: no server version under /usr/lib/postgresql"
      name=${HERALD_PG_CLUSTER:-main}
      if [[ -z ${HERALD_PG_CLUSTER:-} && -d /etc/postgresql/$ver/main ]]; then name="herald-$PG_PORT"; fi
      log "postgres: creating cluster $ver/$name on port $PG_PORT"
      as_root pg_createcluster --port "$PG_PORT" "$ver" "$name" >/dev/null
      fresh=1
    else
      read -r ver name <<<"$cluster"
    fi
    if [[ $fresh -eq 1 ]]; then pg_trust_hba "$ver" "$name"; fi
    if port_open "$PG_PORT"; then
      # apt's postinst may have started it already: pick up the new pg_hba.conf.
      log "postgres: reloading cluster $ver/$name"
      as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" reload
    else
      log "postgres: starting cluster $ver/$name"
      as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start
      mkdir -p "$STATE_DIR"
      echo "$ver $name" >"$PG_STATE"
    fi
  fi
  if ! command -v pg_isready >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
    apt_install postgresql-client
  fi
  wait_for postgres pg_ready

  # Role root (superuser, trust over 127.0.0.1) and the databases herald's defaults name.
  local psql_root=(psql -X -q -t -A -w -h 127.0.0.1 -p "$PG_PORT" -U root -d postgres)
  if [[ $("${psql_root[@]}" -c 'select rolsuper from pg_roles where rolname = current_user' 2>/dev/null) != t ]]; then
    log "postgres: creating superuser role root"
    as_postgres psql -X -q -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 -c \
      "DO \$\$ BEGIN
         IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'root') THEN CREATE ROLE root LOGIN SUPERUSER;
         ELSE ALTER ROLE root LOGIN SUPERUSER; END IF;
       END \$\$;" >&2 \
      || die "postgres: could not create role root"
    [[ $("${psql_root[@]}" -c 'select rolsuper from pg_roles where rolname = current_user' 2>/dev/null) == t ]] \
      || die "postgres: root cannot log in over 127.0.0.1 without a password (pg_hba.conf needs trust)"
  fi
  local db
  for db in root "$HERALD_DB"; do
    if [[ -z $("${psql_root[@]}" -c "select 1 from pg_database where datname = '$db'") ]]; then
      log "postgres: creating database $db"
      "${psql_root[@]}" -c "create database \"$db\"" >/dev/null
    fi
  done
  log "postgres: ok (127.0.0.1:$PG_PORT, role root, trust)"
}

pg_down() {
  if [[ -f $PG_STATE ]]; then
    local ver name
    read -r ver name <"$PG_STATE"
    log "postgres: stopping cluster $ver/$name (started by up)"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" stop -m fast \
      || die "postgres: could not stop cluster $ver/$name (state kept in $PG_STATE)"
    rm -f "$PG_STATE"
  else
    log "postgres: not started by up, leaving it alone"
  fi
}

# ---------------------------------------------------------------- main

status() {
  local rc=0
  if redis_ping; then
    local policy
    policy=$(redis_policy || true)
    echo "redis: up (127.0.0.1:$REDIS_PORT, maxmemory-policy ${policy:-?})"
  else
    echo "redis: down (127.0.0.1:$REDIS_PORT)"; rc=3
  fi
  if command -v pg_isready >/dev/null 2>&1 && pg_ready; then
    echo "postgres: up (127.0.0.1:$PG_PORT)"
  else
    echo "postgres: down (127.0.0.1:$PG_PORT)"; rc=3
  fi
  return $rc
}

case "${1:-}" in
  up) redis_up; pg_up ;;
  down) redis_down; pg_down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
