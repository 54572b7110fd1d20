#!/usr/bin/env bash
# Benchmark 3: job dispatch latency with 1,000 and 10,000 agents: RunIsolationCheck{probe}
# sends signed probe jobs to one random host at a time and to every host at once, timed from
# the RPC to each job's arrival at its agent; plus BundleRequest -> BundleChunk round trips on
# the live streams. About 4 minutes.
source "$(dirname "$0")/common.sh"
exec "$SIM" bench latency --agents 1000,10000 "$@"
