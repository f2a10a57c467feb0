# Helpers shared by the scripts that run `fedsb` for BENCHMARKS.md's tables
# (fed_sb_lr_sweep.sh, fed_sb_pooled_draw.sh). Source it after `set -euo
# pipefail`; `run` writes under the caller's $out.

# require FILE...: every input exists, or name the first one missing, say how
# to make it, and stop (exit 2).
require() {
    local f
    for f in "$@"; do
        [[ -e $f ]] || { echo "missing $f (cargo build --release --bin fedsb; cargo xtask fetch-model; cargo xtask fetch-data)" >&2; exit 2; }
    done
}

# run LOG CMD...: stdout to $out/LOG.jsonl, stderr to $out/LOG.log; shows the
# last JSON line on stderr, or on failure the end of the log, and stops.
run() {
    local log=$1
    shift
    if ! "$@" > "$out/$log.jsonl" 2> "$out/$log.log"; then
        echo "failed: $*" >&2
        tail -n 20 "$out/$log.log" >&2
        exit 1
    fi
    tail -n 1 "$out/$log.jsonl" >&2
}
