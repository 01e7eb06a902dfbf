#!/bin/sh
# The container's entrypoint: execs `mnist-job "$@"`, so the job is PID 1 and
# receives SIGTERM from `docker stop` or a pod deletion (it checkpoints and
# exits 143). It runs as whoever the container was started as: the image's
# non-root USER (10001:10001), or the --user / runAsUser given. Nothing here
# needs or uses root.
#
# One check first, for `train` into the default output dir: a plain
# `docker run -v "$PWD/out:/outputs" mnist-job` on a host where out/ does not
# exist yet gets a root-owned dir from Docker, which the job's user cannot
# write. Rather than a Python error after TensorFlow has loaded, say in one
# line what to run instead, and exit 2 (usage error, as the job itself would).
set -eu

out="${MNIST_JOB_OUTPUT_DIR:-/outputs}"
if [ "${1:-}" = train ] && [ -d "$out" ] && ! [ -w "$out" ]; then
  case " $* " in
    *" --output-dir"* | *" --help "*) ;; # another dir (the job checks it), or no run
    *)
      echo "mnist-job: $out is not writable by uid $(id -u) (owner: uid $(stat -c %u "$out");\
 Docker creates a missing host dir as root). Create it and run as yourself:\
 mkdir -p out && docker run --rm --user \"\$(id -u):\$(id -g)\" -v \"\$PWD/out:/outputs\" mnist-job\
 (or: sudo chown $(id -u):$(id -g) out; Kubernetes: set fsGroup)" >&2
      exit 2
      ;;
  esac
fi
exec mnist-job "$@"
