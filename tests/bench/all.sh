#!/usr/bin/env bash
# Every benchmark in turn (about 20 minutes); the tables go to stdout, progress to stderr.
set -euo pipefail
dir="$(dirname "$0")"
for bench in 1-controller-steady 2-reconnect-storm 3-dispatch-latency 4-agent 5-bytes-per-agent; do
  bash "$dir/$bench.sh"
done
