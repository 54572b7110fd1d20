#!/usr/bin/env bash
# Benchmark 4: the real agent idle for 2 minutes (`--idle 10m` for the full ten), once on the
# machine as it is and once with 100 running containers, then one Docker collection timed with
# those 100 containers (busybox FROM scratch, removed afterwards). About 7 minutes; needs
# Docker and busybox-static.
source "$(dirname "$0")/common.sh"
exec "$SIM" bench agent --idle 2m --containers 100 "$@"
