#!/usr/bin/env bash
# Real peers for the tests: an OpenAI-compatible server (LiteLLM proxy with mock models), two
# OTLP receivers (Arize Phoenix, queryable over REST; Rotel, which prints every span it gets) and
# PostgreSQL (for `hyperfunc::memory`, feature `postgres`).
#   ci/peers.sh install   # venvs under $HYPERFUNC_PEERS (default ~/.hyperfunc-peers), pinned versions;
#                         # PostgreSQL from apt when /usr/lib/postgresql/*/bin/initdb is missing
#   ci/peers.sh start     # starts the servers on 127.0.0.1, waits until they answer, prints env
#   ci/peers.sh stop      # stops what `start` started, by pid
set -euo pipefail
PEERS="${HYPERFUNC_PEERS:-$HOME/.hyperfunc-peers}"
HERE="$(cd "$(dirname "$0")" && pwd)"
LITELLM_VERSION="1.106.2"
LITELLM_PORT="${HYPERFUNC_LITELLM_PORT:-4000}"
PHOENIX_VERSION="20.26.1"
ROTEL_VERSION="0.0.1a15"
PHOENIX_HTTP_PORT=6006    # REST API and OTLP/HTTP (protobuf) at /v1/traces
PHOENIX_GRPC_PORT=4317    # OTLP/gRPC
ROTEL_GRPC_PORT=14317
ROTEL_HTTP_PORT=14318
PG_PORT="${HYPERFUNC_PG_PORT:-54329}"
mkdir -p "$PEERS"

install() {
  if [ ! -x "$PEERS/tools/bin/uv" ]; then
    python3 -m venv "$PEERS/tools"
    "$PEERS/tools/bin/pip" install -q uv
  fi
  local uv="$PEERS/tools/bin/uv"
  if [ ! -x "$PEERS/venv-litellm/bin/litellm" ]; then
    "$uv" venv -q "$PEERS/venv-litellm"
    "$uv" pip install -q -p "$PEERS/venv-litellm/bin/python" "litellm[proxy]==$LITELLM_VERSION"
  fi
  if [ ! -x "$PEERS/venv-phoenix/bin/phoenix" ]; then
    "$uv" venv -q "$PEERS/venv-phoenix"
    "$uv" pip install -q -p "$PEERS/venv-phoenix/bin/python" "arize-phoenix==$PHOENIX_VERSION"
  fi
  if [ ! -d "$PEERS/venv-rotel" ]; then
    "$uv" venv -q "$PEERS/venv-rotel"
    "$uv" pip install -q -p "$PEERS/venv-rotel/bin/python" "rotel==$ROTEL_VERSION"
  fi
  if [ -z "$(pg_bin)" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q postgresql >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }
  fi
  # The web page's tests drive headless Chromium through chromedriver (tests/it/ui.rs).
  if ! command -v chromedriver >/dev/null || [ ! -x /usr/bin/chromium ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
  fi
}

# PostgreSQL: the newest installed server's bin directory (empty when none is installed).
pg_bin() {
  local initdb
  initdb="$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)"
  [ -n "$initdb" ] && dirname "$initdb"
}

# Runs a PostgreSQL tool as the `postgres` OS user when we are root (initdb and the server refuse
# root), from a directory that user can read.
as_pg() {
  if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# The cluster's folder (data/, sock/, postgres.log), owned by the postgres user: $PEERS/pgdata,
# unless that user cannot reach $PEERS (under a 0700 home, as root), then one in its own home.
pg_home() {
  if [ -n "${HYPERFUNC_PG_DIR:-}" ]; then echo "$HYPERFUNC_PG_DIR"
  elif [ "$(id -u)" != 0 ] || as_pg test -x "$PEERS"; then echo "$PEERS/pgdata"
  else echo "$(getent passwd postgres | cut -d: -f6)/hyperfunc-peers"; fi
}

start_postgres() {
  local bin home
  bin="$(pg_bin)"; home="$(pg_home)"
  mkdir -p "$home/data" "$home/sock"
  if [ "$(id -u)" = 0 ]; then chown -R postgres:postgres "$home"; fi
  chmod 700 "$home/data"
  if [ ! -s "$home/data/PG_VERSION" ]; then
    as_pg "$bin/initdb" -D "$home/data" -U postgres --auth-local=trust \
      --auth-host=scram-sha-256 --no-sync >"$PEERS/postgres-init.log" 2>&1 \
      || { echo "initdb failed; log follows" >&2; cat "$PEERS/postgres-init.log" >&2; return 1; }
  fi
  if as_pg "$bin/pg_ctl" -D "$home/data" status >/dev/null 2>&1; then
    echo "postgres already running ($home)"
  else
    if "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
      echo "port $PG_PORT already answers: stop that server first" >&2; return 1
    fi
    as_pg "$bin/pg_ctl" -D "$home/data" -l "$home/postgres.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $home/sock -c fsync=off" start >/dev/null \
      || { echo "postgres did not start; log follows" >&2; cat "$home/postgres.log" >&2; return 1; }
  fi
  for _ in $(seq 1 300); do "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break; sleep 0.1; done
  "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" \
    || { echo "postgres did not answer on $PG_PORT" >&2; cat "$home/postgres.log" >&2; return 1; }
  local psql=(as_pg "$bin/psql" -h "$home/sock" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qtA)
  if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'hyperfunc'")" != 1 ]; then
    "${psql[@]}" -c "CREATE ROLE hyperfunc LOGIN PASSWORD 'hyperfunc'" >/dev/null
  fi
  if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'hyperfunc_test'")" != 1 ]; then
    "${psql[@]}" -c "CREATE DATABASE hyperfunc_test OWNER hyperfunc" >/dev/null
  fi
  echo "postgres ready on 127.0.0.1:$PG_PORT"
}

