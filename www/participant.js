// The "Join" section: this tab as a participant. The chosen file is read
// here and handed to participant-worker.js, which parses it with the task's
// classes (preview), trains on WebGPU and sends only the updates; the file's
// text never leaves the tab.

const $ = (id) => document.getElementById(id);
const fileInput = $("join-file");
const joinButton = $("join-button");
const leaveButton = $("leave-button");
const gpuNote = $("join-gpu");
const statusEl = $("join-status");
const errorEl = $("join-error");

let worker = null;
let file = null; // {text, fileName}
let joined = false;
let gpuOk = "gpu" in navigator;
let lossChart = null;

// For tests and the curious: every frame this tab sent, every update, the
// latest status and the last 500 distinct status messages (log).
window.fedsbParticipant = { sent: [], updates: [], status: null, log: [] };

// `?seed=N` in the page's address seeds this tab's batch shuffle (and its
// draw of a federated initialization's examples), as `fedsb join --seed N`
// does: the same batches in the same order. Without it each join shuffles
// with a random seed (and draws with seed 0). DP tasks sample their batches
// and noise from OS entropy either way.
function shuffleSeed() {
  const raw = new URLSearchParams(location.search).get("seed");
  if (raw === null) return { seed: null };
  if (/^[0-9]{1,20}$/.test(raw) && BigInt(raw) < 2n ** 64n) return { seed: raw };
  return { error: `the address's seed=${JSON.stringify(raw)} is not a whole number from 0 to 18446744073709551615` };
}

function columns() {
  return {
    text: $("join-text-col").value || null,
    textPair: $("join-pair-col").value || null,
    label: $("join-label-col").value || null,
  };
}

function showError(message) {
  errorEl.textContent = message || "";
  errorEl.hidden = !message;
}

function setJoinEnabled() {
  joinButton.disabled = !gpuOk || !file || joined || !$("join-preview").dataset.ok;
}

function ensureWorker() {
  if (worker) return worker;
  worker = new Worker(new URL("participant-worker.js", import.meta.url), { type: "module" });
  worker.onmessage = (ev) => onWorkerMessage(ev.data);
  worker.onerror = (ev) => showError(`participant worker: ${ev.message || "failed to start"}`);
  return worker;
}

// Header columns of a CSV/TSV/JSONL text, for the column selectors.
function headerColumns(text, fileName) {
  const first = text.split(/\r?\n/).find((l) => l.trim() !== "") || "";
  const lower = fileName.toLowerCase();
  try {
    if (/\.(jsonl|ndjson|json)$/.test(lower)) return Object.keys(JSON.parse(first));
  } catch {
    return [];
  }
  const delim = /\.(tsv|tab)$/.test(lower) ? "\t" : ",";
  return first.split(delim).map((c) => c.trim().replace(/^"(.*)"$/, "$1"));
}

function fillSelect(select, names) {
  const keep = select.value;
  select.replaceChildren(new Option("(detect)", ""));
  for (const n of names) select.add(new Option(n, n));
  if (names.includes(keep)) select.value = keep;
}

function requestPreview() {
  if (!file) return;
  $("join-preview").dataset.ok = "";
  setJoinEnabled();
  ensureWorker().postMessage({ type: "preview", text: file.text, fileName: file.fileName, columns: columns() });
}

function renderPreview(p) {
  const el = $("join-preview");
  const cols = [p.text_column, p.text_pair_column, p.label_column].filter(Boolean);
  const counts = p.label_counts.map(([name, n]) => `${name}: ${n}`).join(", ");
  const rows = p.first_rows
    .map((r) => {
      const tr = document.createElement("tr");
      for (const v of [r.text, r.text_pair ?? "", r.label ?? ""]) {
        const td = document.createElement("td");
        td.textContent = v;
        tr.append(td);
      }
      return tr;
    });
  el.replaceChildren();
  const summary = document.createElement("p");
  summary.id = "join-summary";
  summary.textContent = `${p.rows} rows (${counts}); columns: ${cols.join(", ")}`;
  const table = document.createElement("table");
  const head = document.createElement("tr");
  for (const h of [p.text_column, p.text_pair_column ?? "", p.label_column ?? ""]) {
    const th = document.createElement("th");
    th.textContent = h;
    head.append(th);
  }
  table.append(head, ...rows);
  el.append(summary, table);
  el.dataset.ok = "1";
}

function renderLosses(losses) {
  const list = $("join-losses");
  list.replaceChildren(
    ...losses.map((l) => {
      const li = document.createElement("li");
      li.textContent =
        `round ${l.round}: loss ${l.loss.toFixed(4)}, ${l.samples} samples in ${l.seconds.toFixed(1)} s (${l.samplesPerSecond.toFixed(1)} samples/s)` +
        (l.epsilonSpent != null ? `, privacy spent ε = ${l.epsilonSpent.toFixed(3)} of ${l.epsilonBudget}` : "");
      return li;
    }),
  );
  if (typeof uPlot === "undefined" || losses.length === 0) return;
  const data = [losses.map((l) => l.round), losses.map((l) => l.loss)];
  if (!lossChart) {
    lossChart = new uPlot(
      {
        width: 480,
        height: 200,
        scales: { x: { time: false } },
        series: [{ label: "round" }, { label: "local train loss", stroke: "#1f6feb" }],
      },
      data,
      $("join-chart"),
    );
  } else {
    lossChart.setData(data);
  }
}

