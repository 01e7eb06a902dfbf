#!/usr/bin/env bash
# Builds a local Debian bookworm + Python 3 base image from the Debian archive,
# for machines that reach a Debian mirror but no container registry (so the
# official python image cannot be pulled). Then build the job's images on it:
#
#   scripts/build-base-image.sh                  # -> mnist-job-base:bookworm
#   make docker BASE_IMAGE=mnist-job-base:bookworm
#
# The image is debootstrap's minbase variant, upgraded from bookworm-updates and
# bookworm-security, plus python3, python3-venv, python3-pip and ca-certificates
# (no recommends, no apt lists; docs and translations excluded as in Debian's
# -slim images): ~140 MB, Python 3.11 like the official python:3.11-slim-bookworm.
#
# Arguments / environment:
#   $1 or BASE_IMAGE    image name:tag to create (default mnist-job-base:bookworm)
#   DEBIAN_MIRROR       Debian mirror URL (default: debootstrap's own default)
#   FORCE=1             rebuild even if the image exists
# Needs root (debootstrap, chroot), debootstrap and a running Docker engine.
set -euo pipefail

image="${1:-${BASE_IMAGE:-mnist-job-base:bookworm}}"
suite=bookworm
mirror="${DEBIAN_MIRROR:-}"
packages="python3 python3-venv python3-pip ca-certificates"

log() { printf 'build-base-image: %s\n' "$*" >&2; }

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$image" >/dev/null 2>&1; then
  log "$image exists (FORCE=1 rebuilds it)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  log "needs root (debootstrap and chroot)"
  exit 1
fi
if ! command -v debootstrap >/dev/null; then
  log "debootstrap missing (scripts/install-docker.sh installs it)"
  exit 1
fi

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/mnist-job-base.XXXXXX")"
chmod 755 "$rootfs" # it becomes the image's /, and apt's sandbox user must enter it
cleanup() {
  # A failed step can leave /proc mounted: never rm -rf through a mount.
  if mountpoint -q "$rootfs/proc"; then umount "$rootfs/proc"; fi
  rm -rf --one-file-system "$rootfs"
}
trap cleanup EXIT

log "debootstrap $suite (minbase) from ${mirror:-the default mirror}"
debootstrap --variant=minbase "$suite" "$rootfs" ${mirror:+"$mirror"} >/dev/null
# The mirror actually used, as debootstrap wrote it into the new system.
mirror="$(awk '$1 == "deb" { print $2; exit }' "$rootfs/etc/apt/sources.list")"

# The same suites as the official Debian images: point-release and security fixes.
{
  echo "deb $mirror $suite main"
  echo "deb $mirror $suite-updates main"
  echo "deb ${mirror%/debian}/debian-security $suite-security main"
} >"$rootfs/etc/apt/sources.list"

# Like Debian's own -slim images: dpkg skips docs, man pages and translations,
# now and in every image built on this one.
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF

log "installing $packages"
mount -t proc proc "$rootfs/proc"
chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 PACKAGES="$packages" \
  sh -euc '
    apt-get update -qq
    apt-get upgrade -y -qq >/dev/null
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* /var/log/dpkg.log
    # What debootstrap installed before the dpkg excludes existed.
    find /usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
    find /usr/share/doc -mindepth 1 -type d -empty -delete
    find /usr/share/locale -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    rm -rf /usr/share/man/* /usr/share/info/* /usr/share/lintian/*
  ' 2> >(grep -v -e 'Can not write log' -e 'delaying package configuration' >&2)
umount "$rootfs/proc"
# The build host's resolver and name must not end up in the image.
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"

py_version="$(chroot "$rootfs" python3 -c 'import platform; print(platform.python_version())')"
log "importing as $image (Python $py_version)"
tar --numeric-owner -C "$rootfs" -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "debootstrap --variant=minbase $suite + $packages" \
  - "$image" >/dev/null
docker image ls "$image"
