#!/usr/bin/env bash
# Benchmark 4: the real agent idle for 2 minutes (`--idle 10m` for the full ten), once on the
# machine as it is and once with 100 running containers, then one Docker collection timed with
# those 100 containers (busybox FROM scratch, removed afterwards). About 7 minutes; needs
# Docker and busybox-static.
source "$(dirname "$0")/common.sh"
# The agent as packaged is built with the size-optimised `agent` profile (Cargo.toml): measure
# that binary, and time the Docker collection with code of the same profile, from a fleet-sim
# built with it (target/agent/ then holds all three binaries).
cargo build --profile agent --bins -p sentinel -p hostagent -p sentinel-e2e >&2
exec "${CARGO_TARGET_DIR:-target}/agent/fleet-sim" bench agent --idle 2m --containers 100 "$@"
