#!/usr/bin/env bash
# Benchmark 6: a backup job of a 1 GiB database (SENTINEL_BENCH_BACKUP_MIB, default 1024)
# against plain `pg_dump --format=custom` to a file on the same machine, stored as written and
# encrypted with age, each pair 3 times (SENTINEL_BENCH_RUNS), interleaved; medians in a
# Markdown table on stdout, each run on stderr. A real PostgreSQL cluster, controller and agent
# (release builds) as in tests/tests/backups.rs, so it needs what the end-to-end tests need
# (PostgreSQL server and client tools, grpcurl). About 10 minutes for 1 GiB after the build.
# Not common.sh: no fleet-sim and no open-files limit needed, only the two binaries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
cargo build --release --bins -p sentinel -p hostagent >&2
# Absolute: the test runs in tests/, not here.
export SENTINEL_BIN_DIR="$(realpath "${CARGO_TARGET_DIR:-target}")/release"
export SENTINEL_BENCH_BACKUP_MIB="${SENTINEL_BENCH_BACKUP_MIB:-1024}"
export SENTINEL_BENCH_RUNS="${SENTINEL_BENCH_RUNS:-3}"
exec cargo test --release -p sentinel-e2e --test backups -- --ignored --nocapture \
  backup_throughput_against_plain_pg_dump "$@"
