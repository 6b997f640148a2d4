#!/usr/bin/env bash
# Fuzzes pgtenant's parsers with cargo-fuzz / libFuzzer (targets in proxy/fuzz/fuzz_targets/).
#
#   scripts/fuzz.sh [SECONDS]          every target for SECONDS each (default 30; CI's short run)
#   FUZZ_TARGETS="sql_guard claims" scripts/fuzz.sh 600     only some targets
#
# Steps: installs cargo-fuzz if missing (and, for lexer_diff's pg_query build, protoc and libclang
# via apt-get), builds all targets once, replays every saved input under
# proxy/fuzz/regressions/<target>/, then fuzzes each target in turn (one process, one core) with
# its seeds in proxy/fuzz/corpus/<target>/ (new inputs are added there; git ignores them).
# Exits non-zero if any target crashed, panicked, hung (-timeout), ran out of memory
# (-rss_limit_mb) or failed to build; the failing input is in proxy/fuzz/artifacts/<target>/.
# Logs: proxy/fuzz/logs/<target>.log (and <target>.regressions.log).
#
# Environment:
#   FUZZ_TARGETS     targets to run (default: all five)
#   FUZZ_SANITIZER   cargo fuzz -s value (default "none"; "address" needs a nightly-only flag and is
#                    then built with RUSTC_BOOTSTRAP=1 on a stable toolchain)
#   FUZZ_JOBS        cargo build jobs (default: cargo's own default)
#   FUZZ_RSS_MB      libFuzzer -rss_limit_mb (default 2048)
#   FUZZ_TIMEOUT     libFuzzer -timeout, seconds for one input (default 10)
set -euo pipefail

SECONDS_PER_TARGET="${1:-30}"
case "$SECONDS_PER_TARGET" in
    ''|*[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ_DIR="$ROOT/proxy/fuzz"
TARGETS="${FUZZ_TARGETS:-frontend_frames startup_packet sql_guard claims lexer_diff}"
SANITIZER="${FUZZ_SANITIZER:-none}"
RSS_MB="${FUZZ_RSS_MB:-2048}"
TIMEOUT="${FUZZ_TIMEOUT:-10}"

# Largest input per target: a few messages / one startup exchange / one query string / one token.
max_len() {
    case "$1" in
        frontend_frames) echo 65536 ;;  # several messages, big enough for large Parse/Bind bodies
        startup_packet) echo 12288 ;;   # just above the 10,000-byte startup packet limit
        sql_guard) echo 16384 ;;
        claims) echo 16384 ;;           # the verifier refuses tokens over 16 KiB
        lexer_diff) echo 4096 ;;        # each input is scanned several times by libpg_query
        *) echo 4096 ;;
    esac
}

# The lexer_diff target links the pg_query crate (libpg_query, PostgreSQL's own scanner), whose
# build script needs protoc (prost-build) and libclang (bindgen) besides make and a C compiler.
need_pkg=()
command -v protoc >/dev/null 2>&1 || need_pkg+=(protobuf-compiler)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need_pkg+=(libclang-dev)
command -v make >/dev/null 2>&1 || need_pkg+=(make)
if [ ${#need_pkg[@]} -gt 0 ]; then
    echo "== installing: ${need_pkg[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkg[@]}" >/dev/null
fi

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

# Build flags shared by build and run (a run with other flags would rebuild):
# -a: debug assertions and overflow checks on (cargo fuzz's default for release builds, spelled
# out), so arithmetic overflow is a finding too.
BUILD_FLAGS=(-s "$SANITIZER" -a)
if [ -n "${FUZZ_JOBS:-}" ]; then export CARGO_BUILD_JOBS="$FUZZ_JOBS"; fi
if [ "$SANITIZER" != "none" ]; then
    # sanitizers are a -Z flag: let the stable toolchain accept it
    export RUSTC_BOOTSTRAP=1
fi

cd "$FUZZ_DIR"
mkdir -p logs
echo "== building fuzz targets (sanitizer: $SANITIZER)"
start=$(date +%s)
cargo fuzz build "${BUILD_FLAGS[@]}"
echo "   built in $(( $(date +%s) - start ))s"

failed=()
summary=()
for t in $TARGETS; do
    # 1. replay the inputs that once failed
    if [ -d "regressions/$t" ] && [ -n "$(find "regressions/$t" -type f ! -name '*.md' -print -quit)" ]; then
        mapfile -t inputs < <(find "regressions/$t" -type f ! -name '*.md' | sort)
        echo "== $t: replaying ${#inputs[@]} regression input(s)"
        if ! cargo fuzz run "${BUILD_FLAGS[@]}" "$t" "${inputs[@]}" -- \
                -rss_limit_mb="$RSS_MB" -timeout="$TIMEOUT" >"logs/$t.regressions.log" 2>&1; then
            tail -n 40 "logs/$t.regressions.log"
            failed+=("$t (regression replay)")
        fi
    fi

    # 2. fuzz
    echo "== $t: fuzzing for ${SECONDS_PER_TARGET}s (max_len $(max_len "$t"))"
    mkdir -p "corpus/$t"
    rc=0
    cargo fuzz run "${BUILD_FLAGS[@]}" "$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" \
        -rss_limit_mb="$RSS_MB" \
        -timeout="$TIMEOUT" \
        -max_len="$(max_len "$t")" \
        -print_final_stats=1 >"logs/$t.log" 2>&1 || rc=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$t.log" | tail -n 1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "logs/$t.log" | tail -n 1)
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "logs/$t.log" | tail -n 1)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "logs/$t.log" | tail -n 1 || true)
    line="$t: execs=${execs:-?} exec/s=${rate:-?} peak_rss_mb=${rss:-?} ${cov}"
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "logs/$t.log"
        failed+=("$t (exit $rc; input in proxy/fuzz/artifacts/$t/)")
        line="$line FAILED"
    fi
    summary+=("$line")
    echo "   $line"
done

echo "== summary"
printf '   %s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "== FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "== no crash"
