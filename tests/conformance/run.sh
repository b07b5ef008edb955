#!/usr/bin/env bash
# Vendored from ../shared/conformance/run.sh (with its pjdfstest.toml) so that the test suite
# runs it from a clean clone.
# POSIX conformance of a mounted file system, side by side with a local directory.
#
# usage: bash ../shared/conformance/run.sh MOUNT_DIR [PATTERN...]
#   MOUNT_DIR  a directory on the file system under test (a fresh subdirectory is used)
#   PATTERN    optional pjdfstest name filters, e.g. rename:: chmod::
# env:
#   FSX_OPS=N      fsx operations (default 20000; 0 skips fsx)
#   SKIP_LOCAL=1   do not run the local reference
#   LOCAL_DIR=DIR  where the local reference runs (default: a fresh dir under ${TMPDIR:-/tmp})
#
# Runs the crates.io rewrite of pjdfstest (crate `pjdfstest`) with the config beside
# this script, and fsx (crate `fsx`, random read/write/truncate/mmap checked against a
# model), installing both with `cargo install --locked` when they are missing.
# Needs root (the suite changes owners). Prints failed test names, a table, and as
# its last line:
#   conformance: pjdfstest passed=P failed=F skipped=S (local passed=.. failed=.. skipped=..) fsx=OK|FAIL|skipped
# Exit status: 0 when the mount fails no test that the local run passes and fsx is OK.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF="$HERE/pjdfstest.toml"
MNT="${1:-}"; shift || true
if [ -z "$MNT" ] || [ ! -d "$MNT" ]; then
    echo "usage: $0 MOUNT_DIR [PATTERN...]  (MOUNT_DIR must be an existing directory)" >&2; exit 2
fi
[ "$(id -u)" = 0 ] || { echo "run.sh: pjdfstest needs root" >&2; exit 2; }
FSX_OPS="${FSX_OPS:-20000}"

need() {  # need BIN CRATE
    command -v "$1" >/dev/null 2>&1 && return
    [ -x "$HOME/.cargo/bin/$1" ] && { export PATH="$HOME/.cargo/bin:$PATH"; return; }
    echo "run.sh: installing $2 with cargo install (one time, about a minute)" >&2
    if ! dpkg -s libacl1-dev >/dev/null 2>&1 && command -v apt-get >/dev/null; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libacl1-dev; } >/dev/null 2>&1 || true
    fi
    cargo install --locked --quiet "$2" >&2 || { echo "run.sh: cargo install $2 failed" >&2; exit 2; }
    export PATH="$HOME/.cargo/bin:$PATH"
}
need pjdfstest pjdfstest
[ "$FSX_OPS" = 0 ] || need fsx fsx

OUT=$(mktemp -d "${TMPDIR:-/tmp}/conformance.XXXXXX")

# run_suite DIR LABEL -> writes $OUT/LABEL.log, prints "P F S"
run_suite() {
    local dir=$1 label=$2 work; shift 2
    work="$dir/pjdfstest.$$.$label"
    rm -rf "$work"; mkdir -p "$work" && chmod 0755 "$work" || { echo "cannot create $work" >&2; return 1; }
    ( cd "$work" && timeout 1800 pjdfstest -c "$CONF" -p "$work" "$@" ) > "$OUT/$label.log" 2>&1
    rm -rf "$work" 2>/dev/null
    local sum; sum=$(grep -E '^Summary:' "$OUT/$label.log" | tail -n1)
    if [ -z "$sum" ]; then echo "x x x"; return; fi
    echo "$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$sum") $(sed -E 's/^Summary: ([0-9]+) failed.*/\1/' <<<"$sum") $(sed -E 's/.* ([0-9]+) skipped.*/\1/' <<<"$sum")"
}
failed_names() { grep -E '[[:space:]]FAILED' "$1" | awk '{print $1}' | sort -u; }

read -r MP MF MS < <(run_suite "$MNT" mount "$@")
if [ "${SKIP_LOCAL:-0}" = 1 ]; then
    LP=- LF=- LS=-
else
    LDIR="${LOCAL_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/cf.XXXX")}"; chmod 0755 "$LDIR"
    read -r LP LF LS < <(run_suite "$LDIR" local "$@")
    [ -z "${LOCAL_DIR:-}" ] && rm -rf "$LDIR"
fi

FSX=skipped
if [ "$FSX_OPS" != 0 ]; then
    f="$MNT/fsx.$$"
    if ( cd "$OUT" && timeout 1800 fsx -N "$FSX_OPS" -S 7 -P "$OUT" "$f" ) > "$OUT/fsx.log" 2>&1 \
        && grep -q 'A-OK' "$OUT/fsx.log"; then FSX=OK; else FSX=FAIL; fi
    rm -f "$f"
fi

echo "== pjdfstest failures on the mount (log: $OUT/mount.log)"
failed_names "$OUT/mount.log" | sed 's/^/  /'
if [ -f "$OUT/local.log" ]; then
    regress=$(comm -23 <(failed_names "$OUT/mount.log") <(failed_names "$OUT/local.log") | wc -l)
else
    regress=$(failed_names "$OUT/mount.log" | wc -l)
fi
[ "$FSX" = FAIL ] && { echo "== fsx failed (log: $OUT/fsx.log)"; tail -n 20 "$OUT/fsx.log"; }
printf '\n%-10s %8s %8s %8s\n' "" passed failed skipped
printf '%-10s %8s %8s %8s\n' mount "$MP" "$MF" "$MS" local "$LP" "$LF" "$LS"
echo "conformance: pjdfstest passed=$MP failed=$MF skipped=$MS (local passed=$LP failed=$LF skipped=$LS) fsx=$FSX"
[ "$MP" != x ] && [ "$MP" -gt 0 ] && [ "$regress" = 0 ] && [ "$FSX" != FAIL ]
