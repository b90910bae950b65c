#!/usr/bin/env bash
# Make a local Python base image from Debian, for hosts that cannot pull from an image registry.
#
#   deploy/make_base.sh [IMAGE]        (default localhost/foldserve-base:bookworm)
#
# debootstraps a minimal Debian bookworm (python3 3.11, venv, CA certificates) from the first
# Debian mirror in this machine's apt sources (or $MIRROR), and imports it with `podman import`.
# The project's Dockerfile then builds on it: --build-arg BASE=IMAGE. Needs root, debootstrap
# and podman. The root filesystem is made in a temporary directory and removed afterwards.
set -euo pipefail
IMAGE=${1:-localhost/foldserve-base:bookworm}
SUITE=${SUITE:-bookworm}
if [ -z "${MIRROR:-}" ]; then
  MIRROR=$(apt-get indextargets --format '$(REPO_URI)' 'Release: '"$SUITE" 2>/dev/null | head -n 1)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian/}
rootfs=$(mktemp -d "${TMPDIR:-/var/tmp}/foldserve-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT
echo "make_base: debootstrap $SUITE from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
# A smaller image: no apt lists, documentation or locales in the base.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
tar --numeric-owner -C "$rootfs" -c . | podman import \
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$IMAGE"
podman image inspect --format "make_base: $IMAGE {{.Size}} bytes" "$IMAGE"
