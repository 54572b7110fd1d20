#!/usr/bin/env bash
# Benchmark 3: controller -> agent message latency on live streams with 1,000 and 10,000 agents
# (BundleRequest -> BundleChunk round trips, single and fanned out to every agent; job dispatch
# itself is not built yet). About 3 minutes.
source "$(dirname "$0")/common.sh"
exec "$SIM" bench latency --agents 1000,10000 "$@"
