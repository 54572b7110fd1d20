#!/usr/bin/env bash
# Builds the `hostagent` and `sentinel` .deb packages with cargo-deb.
#
#   packaging/build-debs.sh                    # release build, packages in target/debian/
#   packaging/build-debs.sh --binaries target/debug --fast --out DIR
#                                              # package binaries already built (what
#                                              # tests/tests/packaging.rs does: no rebuild)
#
# Steps: build the release binaries (unless --binaries; the agent with the size-optimised
# `agent` profile of Cargo.toml), let each binary write its shell
# completions and man pages into packaging/generated/ (generated from its clap definitions,
# so they cannot drift), then `cargo deb --no-build` for each package. Needs cargo-deb
# (`cargo install --locked cargo-deb`; tests/run.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

binaries=""
out=target/debian
fast=()
while [ $# -gt 0 ]; do
  case "$1" in
    --binaries) binaries="${2:?--binaries needs a directory}"; shift 2 ;;
    --out) out="${2:?--out needs a directory}"; shift 2 ;;
    --fast) fast=(--fast); shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-debs.sh: unknown argument $1 (try --help)" >&2; exit 64 ;;
  esac
done

if ! command -v cargo-deb >/dev/null 2>&1; then
  echo "build-debs.sh: cargo-deb is missing: cargo install --locked cargo-deb" >&2
  exit 69
fi

target_dir="${CARGO_TARGET_DIR:-target}"
if [ -z "$binaries" ]; then
  cargo build --locked --release -p sentinel --bins
  # The agent has its own profile in Cargo.toml, built for size ([profile.agent]).
  cargo build --locked --profile agent -p hostagent --bins
  sentinel_bin="$target_dir/release/sentinel"
  hostagent_bin="$target_dir/agent/hostagent"
else
  sentinel_bin="$binaries/sentinel"
  hostagent_bin="$binaries/hostagent"
fi
# cargo-deb packages `target/release/NAME` of the target dir it is given: hand it a throwaway
# one holding these binaries, so the real target dir is left alone.
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/release"
for bin in "$sentinel_bin" "$hostagent_bin"; do
  if [ ! -x "$bin" ]; then
    echo "build-debs.sh: $bin is missing (cargo build --workspace --bins)" >&2
    exit 66
  fi
  cp "$bin" "$stage/release/"
done
export CARGO_TARGET_DIR="$stage"
binaries="$stage/release"

# Completions and man pages, where [package.metadata.deb] takes them from.
rm -rf packaging/generated
"$binaries/sentinel" __generate-assets packaging/generated/sentinel
"$binaries/hostagent" __generate-assets packaging/generated/hostagent

mkdir -p "$out"
for package in hostagent sentinel; do
  cargo deb --locked --no-build -p "$package" --output "$out" "${fast[@]}"
done
