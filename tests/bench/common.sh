# Sourced by every benchmark script: goes to the repository root, raises the open-files limit,
# builds the release binaries and sets $SIM to the release fleet-sim.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

# 10,000 agents are 10,000 sockets in the simulator and as many in the controller, which
# fleet-sim starts and which inherits this limit. Where the hard limit is lower (containers),
# take the hard limit; fleet-sim refuses fleet sizes that do not fit.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "open-files limit: $(ulimit -n)" >&2

cargo build --release --bins -p sentinel -p hostagent -p sentinel-e2e >&2
SIM="${CARGO_TARGET_DIR:-target}/release/fleet-sim"