function onWorkerMessage(m) {
  if (m.type === "preview") {
    if (m.error) {
      $("join-preview").replaceChildren();
      showError(m.error);
    } else {
      showError("");
      renderPreview(m.preview);
    }
    setJoinEnabled();
    return;
  }
  if (m.type === "sent") {
    window.fedsbParticipant.sent.push({ kind: m.kind, bytes: m.bytes });
    return;
  }
  if (m.type === "update") {
    window.fedsbParticipant.updates.push(m);
    return;
  }
  if (m.type !== "status") return;
  window.fedsbParticipant.status = m;
  const log = window.fedsbParticipant.log;
  if (m.message && log[log.length - 1] !== m.message) {
    log.push(m.message);
    if (log.length > 500) log.shift();
  }
  const dl = m.bytesTotal
    ? `${(m.bytesDownloaded / 1048576).toFixed(2)} MiB downloaded${m.filesCached ? `, ${m.filesCached} files from the cache` : ""}`
    : "";
  $("join-phase").textContent = m.phase;
  $("join-round").textContent = m.round ?? "…";
  $("join-adapter").textContent = m.adapter ?? "…";
  if (m.adapterFallback && gpuNote.hidden) {
    gpuNote.textContent =
      "This browser runs WebGPU on a software fallback adapter, that is on the CPU: the tab trains, " +
      "but many times slower than on a GPU. Enable hardware acceleration or use a browser that " +
      "exposes the GPU to WebGPU to train faster.";
    gpuNote.hidden = false;
  }
  $("join-download").textContent = (dl || "…") + (m.cacheWarning ? ` (not cached: ${m.cacheWarning})` : "");
  $("join-speed").textContent = m.samplesPerSecond ? `${m.samplesPerSecond.toFixed(1)} samples/s` : "…";
  // DP tasks: what this tab has spent of its budget (none: no DP).
  $("join-privacy").textContent = m.privacy
    ? `privacy spent ε = ${m.privacy.epsilon_spent.toFixed(3)} of ${m.privacy.epsilon_budget} ` +
      `(δ = ${m.privacy.delta}, σ = ${m.privacy.noise_multiplier.toFixed(3)}, ` +
      `${m.privacy.steps_taken} of ${m.privacy.planned_steps} DP-SGD steps)`
    : m.task
      ? "no differential privacy"
      : "…";
  statusEl.textContent = m.message;
  showError(m.error);
  renderLosses(m.losses);
  if (["finished", "left", "disconnected", "error"].includes(m.phase)) {
    joined = false;
    leaveButton.disabled = true;
    // A new WebSocket needs a fresh worker (and WebGPU device).
    worker.terminate();
    worker = null;
    setJoinEnabled();
  }
  if (m.error && /device (was )?lost|DeviceLost/i.test(m.error)) {
    gpuOk = false;
    gpuNote.textContent = "The WebGPU device was lost; reload the page to try again.";
    gpuNote.hidden = false;
    setJoinEnabled();
  }
}

fileInput.addEventListener("change", async () => {
  const f = fileInput.files[0];
  file = null;
  $("join-preview").replaceChildren();
  if (!f) return setJoinEnabled();
  file = { text: await f.text(), fileName: f.name };
  const names = headerColumns(file.text, file.fileName);
  for (const id of ["join-text-col", "join-pair-col", "join-label-col"]) fillSelect($(id), names);
  requestPreview();
});
for (const id of ["join-text-col", "join-pair-col", "join-label-col"]) {
  $(id).addEventListener("change", requestPreview);
}

// A demo shard: public example data the aggregator hands out (`[demo]` in
// the task), for volunteers without data of their own.
const demoButton = $("join-demo");
fetch("/api/demo", { cache: "no-store" })
  .then((r) => (r.ok ? r.json() : { enabled: false }))
  .then((d) => {
    if (!d.enabled) return;
    demoButton.textContent = `or use a demo shard (${d.shard_rows} rows)`;
    demoButton.hidden = false;
  })
  .catch(() => {});
demoButton.addEventListener("click", async () => {
  if (joined) return;
  try {
    const r = await fetch("/api/demo-shard", { cache: "no-store" });
    if (!r.ok) throw new Error(`GET /api/demo-shard: HTTP ${r.status}`);
    const name = /filename="([^"]+)"/.exec(r.headers.get("content-disposition") || "");
    fileInput.value = "";
    file = { text: await r.text(), fileName: name ? name[1] : "demo-shard.tsv" };
    $("join-preview").replaceChildren();
    const names = headerColumns(file.text, file.fileName);
    for (const id of ["join-text-col", "join-pair-col", "join-label-col"]) fillSelect($(id), names);
    requestPreview();
  } catch (e) {
    showError(`Cannot get a demo shard: ${e.message}`);
  }
});

joinButton.addEventListener("click", () => {
  if (!file) return;
  const { seed, error } = shuffleSeed();
  if (error) {
    showError(`Cannot join: ${error}`);
    return;
  }
  joined = true;
  setJoinEnabled();
  leaveButton.disabled = false;
  showError("");
  ensureWorker().postMessage({ type: "join", text: file.text, fileName: file.fileName, columns: columns(), seed });
});

leaveButton.addEventListener("click", () => {
  if (worker) worker.postMessage({ type: "leave" });
  leaveButton.disabled = true;
});

if (!gpuOk) {
  gpuNote.textContent = "This browser does not expose WebGPU (navigator.gpu), so this tab cannot train. Use a browser with WebGPU enabled (Chrome/Edge 113+, or Firefox/Safari with WebGPU), or `fedsb join`.";
  gpuNote.hidden = false;
}
setJoinEnabled();