stop_postgres() {
  local bin home
  bin="$(pg_bin)"; home="$(pg_home)"
  [ -n "$bin" ] && [ -s "$home/data/PG_VERSION" ] || return 0
  if as_pg "$bin/pg_ctl" -D "$home/data" status >/dev/null 2>&1; then
    as_pg "$bin/pg_ctl" -D "$home/data" stop -m fast -w >/dev/null
    echo "stopped postgres"
  fi
}

rotel_bin() { find "$PEERS/venv-rotel" -name rotel-agent -type f | head -1; }

# launch NAME DIR CMD...: starts CMD in DIR in its own session (so `stop` ends its children too);
# it writes its own pid (= the process group) before becoming the server.
launch() {
  local name="$1" dir="$2"; shift 2
  rm -f "$PEERS/$name.pid"
  # Every fd of the background job goes to the log: a caller reading our stdout through a pipe
  # (`eval "$(ci/peers.sh start)"`) must see EOF when this script ends, not when the server does.
  (cd "$dir" && exec setsid sh -c 'echo $$ >"$0"; exec "$@"' "$PEERS/$name.pid" "$@") \
    </dev/null >"$PEERS/$name.log" 2>&1 &
  for _ in $(seq 1 50); do [ -s "$PEERS/$name.pid" ] && break; sleep 0.1; done
}

running() { [ -f "$PEERS/$1.pid" ] && kill -0 "$(cat "$PEERS/$1.pid")" 2>/dev/null; }

wait_for() { # url, pidfile, name, seconds
  local url="$1" pid; pid="$(cat "$2")"
  for _ in $(seq 1 $(( $4 * 10 ))); do
    if curl -fsS -o /dev/null "$url" 2>/dev/null; then echo "$3 ready at $url"; return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then echo "$3 exited; log follows" >&2; cat "$PEERS/$3.log" >&2; return 1; fi
    sleep 0.1
  done
  echo "$3 did not answer at $url within $4 s" >&2; cat "$PEERS/$3.log" >&2; return 1
}

start() {
  install
  if running litellm; then
    echo "litellm already running (pid $(cat "$PEERS/litellm.pid"))"
  else
    if curl -fsS -o /dev/null "http://127.0.0.1:$LITELLM_PORT/health/liveliness" 2>/dev/null; then
      echo "port $LITELLM_PORT already answers: stop that server first" >&2; return 1
    fi
    LITELLM_RATE_LIMIT_WINDOW_SIZE=5 LITELLM_TELEMETRY=False launch litellm "$HERE/litellm" \
      "$PEERS/venv-litellm/bin/litellm" --config config.yaml --host 127.0.0.1 \
      --port "$LITELLM_PORT" --num_workers 1
  fi
  if ! running phoenix; then
    rm -rf "$PEERS/phoenix-data" && mkdir -p "$PEERS/phoenix-data"
    PHOENIX_HOST=127.0.0.1 PHOENIX_PORT=$PHOENIX_HTTP_PORT PHOENIX_GRPC_PORT=$PHOENIX_GRPC_PORT \
      PHOENIX_WORKING_DIR="$PEERS/phoenix-data" PHOENIX_TELEMETRY_ENABLED=false \
      launch phoenix "$PEERS" "$PEERS/venv-phoenix/bin/phoenix" serve
  fi
  if ! running rotel; then
    launch rotel "$PEERS" "$(rotel_bin)" start \
      --otlp-grpc-endpoint "127.0.0.1:$ROTEL_GRPC_PORT" --otlp-http-endpoint "127.0.0.1:$ROTEL_HTTP_PORT" \
      --exporter blackhole --debug-log traces --debug-log-verbosity detailed
  fi
  wait_for "http://127.0.0.1:$LITELLM_PORT/health/liveliness" "$PEERS/litellm.pid" litellm 120
  wait_for "http://127.0.0.1:$PHOENIX_HTTP_PORT/healthz" "$PEERS/phoenix.pid" phoenix 120
  for _ in $(seq 1 100); do (echo >/dev/tcp/127.0.0.1/$ROTEL_HTTP_PORT) 2>/dev/null && break; sleep 0.1; done
  (echo >/dev/tcp/127.0.0.1/$ROTEL_HTTP_PORT) 2>/dev/null || { echo "rotel did not start" >&2; cat "$PEERS/rotel.log" >&2; return 1; }
  echo "rotel ready on $ROTEL_GRPC_PORT/$ROTEL_HTTP_PORT"
  start_postgres
  echo "export HYPERFUNC_LLM_URL=http://127.0.0.1:$LITELLM_PORT/v1"
  echo "export HYPERFUNC_PHOENIX_URL=http://127.0.0.1:$PHOENIX_HTTP_PORT"
  echo "export HYPERFUNC_PHOENIX_GRPC=http://127.0.0.1:$PHOENIX_GRPC_PORT"
  echo "export HYPERFUNC_ROTEL_GRPC=http://127.0.0.1:$ROTEL_GRPC_PORT"
  echo "export HYPERFUNC_ROTEL_HTTP=http://127.0.0.1:$ROTEL_HTTP_PORT"
  echo "export HYPERFUNC_ROTEL_LOG=$PEERS/rotel.log"
  echo "export HYPERFUNC_PG_URL=postgres://hyperfunc:hyperfunc@127.0.0.1:$PG_PORT/hyperfunc_test"
}

stop() {
  for name in litellm phoenix rotel; do
    if [ -f "$PEERS/$name.pid" ]; then
      pid="$(cat "$PEERS/$name.pid")"
      # The server leads its own process group: stop the group (workers included).
      kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$PEERS/$name.pid"
      echo "stopped $name ($pid)"
    fi
  done
  stop_postgres
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
