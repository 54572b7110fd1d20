#!/usr/bin/env bash
# Benchmark 6: a backup job of a 1 GiB database (SENTINEL_BENCH_BACKUP_MIB, default 1024)
# against plain `pg_dump --format=custom` to a file on the same machine, stored as written and
# encrypted with age, each pair 3 times (SENTINEL_BENCH_RUNS), medians in a Markdown table.
# A real PostgreSQL cluster, controller and agent (release builds), as in tests/tests/backups.rs;
# needs what the end-to-end tests need (PostgreSQL server and client, grpcurl). About 12
# minutes for 1 GiB, most of it filling the database.
source "$(dirname "$0")/common.sh"
export SENTINEL_BIN_DIR="${CARGO_TARGET_DIR:-target}/release"
export SENTINEL_BENCH_BACKUP_MIB="${SENTINEL_BENCH_BACKUP_MIB:-1024}"
export SENTINEL_BENCH_RUNS="${SENTINEL_BENCH_RUNS:-3}"
exec cargo test --release -p sentinel-e2e --test backups -- --ignored --nocapture \
  backup_throughput_against_plain_pg_dump "$@"
