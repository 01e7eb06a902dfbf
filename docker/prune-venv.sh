#!/usr/bin/env bash
# Removes from the image's venv what a training run never loads. Runs in the
# builder stage, in the same layer as the install, so no layer carries the
# deleted files. `docker build --build-arg PRUNE=0` skips it.
#
# Measured on the CPU image (tensorflow-cpu 2.21): the venv goes from ~1.6 GB
# to ~1.0 GB, and training still works (tests/test_docker.py runs it).
# Deliberately kept: __pycache__ (without it, imports from a read-only root
# compile every module on every start, twice as slow), tf.test
# (tensorflow/_api/v2/test is an API module, not a test suite), pip until the
# MNIST fetch is done (the Dockerfile removes it afterwards).
set -euo pipefail

venv="${1:?usage: prune-venv.sh VENV_DIR}"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
before="$(du -sm "$venv" | cut -f1)"

# C/C++ headers for building custom TensorFlow ops (tf.sysconfig.get_include()): ~290 MB.
rm -rf "$site/tensorflow/include"

# libclang: a dependency of TensorFlow's own build tooling, never imported by it: ~65 MB.
rm -rf "$site/clang" "$site"/libclang-*.dist-info

# Test suites shipped inside wheels (numpy, matplotlib, h5py, ...): directories
# named `tests` only. No package imports its `tests` at runtime.
find "$site" -type d -name tests -prune -print0 | xargs -0 -r rm -rf

# Symbol tables and debug sections of shared objects: ~280 MB, most of it from
# libtensorflow_cc.so.2. Two kinds are left alone:
# - *.libs/ (numpy.libs, pillow.libs, ...): libraries that auditwheel grafted
#   with patchelf; strip corrupts them and numpy no longer imports.
# - nvidia/ (CUDA image): NVIDIA's binaries, shipped stripped already, and no
#   GPU here to prove they still work after a rewrite.
find "$site" -type f -name '*.so*' -not -path '*.libs/*' -not -path "$site/nvidia/*" -print0 |
  xargs -0 -r strip --strip-unneeded

after="$(du -sm "$venv" | cut -f1)"
echo "prune-venv: $venv ${before} MB -> ${after} MB"
