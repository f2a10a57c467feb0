#!/usr/bin/env bash
# One draw of the operator's pooled LoRA-SB initialization per seed, then
# Fed-SB (`fedsb sim`, 10 IID clients × 10 rounds × 2 local steps) and
# centralized LoRA-SB (`fedsb train`, 200 steps) from it: the runs behind
# BENCHMARKS.md's "A second pooled draw" and "A third pooled draw" tables.
#
#   scripts/fed_sb_pooled_draw.sh OUT_DIR ORDER [ADAPTER]
#
# ORDER picks which 64 sentences a seed's shuffle draws, by the order of the
# training file's rows that `fedsb init` reads (the seed still fixes the
# head and the shuffle, so the draws differ only in their sentences):
#   as-is     the file as it is (the first draw, "Seeds 5 and 6")
#   reversed  its rows reversed (the second draw)
#   rotated   its second half first (the third draw)
# The simulation and centralized training read the file as it is, so the
# shards and batches are the same for every ORDER.
#
# ADAPTER: part of the wgpu adapter's name (`fedsb` prints it).
# Settings come from the environment (defaults in brackets; the defaults
# are BENCHMARKS' recipe):
#   FEDSB [target/release/fedsb]   MODEL [models/all-MiniLM-L6-v2]
#   DATA [data/sst2]   SEEDS ["0 1 2 3 4 5 6"]   CLIENTS [10]   ROUNDS [10]
#   LOCAL_STEPS [2]   RANK [32]   BATCH [32]   INIT_SAMPLES [64]
#   MAX_SEQ_LEN [128]   LABELS [0,1] (the head's class order, which a
#   reordered file's first rows would otherwise set)
# Centralized training takes CLIENTS × ROUNDS × LOCAL_STEPS steps and is
# evaluated every 2 × CLIENTS × LOCAL_STEPS (after as many steps as the
# clients have taken in all after every second round).
# Writes OUT_DIR/train-ORDER.tsv and, per seed S, init-sS.{safetensors,jsonl,log},
# sim-sS.{jsonl,csv,log} and train-sS.{jsonl,log}; a seed whose three files
# are complete is not run again, so the script resumes where it stopped.
# Prints each seed's accuracies and gap, and their mean, last. About 19
# minutes a seed on lavapipe (2 cores).
set -euo pipefail
# shellcheck source=lib/runs.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/runs.sh"

out=${1:?usage: scripts/fed_sb_pooled_draw.sh OUT_DIR as-is|reversed|rotated [ADAPTER]}
order=${2:?usage: scripts/fed_sb_pooled_draw.sh OUT_DIR as-is|reversed|rotated [ADAPTER]}
adapter=${3:-}
fedsb=${FEDSB:-target/release/fedsb}
model=${MODEL:-models/all-MiniLM-L6-v2}
data=${DATA:-data/sst2}
seeds=${SEEDS:-0 1 2 3 4 5 6}
clients=${CLIENTS:-10}
rounds=${ROUNDS:-10}
local_steps=${LOCAL_STEPS:-2}
rank=${RANK:-32}
batch=${BATCH:-32}
init_samples=${INIT_SAMPLES:-64}
max_seq_len=${MAX_SEQ_LEN:-128}
labels=${LABELS:-0,1}
steps=$((clients * rounds * local_steps))
eval_every=$((2 * clients * local_steps))
for s in $seeds; do
    [[ $s =~ ^[0-9]+$ ]] || { echo "SEEDS: whole numbers, not $s" >&2; exit 2; }
done
require "$fedsb" "$model/config.json" "$data/train.tsv" "$data/dev.tsv"
mkdir -p "$out"

