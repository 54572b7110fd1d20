#!/usr/bin/env bash
# Benchmark 4: the real agent idle (2 minutes; `--idle 10m` for the full ten) and one Docker
# collection with 100 running containers (busybox FROM scratch, removed afterwards).
# About 4 minutes; needs Docker and busybox-static.
source "$(dirname "$0")/common.sh"
exec "$SIM" bench agent --idle 2m --containers 100 "$@"
