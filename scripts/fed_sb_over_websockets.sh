#!/usr/bin/env bash
# The Fed-SB recipe of BENCHMARKS.md ("A centred initial head") run over
# real WebSockets: one `fedsb serve` aggregator and one `fedsb join` process
# per client, each on its own shard, instead of `fedsb sim`'s single process.
#
#   scripts/fed_sb_over_websockets.sh OUT_DIR [ADAPTER]
#
# 1. `fedsb sim --rounds 1 --write-shards` cuts the training file into the
#    simulator's shards (same split, seed and batch seeds as the full
#    simulation) and writes its initial model, `init.safetensors` (with
#    CENTRE=1 the head centred, as `fedsb init --centre-head`; with
#    INIT=federated the simulator's own federated initialization,
#    `--federated-init FED_INIT_SAMPLES`).
# 2. The task: INIT=file serves that adapter file (the simulation's exact
#    start); INIT=federated makes A, B and R₀ from the participants' own
#    FED_INIT_SAMPLES first examples each (`[adapter] init = "federated"`),
#    with CENTRE=1 also centring the head over the protocol
#    (`centre_head = true`).
# 3. `fedsb serve` and one `fedsb join --data client-<i>.jsonl --seed <batch
#    seed>` per client; quorum = CLIENTS, so every round has every client.
# 4. The aggregator evaluates every committed round on EVAL; the rounds are
#    written to OUT_DIR/rounds.json and printed as a table. With COMPARE=1
#    the full simulation runs too (OUT_DIR/sim.jsonl; with INIT=federated
#    it initializes federatedly as well) and the script fails unless every
#    round's accuracy and loss are the simulator's (loss within 1e-6
#    relative) and round 0's upload is the simulator's.
#
# ADAPTER: part of the wgpu adapter's name, for every process. Settings
# from the environment (defaults in brackets: the recipe of BENCHMARKS.md):
#   FEDSB [target/release/fedsb]   MODEL [models/all-MiniLM-L6-v2]
#   TRAIN [data/sst2/train.tsv]   EVAL [data/sst2/dev.tsv]   SEED [0]
#   CLIENTS [10]   ROUNDS [10]   LOCAL_STEPS [2]   SPLIT [iid]   BATCH [32]
#   RANK [32]   LR [1e-2]   INIT_LR [1e-3]   INIT_SAMPLES [64] (the
#   simulator's pooled initialization)   SERVER_LR [0.7]
#   SERVER_MOMENTUM [0.5]   MAX_SEQ_LEN [128]   CENTRE [1]   INIT [file]
#   FED_INIT_SAMPLES [7] (per client with INIT=federated: 10 × 7 = 70, close
#   to the 64 pooled ones)   LABELS [the training file's classes]
#   COMPARE [0]
# Logs: OUT_DIR/{sim-shards,serve}.log and join-<i>.{log,json}.
set -euo pipefail

out=${1:?usage: scripts/fed_sb_over_websockets.sh OUT_DIR [ADAPTER]}
adapter=${2:-}
fedsb=$(realpath "${FEDSB:-target/release/fedsb}")
model=$(realpath "${MODEL:-models/all-MiniLM-L6-v2}")
train=$(realpath "${TRAIN:-data/sst2/train.tsv}")
eval_file=$(realpath "${EVAL:-data/sst2/dev.tsv}")
seed=${SEED:-0}
clients=${CLIENTS:-10}
rounds=${ROUNDS:-10}
local_steps=${LOCAL_STEPS:-2}
split=${SPLIT:-iid}
batch=${BATCH:-32}
rank=${RANK:-32}
lr=${LR:-1e-2}
init_lr=${INIT_LR:-1e-3}
init_samples=${INIT_SAMPLES:-64}
server_lr=${SERVER_LR:-0.7}
server_momentum=${SERVER_MOMENTUM:-0.5}
max_seq_len=${MAX_SEQ_LEN:-128}
centre=${CENTRE:-1}
init=${INIT:-file}
fed_init_samples=${FED_INIT_SAMPLES:-7}
compare=${COMPARE:-0}
[[ $centre == 0 || $centre == 1 ]] || { echo "CENTRE: 0 or 1, not $centre" >&2; exit 2; }
[[ $init == file || $init == federated ]] || { echo "INIT: file or federated, not $init" >&2; exit 2; }
mkdir -p "$out"
out=$(realpath "$out")
rm -rf "$out/shards" "$out/state" "$out"/cache-* "$out"/join-*
adapter_args=()
[[ -n $adapter ]] && adapter_args=(--adapter "$adapter")
label_args=()
[[ -n ${LABELS:-} ]] && label_args=(--labels "$LABELS")
centre_args=()
[[ $centre == 1 ]] && centre_args=(--centre-head)
# The simulator's initialization: the operator's from pooled examples, or
# the clients' own (the aggregator's with INIT=federated).
init_args=(--init-samples "$init_samples")
[[ $init == federated ]] && init_args=(--federated-init "$fed_init_samples")

sim() {
    "$fedsb" sim --model "$model" --train "$train" --eval "$eval_file" \
        --clients "$clients" --local-steps "$local_steps" --batch "$batch" \
        --rank "$rank" --lr "$lr" --init-lr "$init_lr" \
        "${init_args[@]}" --seed "$seed" --split "$split" \
        --server-lr "$server_lr" --server-momentum "$server_momentum" \
        --max-seq-len "$max_seq_len" --json \
        ${centre_args[@]+"${centre_args[@]}"} ${label_args[@]+"${label_args[@]}"} \
        ${adapter_args[@]+"${adapter_args[@]}"} "$@"
}

