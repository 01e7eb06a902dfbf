#!/usr/bin/env bash
# Prints the base image to build docker/Dockerfile on; `make docker` calls it.
#
#   docker/base-image.sh [BASE_IMAGE]
#
# BASE_IMAGE given: that one (it must name a tag or a digest); if it is the
# local base (mnist-job-base:bookworm), built first when missing.
# Not given: the official python:3.11-slim-bookworm if it is here or can be
# pulled within DOCKER_PULL_TIMEOUT seconds (default 60); else, where no
# registry answers, the local base, built from the Debian archive if missing
# (scripts/build-base-image.sh: root and debootstrap), saying so in one line.
# Messages go to stderr; stdout carries only the image name.
set -euo pipefail
cd "$(dirname "$0")/.."

requested="${1:-}"
official="${OFFICIAL_BASE_IMAGE:-python:3.11-slim-bookworm}"
local_base="${LOCAL_BASE_IMAGE:-mnist-job-base:bookworm}"
timeout_s="${DOCKER_PULL_TIMEOUT:-60}"

log() { printf 'docker: %s\n' "$*" >&2; }
present() { docker image inspect "$1" >/dev/null 2>&1; }
# A tag (name:tag, the registry's port aside) or a digest (name@sha256:...).
pinned() { [[ "$1" == *@sha256:* || "${1##*/}" == *:?* ]]; }
build_local() { present "$local_base" || scripts/build-base-image.sh "$local_base" >&2; }

if [ -n "$requested" ]; then
  if ! pinned "$requested"; then
    log "BASE_IMAGE=$requested names no tag or digest: pin one, e.g. BASE_IMAGE=$official"
    exit 1
  fi
  if [ "$requested" = "$local_base" ]; then
    build_local
  fi
  echo "$requested"
  exit 0
fi

if present "$official"; then
  echo "$official"
  exit 0
fi
if error="$(timeout "$timeout_s" docker pull --quiet "$official" 2>&1 >/dev/null)"; then
  echo "$official"
  exit 0
fi
# Docker's last words, e.g. "... lookup <registry>: no such host".
reason="${error##*: }"
log "cannot pull $official (${reason:-no answer within ${timeout_s} s}): using" \
  "$local_base, built from the Debian archive if missing (BASE_IMAGE= picks another)"
build_local
echo "$local_base"
