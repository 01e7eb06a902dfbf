#!/usr/bin/env bash
# Removes from the image's venv what a training run never loads. Runs in the
# builder stage, in the same layer as the install, so no layer carries the
# deleted files. `docker build --build-arg PRUNE=0` skips it.
#
# Measured on the CPU image (tensorflow-cpu 2.21, with the cloud extra): the
# venv goes from 1761 MB to 1087 MB (du), and training still works
# (tests/test_docker.py runs it, to a local dir and to an S3 bucket).
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

# botocore's API models for every AWS service (botocore/data/<service>/, 430+
# of them, gzipped, 27 MB on disk): removing all but five saves 25 MB of disk
# and 17 MB of the CPU image (1249 MB -> 1232 MB, its 1.25 GB budget being
# what tests/test_docker.py checks). s3fs needs S3's; the credential chains
# create clients for STS (AssumeRole, web identity/IRSA), SSO and SSO-OIDC
# (IAM Identity Center) and Signin (`aws login`). The top-level files
# (endpoints.json, partitions.json, _retry.json, sdk-default-configuration.json)
# stay: every client reads them. Another service's client then fails with
# UnknownServiceError; AWS_DATA_PATH can point at a directory with its model.
# Kept on purpose: grpcio (~19 MB, TensorFlow's dependency, in the image
# before the cloud extra), google-cloud-storage-control and google.cloud's
# gRPC storage client (~4 MB, what gcsfs imports when
# GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=true), googleapis-common-protos (~1.5 MB,
# google-api-core imports it), cryptography (~13 MB, google-auth signs with it).
botocore_data="$site/botocore/data"
if [ -d "$botocore_data" ]; then
  find "$botocore_data" -mindepth 1 -maxdepth 1 -type d \
    -not -name s3 -not -name sts -not -name sso -not -name sso-oidc -not -name signin \
    -exec rm -rf {} +
  for service in s3 sts sso sso-oidc signin; do
    [ -d "$botocore_data/$service" ] || { echo "prune-venv: no botocore model for $service" >&2; exit 1; }
  done
fi

after="$(du -sm "$venv" | cut -f1)"
echo "prune-venv: $venv ${before} MB -> ${after} MB"
