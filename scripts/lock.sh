#!/usr/bin/env bash
# Regenerates the hashed lock files in requirements/ from pyproject.toml.
# Run after changing a dependency; commit the result. Needs pip-tools on PATH
# (e.g. `pip install pip-tools`). Linux x86_64, Python 3.11: the platform of
# the images and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
compile() {
  local out=$1; shift
  pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
    --no-emit-index-url --no-emit-find-links --output-file "$out" "$@" pyproject.toml
}
compile requirements/cpu.txt --extra cpu --extra cloud
compile requirements/cuda.txt --extra cuda --extra cloud
compile requirements/dev.txt --extra cpu --extra cloud --extra dev
# The policy scanner of `make k8s-validate`, in a venv of its own.
pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
  --no-emit-index-url --no-emit-find-links --output-file requirements/policy.txt requirements/policy.in
