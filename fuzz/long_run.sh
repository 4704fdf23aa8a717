#!/usr/bin/env bash
# One long AFL++ campaign on one target, on one core, then its figures.
#
#   fuzz/long_run.sh TARGET [MAX_EXECS] [MAX_SECONDS] [CPU]
#
# Defaults: 10,000,000 executions or 3600 s of fuzzing, whichever comes first, bound to CPU 1
# (leave the other core to whoever else works on the machine). Run targets one after the
# other, never two at once. Needs the build smoke.sh makes (fuzz/target/afl). Findings go to
# fuzz/out/long/TARGET/default/{crashes,hangs}; the last line printed is the summary that
# docs/FUZZING.md records.
set -euo pipefail

cd "$(dirname "$0")"
target=${1:?usage: long_run.sh TARGET [MAX_EXECS] [MAX_SECONDS] [CPU]}
max_execs=${2:-10000000}
max_seconds=${3:-3600}
cpu=${4:-1}
binary="target/afl/release/$target"
[[ -x $binary ]] || { echo "no $binary: run fuzz/smoke.sh first" >&2; exit 1; }
out="out/long/$target"
rm -rf "$out"
mkdir -p out/long

# As in smoke.sh: no CPU-governor check, no core_pattern check, no curses screen.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1
# Known findings (fuzz/src/known.rs, each with a file in fuzz/regressions/) do not stop the
# campaign; anything else still crashes. Override with TENEMENT_FUZZ_KNOWN= to stop at them.
export TENEMENT_FUZZ_KNOWN=${TENEMENT_FUZZ_KNOWN-all}
# -b CPU: this one core only.  -E / -V: stop at MAX_EXECS executions or MAX_SECONDS of fuzzing.
# -t 1000: an input that takes over 1 s is a timeout, saved as a hang only if it takes over
# AFL_HANG_TMOUT (10 s) again (see smoke.sh).
export AFL_HANG_TMOUT=10000
started=$(date +%s)
timeout $((max_seconds + 600)) cargo afl fuzz -b "$cpu" -E "$max_execs" -V "$max_seconds" -t 1000 \
    -i "corpus/$target" -o "$out" "$binary" >"out/long/$target.log" 2>&1 || true
wall=$(($(date +%s) - started))
stats="$out/default/fuzzer_stats"
stat() { sed -n "s/^$1 *: *//p" "$stats" | head -1; }
execs=$(stat execs_done)
echo "$target: execs=$execs wall_s=$wall execs_per_s=$((execs / (wall > 0 ? wall : 1))) corpus=$(stat corpus_count) edges=$(stat edges_found)/$(stat total_edges) stability=$(stat stability) crashes=$(stat saved_crashes) hangs=$(stat saved_hangs)"
