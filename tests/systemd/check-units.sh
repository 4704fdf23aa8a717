#!/usr/bin/env bash
# Static checks of systemd/*: `systemd-analyze verify` must print nothing for any unit (it
# exits 0 on unknown keys, so any output fails), and `systemd-analyze security` must score
# tenement-proxy.service at 2.0 or better. Prints the exposure scores of the three services.
#
# Usage: tests/systemd/check-units.sh [BIN_DIR]   (default target/release, else target/debug)
# verify insists that ExecStart= binaries exist, so the units are checked inside a scratch
# root holding this host's systemd units, ours, and the built binaries.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
bin_dir=${1:-}
if [ -z "$bin_dir" ]; then
    bin_dir=target/release
    [ -x "$bin_dir/tenement-supervisor" ] || bin_dir=target/debug
fi
for b in tenement-supervisor tenement-proxy tenctl tenement-exec tenement-fleet; do
    if [ ! -x "$bin_dir/$b" ]; then
        echo "FAILED: $bin_dir/$b is missing; build first (cargo build --workspace)"
        exit 1
    fi
done
command -v systemd-analyze >/dev/null || { echo "FAILED: systemd-analyze is missing (apt-get install systemd)"; exit 1; }

scratch=$(mktemp -d /tmp/tenement-units.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/usr/bin" "$scratch/bin" "$scratch/usr/libexec/tenement" "$scratch/usr/lib/systemd" "$scratch/etc"
# The other commands the units run (ExecReload of the proxy's unit).
cp /bin/kill "$scratch/bin/"
cp -a /usr/lib/systemd/system "$scratch/usr/lib/systemd/"
cp systemd/*.service systemd/*.socket "$scratch/usr/lib/systemd/system/"
cp "$bin_dir"/tenement-supervisor "$bin_dir"/tenement-proxy "$bin_dir"/tenctl "$bin_dir"/tenement-fleet "$scratch/usr/bin/"
cp "$bin_dir"/tenement-exec "$scratch/usr/libexec/tenement/"

failed=0
units=$(cd systemd && ls *.service *.socket)
for unit in $units; do
    out=$(systemd-analyze verify --man=no --root="$scratch" "$unit" 2>&1)
    if [ -n "$out" ]; then
        echo "FAILED: systemd-analyze verify $unit:"
        printf '%s\n' "$out" | sed 's/^/    /'
        failed=1
    else
        echo "ok: systemd-analyze verify $unit prints nothing"
    fi
done

score() { # score UNIT -> the exposure figure, e.g. 1.1
    systemd-analyze security --offline=true --root="$scratch" "$1" 2>/dev/null |
        sed -nE 's/^→ Overall exposure level for [^:]+: ([0-9.]+).*/\1/p'
}
proxy=$(score tenement-proxy.service)
supervisor=$(score tenement-supervisor.service)
fleet=$(score tenement-fleet.service)
echo "exposure: tenement-proxy.service ${proxy:-?}, tenement-supervisor.service ${supervisor:-?}, tenement-fleet.service ${fleet:-?}"
if [ -z "$proxy" ] || ! awk -v s="$proxy" 'BEGIN { exit !(s <= 2.0) }'; then
    echo "FAILED: tenement-proxy.service exposure ${proxy:-unknown} is above 2.0"
    failed=1
fi
if [ -z "$fleet" ]; then
    echo "FAILED: no exposure score for tenement-fleet.service"
    failed=1
fi
if [ -z "$supervisor" ]; then
    echo "FAILED: no exposure score for tenement-supervisor.service"
    failed=1
fi
exit $failed
