#!/bin/sh
# The container's entrypoint: runs `mnist-job "$@"` as a non-root user.
#
# Started with a user (docker run --user, Kubernetes runAsUser: what every
# locked-down runtime does), it simply execs the job. Started as root (a plain
# `docker run -v "$PWD/out:/outputs" mnist-job`, where Docker has just created
# the host dir root-owned), it first hands the output dir to uid:gid 1000, then
# drops to that user. Either way `exec` makes the job PID 1, so it receives
# SIGTERM from `docker stop` and checkpoints.
set -eu
JOB_UID=1000
JOB_GID=1000

if [ "$(id -u)" = 0 ]; then
  out="${MNIST_JOB_OUTPUT_DIR:-/outputs}"
  if [ -d "$out" ] && [ "$(stat -c %u "$out")" != "$JOB_UID" ]; then
    chown "$JOB_UID:$JOB_GID" "$out"
  fi
  exec setpriv --reuid="$JOB_UID" --regid="$JOB_GID" --clear-groups -- mnist-job "$@"
fi
exec mnist-job "$@"
