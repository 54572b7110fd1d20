#!/usr/bin/env bash
# Benchmark 2: time and connection attempts for 10,000 agents to reconnect after a controller
# restart (SIGTERM, start again), agents backing off like hostagent. About 2 minutes.
source "$(dirname "$0")/common.sh"
exec "$SIM" bench storm --agents 10000 "$@"