ordered=$out/train-$order.tsv
case $order in
    as-is) cp "$data/train.tsv" "$ordered" ;;
    reversed) { head -n 1 "$data/train.tsv"; tail -n +2 "$data/train.tsv" | tac; } > "$ordered" ;;
    rotated)
        rows=$(($(wc -l < "$data/train.tsv") - 1))
        half=$((rows / 2))
        # (sed, not tail | head: head's early exit would fail the pipe)
        { head -n 1 "$data/train.tsv"; tail -n +$((half + 2)) "$data/train.tsv"; \
          sed -n "2,$((half + 1))p" "$data/train.tsv"; } > "$ordered"
        ;;
    *) echo "ORDER: as-is, reversed or rotated, not $order" >&2; exit 2 ;;
esac

# done_with LOG: the run finished (its last line is the final JSON).
done_with() {
    [[ -s $out/$1.jsonl ]] && python3 -c "import json, sys; json.loads(open(sys.argv[1]).read().splitlines()[-1])" "$out/$1.jsonl" 2>/dev/null
}
pick=()
[[ -n $adapter ]] && pick=(--adapter "$adapter")
shape=(--rank "$rank" --batch "$batch" --max-seq-len "$max_seq_len" "${pick[@]}")

for s in $seeds; do
    if ! done_with "init-s$s" || [[ ! -s $out/init-s$s.safetensors ]]; then
        echo "== seed $s: init on $order" >&2
        run "init-s$s" "$fedsb" init --model "$model" --train "$ordered" --labels "$labels" \
            --init-samples "$init_samples" --lr 1e-3 --seed "$s" --centre-head \
            --out "$out/init-s$s.safetensors" "${shape[@]}"
    fi
    if ! done_with "sim-s$s" || [[ $(wc -l < "$out/sim-s$s.jsonl") -le $rounds ]]; then
        echo "== seed $s: Fed-SB, $clients clients × $rounds rounds × $local_steps local steps" >&2
        run "sim-s$s" "$fedsb" sim --model "$model" --train "$data/train.tsv" \
            --eval "$data/dev.tsv" --clients "$clients" --rounds "$rounds" \
            --local-steps "$local_steps" --lr 1e-2 --init "$out/init-s$s.safetensors" \
            --seed "$s" --json --split iid --server-lr 0.7 --server-momentum 0.5 \
            --csv "$out/sim-s$s.csv" "${shape[@]}"
    fi
    if ! done_with "train-s$s" || ! grep -q '"samples_per_second"' "$out/train-s$s.jsonl"; then
        echo "== seed $s: centralized, $steps steps" >&2
        run "train-s$s" "$fedsb" train --model "$model" --train "$data/train.tsv" \
            --eval "$data/dev.tsv" --steps "$steps" --lr 1e-3 --eval-every "$eval_every" \
            --seed "$s" --json --init "$out/init-s$s.safetensors" "${shape[@]}"
    fi
done

python3 - "$out" $seeds <<'PY'
import json, statistics, sys
out, seeds = sys.argv[1], sys.argv[2:]
def last(path, key):
    rows = [json.loads(l) for l in open(path) if l.startswith("{")]
    return [r for r in rows if key in r][-1]
gaps = []
print("seed  initial  Fed-SB  centralized  gap")
for s in seeds:
    sim = [json.loads(l) for l in open(f"{out}/sim-s{s}.jsonl") if l.startswith("{")]
    sim = [r for r in sim if "round" in r]
    central = last(f"{out}/train-s{s}.jsonl", "samples_per_second")["eval_accuracy"]
    fed = sim[-1]["eval_accuracy"]
    gaps.append(100 * (central - fed))
    print(f"{s:>4}  {100 * sim[0]['eval_accuracy']:6.2f} %  {100 * fed:5.2f} %  {100 * central:8.2f} %  {gaps[-1]:5.2f}")
if len(gaps) > 1:
    sd = statistics.stdev(gaps)
    print(f"mean gap {statistics.mean(gaps):.2f} points (standard deviation {sd:.2f}, standard error {sd / len(gaps) ** 0.5:.2f})")
PY
