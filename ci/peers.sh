#!/usr/bin/env bash
# Real peers for the tests: an OpenAI-compatible server (LiteLLM proxy with mock models).
#   ci/peers.sh install   # venvs under $HYPERFUNC_PEERS (default ~/.hyperfunc-peers), pinned versions
#   ci/peers.sh start     # starts the servers on 127.0.0.1, waits until they answer, prints env
#   ci/peers.sh stop      # stops what `start` started, by pid
set -euo pipefail
PEERS="${HYPERFUNC_PEERS:-$HOME/.hyperfunc-peers}"
HERE="$(cd "$(dirname "$0")" && pwd)"
LITELLM_VERSION="1.106.2"
LITELLM_PORT="${HYPERFUNC_LITELLM_PORT:-4000}"
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
}

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
  if [ -f "$PEERS/litellm.pid" ] && kill -0 "$(cat "$PEERS/litellm.pid")" 2>/dev/null; then
    echo "litellm already running (pid $(cat "$PEERS/litellm.pid"))"
  else
    if curl -fsS -o /dev/null "http://127.0.0.1:$LITELLM_PORT/health/liveliness" 2>/dev/null; then
      echo "port $LITELLM_PORT already answers: stop that server first" >&2; return 1
    fi
    rm -f "$PEERS/litellm.pid"
    # In its own session, so that `stop` ends it with all its children; it writes its own pid
    # (= the session's process group) before becoming the server.
    (cd "$HERE/litellm" && LITELLM_RATE_LIMIT_WINDOW_SIZE=5 LITELLM_TELEMETRY=False \
      setsid sh -c 'echo $$ >"$0"; exec "$@"' "$PEERS/litellm.pid" \
      "$PEERS/venv-litellm/bin/litellm" --config config.yaml --host 127.0.0.1 \
      --port "$LITELLM_PORT" --num_workers 1 </dev/null >"$PEERS/litellm.log" 2>&1 &)
    for _ in $(seq 1 50); do [ -s "$PEERS/litellm.pid" ] && break; sleep 0.1; done
  fi
  wait_for "http://127.0.0.1:$LITELLM_PORT/health/liveliness" "$PEERS/litellm.pid" litellm 120
  echo "export HYPERFUNC_LLM_URL=http://127.0.0.1:$LITELLM_PORT/v1"
}

stop() {
  for name in litellm; do
    if [ -f "$PEERS/$name.pid" ]; then
      pid="$(cat "$PEERS/$name.pid")"
      # The server leads its own process group: stop the group (workers included).
      kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$PEERS/$name.pid"
      echo "stopped $name ($pid)"
    fi
  done
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|stop" >&2; exit 2 ;;
esac