echo "$(date -u +%T) writing the shards and the initial model" >&2
sim --rounds 1 --write-shards "$out/shards" > /dev/null 2> "$out/sim-shards.log" || {
    tail -20 "$out/sim-shards.log" >&2
    exit 1
}
if [[ $init == file ]]; then
    adapter_toml="file = \"$out/shards/init.safetensors\""
else
    centre_toml=false
    [[ $centre == 1 ]] && centre_toml=true
    adapter_toml="init = \"federated\"
init_samples = $fed_init_samples
init_learning_rate = $init_lr
init_seed = $seed
centre_head = $centre_toml"
fi
python3 - "$out" "$rounds" "$clients" "$model" "$eval_file" "$adapter_toml" <<'PY'
import json, sys
out, rounds, clients, model, eval_file, adapter = sys.argv[1:]
t = json.load(open(f"{out}/shards/shards.json"))["task"]
labels = ", ".join(json.dumps(l) for l in t["labels"])
open(f"{out}/task.toml", "w").write(f'''[task]
id = "fed-sb-over-websockets"
rounds = {rounds}
min_participants = {clients}
max_participants = {clients}
round_deadline_secs = 7200
labels = [{labels}]
local_steps = {t["local_steps"]}
batch_size = {t["batch_size"]}
learning_rate = {t["learning_rate"]}
head_learning_rate = {t["head_learning_rate"]}
lr_decay = {t["lr_decay"]}
lr_warmup_rounds = {t["lr_warmup_rounds"]}
server_learning_rate = {t["server_learning_rate"]}
server_momentum = {t["server_momentum"]}
max_seq_len = {t["max_seq_len"]}
[model]
id = "model"
dir = "{model}"
[adapter]
rank = {t["rank"]}
modules = {json.dumps(t["modules"])}
{adapter}
[eval]
file = "{eval_file}"
batch_size = {t["batch_size"]}
[server]
bind = "127.0.0.1"
port = 0
state_dir = "{out}/state"
ping_interval_secs = 10
idle_timeout_secs = 3600
''')
PY

echo "$(date -u +%T) starting the aggregator" >&2
"$fedsb" serve --config "$out/task.toml" > "$out/serve.out" 2> "$out/serve.log" &
serve=$!
trap 'kill $serve 2> /dev/null || true' EXIT
url=
for _ in $(seq 120); do
    url=$(sed -n 's|^fedsb listening on \(http://[^ ]*\)/$|\1|p' "$out/serve.out")
    [[ -n $url ]] && break
    kill -0 $serve 2> /dev/null || { tail -20 "$out/serve.log" >&2; exit 1; }
    sleep 1
done
[[ -n $url ]] || { echo "the aggregator did not start" >&2; exit 1; }
echo "$(date -u +%T) $url: $clients participants joining" >&2
pids=()
for i in $(seq 1 "$clients"); do
    batch_seed=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['clients'][int(sys.argv[2]) - 1]['batch_seed'])" "$out/shards/shards.json" "$i")
    "$fedsb" join --server "${url/http:/ws:}" --data "$out/shards/client-$i.jsonl" \
        --seed "$batch_seed" --cache-dir "$out/cache-$i" \
        ${adapter_args[@]+"${adapter_args[@]}"} \
        > "$out/join-$i.json" 2> "$out/join-$i.log" &
    pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "fedsb join $((i + 1)) failed:" >&2; tail -5 "$out/join-$((i + 1)).log" >&2; failed=1; }
done
[[ $failed == 0 ]] || exit 1
echo "$(date -u +%T) every participant finished; waiting for the evaluations" >&2
for _ in $(seq 7200); do
    curl -sf "$url/api/rounds" > "$out/rounds.json" || true
    python3 - "$out/rounds.json" "$rounds" <<'PY' && break
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except ValueError:
    sys.exit(1)
sys.exit(0 if len(r) == int(sys.argv[2]) + 1 and all(x.get("eval") for x in r) else 1)
PY
    sleep 1
done
grep -h "initial head centred\|federated initialization done\|centring the initial head" "$out/serve.log" | cut -c1-400 >&2 || true
python3 - "$out/rounds.json" <<'PY'
import json, sys
print("round  participants  samples  bytes_in  accuracy  loss")
for r in json.load(open(sys.argv[1])):
    e = r["eval"]
    print(f'{r["round"]:5}  {r["participants"]:12}  {r["total_samples"]:7}  {r["bytes_in"]:8}  {100 * e["accuracy"]:7.2f} %  {e["loss"]:.4f}')
PY
if [[ $compare == 1 ]]; then
    echo "$(date -u +%T) the same run in the simulator" >&2
    sim --rounds "$rounds" > "$out/sim.jsonl" 2> "$out/sim.log"
    python3 - "$out/rounds.json" "$out/sim.jsonl" <<'PY'
import json, sys
ws = json.load(open(sys.argv[1]))
sim = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
bad = []
if ws and sim and ws[0]["bytes_in"] != sim[0]["bytes_up"]:
    bad.append(("round 0 bytes", ws[0]["bytes_in"], sim[0]["bytes_up"]))
for w, s in zip(ws, sim):
    a, l = w["eval"]["accuracy"], w["eval"]["loss"]
    if a != s["eval_accuracy"] or abs(l - s["eval_loss"]) > 1e-6 * abs(l):
        bad.append((w["round"], a, s["eval_accuracy"], l, s["eval_loss"]))
if len(ws) != len(sim) or bad:
    sys.exit(f"the WebSocket run differs from the simulation: {bad or (len(ws), len(sim))}")
print(f"every round's evaluation equals the simulator's ({len(ws)} rounds)")
PY
fi
echo "$(date -u +%T) done" >&2
