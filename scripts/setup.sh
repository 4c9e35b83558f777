#!/usr/bin/env bash
# Installs what krvirt needs on a Debian machine, idempotently: the Debian
# packages listed in scripts/packages.txt (QEMU, a Debian kernel and busybox
# for the demo guest, etcd, nftables, ...). Runs `apt-get update` once, and
# only when something is missing. Safe to run again and again.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

packages=()
while IFS= read -r line; do
  line=${line%%#*}; line=${line//[[:space:]]/}
  [ -n "$line" ] && packages+=("$line")
done < "$here/packages.txt"

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The demo guest is built from the installed kernel; make sure there is one.
if ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
  echo "setup: no kernel in /boot after installing linux-image-cloud-amd64" >&2
  exit 1
fi
if ! command -v cargo >/dev/null; then
  echo "setup: cargo is required (install Rust with rustup)" >&2
  exit 1
fi

# The unprivileged account QEMU runs as (krvirt also creates it at start
# when missing; `--qemu-user root` opts out).
qemu_user=${KRVIRT_QEMU_USER:-krvirt-qemu}
if [ "$qemu_user" != root ] && ! getent passwd "$qemu_user" >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: creating system user $qemu_user (QEMU runs as it)" >&2
  $SUDO useradd --system --user-group --no-create-home --home-dir /nonexistent \
    --shell /usr/sbin/nologin --comment "krvirt QEMU processes" "$qemu_user"
fi
echo "setup: all packages present" >&2
