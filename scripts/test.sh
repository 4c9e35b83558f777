#!/usr/bin/env bash
# Sets up the machine and runs krvirt's whole test suite: formatting, lints,
# unit tests, golden files, and the end-to-end tests that boot real guests
# under QEMU. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The suite starts QEMU guests; two cores do not take more than a few at once.
if command -v cargo-nextest >/dev/null 2>&1 || cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --test-threads 2
else
  cargo test --workspace --no-fail-fast -- --test-threads 2
fi
