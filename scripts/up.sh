#!/usr/bin/env bash
# Sets up this machine (Debian packages), builds krvirt in release mode, puts
# `krvirt` on the PATH (/usr/local/bin, when run as root) and runs `krvirt up`:
# the API server, the controllers and the host agent in one process on the
# embedded store, with a demo VM. Extra arguments go to `krvirt up`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p krvirt
bin="${CARGO_TARGET_DIR:-$PWD/target}/release/krvirt"
if [ "$(id -u)" -eq 0 ] && [ "$(readlink -f /usr/local/bin/krvirt 2>/dev/null)" != "$bin" ]; then
  ln -sf "$bin" /usr/local/bin/krvirt
fi
exec "$bin" up "$@"
