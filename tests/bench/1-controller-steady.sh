#!/usr/bin/env bash
# Benchmark 1: controller resident memory and CPU with 1,000 / 5,000 / 10,000 connected agents
# at a 15 s report interval, steady state. About 5 minutes. Extra flags go to fleet-sim, e.g.
# `--agents 1000 --window 30s`.
source "$(dirname "$0")/common.sh"
exec "$SIM" bench steady --agents 1000,5000,10000 --interval 15s --window 60s "$@"
