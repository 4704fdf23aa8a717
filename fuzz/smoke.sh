#!/usr/bin/env bash
# Short fuzzing pass over every target, then a replay of the seed corpus and the regressions.
#
#   fuzz/smoke.sh [SECONDS]     SECONDS of AFL++ per target (default 5, or $FUZZ_SECONDS)
#
# Installs cargo-afl and builds AFL++ only when they are missing, builds the targets with
# `cargo afl build` into fuzz/target/afl (never the main target/), runs each target alone,
# then replays fuzz/corpus/<target>/ and fuzz/regressions/<target>/ through the same `check`.
# Prints one line per target, `PASS fuzz <target>: N execs, 0 crashes` or
# `FAIL fuzz <target>: ...`, and exits 1 if any target failed. AFL++ logs and findings stay
# in fuzz/target/smoke/<target>/ for a look afterwards.
set -euo pipefail

cd "$(dirname "$0")"
fuzz_dir=$(pwd)
seconds=${1:-${FUZZ_SECONDS:-5}}
targets=(host frame config template http_head api_request)
export CARGO_TARGET_DIR="$fuzz_dir/target/afl"
smoke_dir="$fuzz_dir/target/smoke"
mkdir -p "$smoke_dir"

# ---- tools, only when missing (CI starts from a Debian 12 with Rust, Python, git, curl) ----
if ! command -v make >/dev/null || ! command -v cc >/dev/null; then
    # AFL++ is C built with make; Debian's Rust image may lack make.
    apt-get update -qq && apt-get install -y -qq --no-install-recommends make gcc libc6-dev
fi
if ! cargo afl --version >/dev/null 2>&1; then
    cargo install --locked cargo-afl
fi
# `cargo afl config --build` builds AFL++ for this toolchain and refuses, with "already
# built", when it has been; anything else is a real failure.
if ! cargo afl config --build >"$smoke_dir/afl-config.log" 2>&1; then
    if ! grep -q "already built" "$smoke_dir/afl-config.log"; then
        cat "$smoke_dir/afl-config.log" >&2
        echo "FAIL fuzz: cannot build AFL++" >&2
        exit 1
    fi
fi

# ---- build: every target plus the replay binary, instrumented (it runs fine outside AFL++) ----
cargo afl build --release --features afl --bins --quiet

# ---- AFL++ settings, each one explained ----
# The CPU scaling governor is not ours to change on a shared or virtual machine, and the
# check only warns about speed.
export AFL_SKIP_CPUFREQ=1
# A core_pattern that pipes to a crash handler (systemd-coredump, apport) delays crash
# detection; AFL++ refuses to start unless told we accept that.
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
# No curses screen: this runs in CI and its output goes to a log file.
export AFL_NO_UI=1
# Bind to a free core if there is one, but do not fail when both are busy (the other
# engineer's build, CI's other jobs).
export AFL_TRY_AFFINITY=1
# Crashes of findings already saved under fuzz/regressions/ are skipped while fuzzing, so
# a crash here is a new finding; the replay below still fails on every known one.
export TENEMENT_FUZZ_KNOWN=all
# Flags given to afl-fuzz below:
#   -i corpus/<target>  the seeds;  -o <dir>  findings and fuzzer_stats
#   -V <seconds>        stop after that much fuzzing time (calibration not counted)
#   -t 1000             an input is a timeout after 1 s: every target handles one input in
#                       well under a millisecond, and a fixed limit keeps a loaded machine
#                       from calibrating a tight one
# A timeout is run again with AFL_HANG_TMOUT (10 s) before it is saved as a hang, so a moment
# when the machine was busy elsewhere (a build on both cores) is not reported as a hang.
export AFL_HANG_TMOUT=10000
# (cargo afl fuzz adds -c0: CmpLog through the same binary, which solves magic values such
# as the HTTP/2 preface or `[service.` much sooner.)

status=0
results=()
for target in "${targets[@]}"; do
    out="$smoke_dir/$target"
    rm -rf "$out"
    log="$smoke_dir/$target.log"
    afl_ok=1
    timeout $((seconds + 180)) cargo afl fuzz -i "corpus/$target" -o "$out" -V "$seconds" -t 1000 \
        "$CARGO_TARGET_DIR/release/$target" >"$log" 2>&1 || afl_ok=0
    stats="$out/default/fuzzer_stats"
    stat() { sed -n "s/^$1 *: *//p" "$stats" 2>/dev/null | head -1; }
    execs=$(stat execs_done)
    crashes=$(stat saved_crashes)
    hangs=$(stat saved_hangs)
    replay_log="$smoke_dir/$target.replay.log"
    replay_ok=1
    TENEMENT_FUZZ_KNOWN= "$CARGO_TARGET_DIR/release/replay" "$target" \
        "corpus/$target" "regressions/$target" >"$replay_log" 2>&1 || replay_ok=0
    replayed=$(sed -n "s/^$target: \([0-9]*\) files.*/\1/p" "$replay_log")
    if [[ $afl_ok == 0 || -z $execs ]]; then
        results+=("FAIL fuzz $target: afl-fuzz did not run (see ${log#"$fuzz_dir"/}): $(tail -3 "$log" | tr -s '\n' ' ')")
        status=1
    elif [[ $crashes != 0 || $hangs != 0 ]]; then
        results+=("FAIL fuzz $target: $execs execs, $crashes crashes, $hangs hangs (inputs in ${out#"$fuzz_dir"/}/default/{crashes,hangs}; replay with target/afl/release/replay $target DIR)")
        status=1
    elif [[ $replay_ok == 0 ]]; then
        failed=$(grep '^FAILED' "$replay_log" | sed 's/^FAILED //; s/:$//' | tr '\n' ' ')
        results+=("FAIL fuzz $target: $execs execs, 0 crashes, but replay failed on: $failed(see ${replay_log#"$fuzz_dir"/})")
        status=1
    else
        results+=("PASS fuzz $target: $execs execs, 0 crashes, 0 hangs, $replayed corpus and regression files replayed")
    fi
done
printf '%s\n' "${results[@]}"
exit $status
