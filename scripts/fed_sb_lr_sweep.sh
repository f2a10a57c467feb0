#!/usr/bin/env bash
# Fed-SB on SST-2 against centralized LoRA-SB at several learning rates, all
# from one LoRA-SB initialization (η = INIT_LR): the runs behind
# BENCHMARKS.md's "Fed-SB on SST-2" learning-rate rows. Meant for a real GPU
# (at the defaults a run is minutes on an H200, days on lavapipe).
#
#   scripts/fed_sb_lr_sweep.sh OUT_DIR [ADAPTER]
#
# ADAPTER: part of the wgpu adapter's name (`fedsb` prints it), e.g. nvidia.
# Settings come from the environment (defaults in brackets):
#   FEDSB [target/release/fedsb]   MODEL [models/all-MiniLM-L6-v2]
#   DATA [data/sst2]   CLIENTS [10]   ROUNDS [10]   LOCAL_STEPS [12]
#   LRS ["1e-3 3e-3 1e-2"] (the clients' and the centralized run's AdamW rate)
#   INIT_LR [1e-3]   INIT_SAMPLES [256]   EVAL_LIMIT [0: the whole dev set]
#   RANK [32]   BATCH [32]   MAX_SEQ_LEN [128]
#   EVAL_EVERY [CLIENTS × LOCAL_STEPS: the centralized run is evaluated after
#     as many steps as the clients have taken in all after each round]
#   SPLITS ["iid"] (also dirichlet:0.5, ...)   CENTRALIZED [1: also fedsb train]
#   MOMENTS ["reset"] ("reset keep" runs every Fed-SB setting twice: the
#     clients' AdamW moments reset every round, and carried with --keep-moments)
#   DECAYS ["1"] (per-round decays of the clients' rate, --lr-decay; "1 0.85"
#     runs every Fed-SB setting at a constant rate and decayed by 0.85 a round)
#   SERVERS ["1:0"] (the server's step as η:β, --server-lr η --server-momentum
#     β; "1:0 0.5:0.5" runs every Fed-SB setting with the plain mean and with
#     FedAvgM at η 0.5, β 0.5)
# Writes OUT_DIR/init.{safetensors,jsonl,log}, one
# sim-<split>-lr<LR>[-decay<D>][-server<η>m<β>][-keep].{jsonl,csv,log} per
# run (-decay only for D ≠ 1, -server only for η:β ≠ 1:0) and
# train-lr<LR>.{jsonl,log}; stops at the first failure and shows the end of
# its log.
set -euo pipefail
# shellcheck source=lib/runs.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/runs.sh"

out=${1:?usage: scripts/fed_sb_lr_sweep.sh OUT_DIR [ADAPTER]}
adapter=${2:-}
fedsb=${FEDSB:-target/release/fedsb}
model=${MODEL:-models/all-MiniLM-L6-v2}
data=${DATA:-data/sst2}
clients=${CLIENTS:-10}
rounds=${ROUNDS:-10}
local_steps=${LOCAL_STEPS:-12}
lrs=${LRS:-1e-3 3e-3 1e-2}
init_lr=${INIT_LR:-1e-3}
init_samples=${INIT_SAMPLES:-256}
eval_limit=${EVAL_LIMIT:-0}
eval_every=${EVAL_EVERY:-$((clients * local_steps))}
splits=${SPLITS:-iid}
rank=${RANK:-32}
batch=${BATCH:-32}
max_seq_len=${MAX_SEQ_LEN:-128}
centralized=${CENTRALIZED:-1}
moments=${MOMENTS:-reset}
for m in $moments; do
    [[ $m == reset || $m == keep ]] || { echo "MOMENTS: reset or keep, not $m" >&2; exit 2; }
done
decays=${DECAYS:-1}
servers=${SERVERS:-1:0}
for sv in $servers; do
    [[ $sv =~ ^[0-9.eE+-]+:[0-9.eE+-]+$ ]] || { echo "SERVERS: η:β pairs such as 0.5:0.5, not $sv" >&2; exit 2; }
done

require "$fedsb" "$model/config.json" "$data/train.tsv" "$data/dev.tsv"
mkdir -p "$out"
pick=()
[[ -n $adapter ]] && pick=(--adapter "$adapter")
common=(--model "$model" --train "$data/train.tsv" --rank "$rank" --batch "$batch"
    --max-seq-len "$max_seq_len" --seed 0 "${pick[@]}")

echo "== init: η $init_lr on $init_samples samples" >&2
run init "$fedsb" init "${common[@]}" --init-samples "$init_samples" --lr "$init_lr" \
    --out "$out/init.safetensors"

for lr in $lrs; do
    for split in $splits; do
        for decay in $decays; do
          for sv in $servers; do
            server_lr=${sv%%:*}
            server_momentum=${sv##*:}
            for m in $moments; do
                name="sim-${split//:/}-lr$lr"
                [[ $decay == 1 ]] || name+="-decay$decay"
                [[ $sv == 1:0 ]] || name+="-server${server_lr}m$server_momentum"
                keep=()
                if [[ $m == keep ]]; then
                    name+="-keep"
                    keep=(--keep-moments)
                fi
                echo "== $name: $clients clients × $local_steps local steps × $rounds rounds" >&2
                run "$name" "$fedsb" sim "${common[@]}" --eval "$data/dev.tsv" --clients "$clients" \
                    --rounds "$rounds" --local-steps "$local_steps" --lr "$lr" --lr-decay "$decay" \
                    --init "$out/init.safetensors" --eval-limit "$eval_limit" --split "$split" \
                    --server-lr "$server_lr" --server-momentum "$server_momentum" \
                    --json --csv "$out/$name.csv" "${keep[@]}"
            done
          done
        done
    done
    if [[ $centralized == 1 ]]; then
        steps=$((clients * rounds * local_steps))
        echo "== train-lr$lr: $steps steps, evaluated every $eval_every" >&2
        run "train-lr$lr" "$fedsb" train "${common[@]}" --eval "$data/dev.tsv" --steps "$steps" \
            --lr "$lr" --init-lr "$init_lr" --init-samples "$init_samples" \
            --eval-limit "$eval_limit" --eval-every "$eval_every" --json
    fi
done
echo "== done: $out" >&2
