#!/usr/bin/env bash
# check-secrets.sh — after a full test run, grep everything it logged for every secret
# it used.
#
# Usage:
#   check-secrets.sh RUN_DIR     RUN_DIR/secrets.tsv holds "label<TAB>secret" lines (the
#                                tests append one per VNC/SPICE password, token, token
#                                key, admin key and private key they use); every other
#                                file under RUN_DIR is a log of the run (vizor's
#                                stderr, audit logs, the test output). Fails naming the
#                                label and the file of each secret found, never the
#                                secret itself.
#   check-secrets.sh --self-test shows on a planted secret that the check finds one,
#                                and passes a clean log
set -euo pipefail

say() { printf 'check-secrets: %s\n' "$*" >&2; }

check() {
    local run=$1
    local table=$run/secrets.tsv
    [ -s "$table" ] || { say "no secrets registered in $table: nothing was checked"; return 1; }
    local patterns
    patterns=$(mktemp)
    # Secrets shorter than 4 bytes would match by chance; the tests use none.
    cut -f2- "$table" | awk 'length($0) >= 4' | sort -u > "$patterns"
    local secrets logs
    secrets=$(wc -l < "$patterns")
    logs=$(find "$run" -type f ! -name secrets.tsv | wc -l)
    local hits
    hits=$(grep -rlF --exclude=secrets.tsv -f "$patterns" "$run" || true)
    rm -f "$patterns"
    if [ -z "$hits" ]; then
        say "none of $secrets secrets appears in the $logs logs of the run"
        return 0
    fi
    # Name which secrets leaked where, by label.
    local label secret file
    while IFS=$'\t' read -r label secret; do
        [ ${#secret} -ge 4 ] || continue
        while read -r file; do
            [ -n "$file" ] || continue
            if grep -qF -- "$secret" "$file"; then
                say "LEAK: the secret registered as '$label' appears in $file"
            fi
        done <<< "$hits"
    done < "$table"
    return 1
}

self_test() {
    local run
    run=$(mktemp -d)
    trap 'rm -rf "$run"' RETURN
    printf 'vnc password\tplanted-s3cret-4711\n' > "$run/secrets.tsv"
    printf 'session started\nauthenticated with planted-s3cret-4711\n' > "$run/leaky.log"
    if check "$run" 2>/dev/null; then
        say "self-test failed: a planted secret was not found"
        return 1
    fi
    rm "$run/leaky.log"
    printf 'session started\n' > "$run/clean.log"
    check "$run" 2>/dev/null || { say "self-test failed: a clean log was refused"; return 1; }
    say "self-test passed: a planted secret is found, a clean log passes"
}

case ${1:-} in
    --self-test) self_test ;;
    ""|-h|--help) sed -n '2,15p' "$0"; exit 2 ;;
    *) check "$1" ;;
esac
