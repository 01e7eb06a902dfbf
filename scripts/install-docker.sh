#!/usr/bin/env bash
# Makes a Docker engine available on a Debian/Ubuntu machine (CI, dev box).
#
# Idempotent: installs what is missing (docker.io for the engine, debootstrap
# for scripts/build-base-image.sh, iptables for the bridge network), starts
# dockerd in the background if no engine answers, and waits until
# `docker info` works. Does nothing but the check where an engine already runs.
# Needs root (or sudo) for the install and the daemon.
#
# Environment:
#   DOCKERD_LOG       where dockerd writes its log (default: $TMPDIR/dockerd.log)
#   DOCKER_WAIT_S     how long to wait for the engine to answer (default: 60)
set -euo pipefail

log() { printf 'install-docker: %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi

engine_up() { docker info >/dev/null 2>&1; }

# A pid file whose daemon no longer runs survives where /run is not a fresh
# tmpfs (a machine started from an image taken while docker ran). If its
# number now belongs to another process, dockerd refuses to start ("pid file
# found"), or takes that process for its containerd and times out waiting.
# Remove a pid file unless its process is the daemon it names.
clear_stale_pidfile() {  # file daemon
  local file=$1 daemon=$2 pid
  [ -e "$file" ] || return 0
  pid=$(tr -dc '0-9' <"$file" 2>/dev/null || true)
  if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$daemon" ]; then
    return 0
  fi
  log "removing stale $file (pid ${pid:-none} is not a running $daemon)"
  $SUDO rm -f "$file"
}

if command -v docker >/dev/null 2>&1 && engine_up; then
  log "engine already running: $(docker info --format '{{.ServerVersion}} ({{.Driver}})')"
  exit 0
fi

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

if ! engine_up; then
  if pgrep -x dockerd >/dev/null 2>&1; then
    log "dockerd is running but not answering yet; waiting"
  elif command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    log "starting docker with systemd"
    $SUDO systemctl start docker
  else
    logfile="${DOCKERD_LOG:-${TMPDIR:-/tmp}/dockerd.log}"
    clear_stale_pidfile /var/run/docker.pid dockerd
    clear_stale_pidfile /var/run/docker/containerd/containerd.pid containerd
    log "starting dockerd in the background (log: $logfile)"
    # setsid: the daemon outlives this script and the CI step that ran it.
    $SUDO setsid dockerd >"$logfile" 2>&1 </dev/null &
  fi
fi

wait_s="${DOCKER_WAIT_S:-60}"
for _ in $(seq "$((wait_s * 2))"); do
  if engine_up; then
    log "engine ready: $(docker info --format '{{.ServerVersion}} ({{.Driver}})')"
    exit 0
  fi
  sleep 0.5
done
log "docker engine did not answer within ${wait_s}s"
[ -n "${logfile:-}" ] && tail -n 30 "$logfile" >&2
exit 1
