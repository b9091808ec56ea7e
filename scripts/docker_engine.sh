#!/usr/bin/env bash
# Start (or find) a private Docker engine for lmforge's image build and container tests, and print
# the line that points clients at it:
#
#   eval "$(scripts/docker_engine.sh)"          # exports DOCKER_HOST=unix:///.../docker.sock
#   scripts/docker_engine.sh --stop             # stop the engine this script started
#
# The engine is Debian's `dockerd` (package docker.io, installed with apt-get when missing and we are
# root) with its own data root, exec root, pid file and socket, so it never touches a system Docker:
#
#   $LMFORGE_DOCKER_STATE (default /var/lib/lmforge-docker)   data/ (images, build cache: kept
#                                                             between runs, so rebuilds are cached),
#                                                             dockerd.log, docker.pid, docker.sock
#   $LMFORGE_DOCKER_EXEC (default /run/lmforge-docker)         the exec root (short: socket paths)
#
# Running it again while the engine answers only prints the line. Exit status 1 with a one-line
# reason on stderr when no engine can be started (not root and no dockerd, apt-get failing, ...):
# the image tests then skip with that reason.
set -euo pipefail

STATE=${LMFORGE_DOCKER_STATE:-/var/lib/lmforge-docker}
EXEC_ROOT=${LMFORGE_DOCKER_EXEC:-/run/lmforge-docker}
SOCK="$STATE/docker.sock"
PIDFILE="$STATE/docker.pid"
LOG="$STATE/dockerd.log"
HOST="unix://$SOCK"

fail() { echo "docker_engine.sh: $*" >&2; exit 1; }

# Debian's client speaks BuildKit with this engine; another `docker` earlier in PATH may not.
client() { if [ -x /usr/bin/docker ]; then echo /usr/bin/docker; else command -v docker || true; fi; }

answers() {
  local c; c=$(client)
  [ -n "$c" ] && [ -S "$SOCK" ] && DOCKER_HOST="$HOST" timeout 10 "$c" version >/dev/null 2>&1
}

if [ "${1:-}" = "--stop" ]; then
  if [ -f "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
  exit 0
fi

if ! answers; then
  if ! command -v dockerd >/dev/null 2>&1 || [ ! -x /usr/bin/docker ]; then
    [ "$(id -u)" = 0 ] || fail "no dockerd here and not root (cannot apt-get install docker.io)"
    command -v apt-get >/dev/null 2>&1 || fail "no dockerd here and no apt-get to install docker.io"
    echo "docker_engine.sh: installing docker.io with apt-get ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q docker.io >&2; then
      apt-get update -q >&2 || true
      apt-get install -y -q docker.io >&2 || fail "apt-get install docker.io failed"
    fi
  fi
  [ "$(id -u)" = 0 ] || fail "dockerd needs root (run as root, or export DOCKER_HOST of a running engine)"
  mkdir -p "$STATE/data" "$EXEC_ROOT"
  if [ -f "$PIDFILE" ] && ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then rm -f "$PIDFILE"; fi
  [ -f "$PIDFILE" ] && fail "dockerd (pid $(cat "$PIDFILE")) runs but does not answer on $SOCK; see $LOG"
  rm -f "$SOCK"
  # setsid: the engine outlives this script (and the CI step that started it) until --stop.
  setsid dockerd --data-root "$STATE/data" --exec-root "$EXEC_ROOT" --pidfile "$PIDFILE" \
    -H "$HOST" >"$LOG" 2>&1 </dev/null &
  for _ in $(seq 150); do
    answers && break
    if ! kill -0 $! 2>/dev/null; then fail "dockerd exited: $(tail -n 3 "$LOG" | tr '\n' ' ')"; fi
    sleep 0.2
  done
  answers || fail "dockerd did not answer on $SOCK within 30 s; see $LOG"
fi
echo "export DOCKER_HOST=$HOST"
