#!/usr/bin/env bash
# Benchmark 5: bytes per agent per hour at the default interval (15 s, a full report every 20),
# counted as encoded gRPC messages and as TCP bytes under TLS, 200 agents over one full-report
# cycle (5 minutes). About 6 minutes.
source "$(dirname "$0")/common.sh"
exec "$SIM" bench bytes --agents 200 --window 300s "$@"
