// Live view of the aggregator: polls the JSON API and renders task, status
// and the committed rounds. No data leaves the page; it only reads.

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;

function bytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(2)} MiB`;
}

function setText(id, text) {
  const el = $(id);
  if (el.textContent !== text) el.textContent = text;
}

async function getJson(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

function renderTask(t) {
  setText("task-id", `${t.task_id} — ${t.total_rounds} rounds, ${t.local_steps} local steps of batch ${t.batch_size}`);
  setText("task-model", `${t.model_id}${t.model_sha256 ? ` (sha256 ${t.model_sha256.slice(0, 12)}…)` : ""}`);
  const s = t.shape;
  const floats = s.modules * s.rank * s.rank + s.head_classes * (s.head_hidden + 1);
  setText("task-adapter", `LoRA-SB rank ${s.rank} on ${s.modules} modules + head ${s.head_classes}×${s.head_hidden}: ${floats.toLocaleString()} floats (${bytes(floats * 4)}) per update`);
  setText("task-privacy", t.privacy ? `DP-SGD, ε = ${t.privacy.epsilon}, δ = ${t.privacy.delta}, clip ${t.privacy.clip_norm}` : "off");
}

function renderStatus(s) {
  setText("state", s.state);
  setText("round", s.round == null ? `finished after ${s.last_committed_round}` : `${s.round} of ${s.total_rounds}`);
  setText("connected", String(s.participants_connected));
  setText("updates", `${s.updates_in_round} (quorum ${s.min_participants}, at most ${s.max_participants})`);
  setText("deadline", s.deadline_unix_ms ? new Date(s.deadline_unix_ms).toLocaleTimeString() : "—");
}

function renderRounds(rounds) {
  const body = $("rounds");
  const rows = rounds.slice().reverse().map((r) => {
    const tr = document.createElement("tr");
    const cells = [
      r.round === 0 ? "0 (initial)" : String(r.round),
      String(r.participants),
      String(r.total_samples),
      r.mean_train_loss == null ? "—" : r.mean_train_loss.toFixed(4),
      bytes(r.bytes_in),
      bytes(r.bytes_out),
      `${(r.duration_ms / 1000).toFixed(1)} s`,
      new Date(r.committed_unix_ms).toLocaleTimeString(),
    ];
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = c;
      tr.appendChild(td);
    }
    return tr;
  });
  body.replaceChildren(...rows);
}

async function poll() {
  try {
    const [status, rounds] = await Promise.all([getJson("/api/status"), getJson("/api/rounds")]);
    renderStatus(status);
    renderRounds(rounds);
    $("error").hidden = true;
  } catch (e) {
    $("error").textContent = `Cannot reach the aggregator: ${e.message}`;
    $("error").hidden = false;
  }
  setTimeout(poll, POLL_MS);
}

getJson("/api/task").then(renderTask).catch((e) => {
  $("error").textContent = `Cannot load the task: ${e.message}`;
  $("error").hidden = false;
});
poll();
