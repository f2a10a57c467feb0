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
// Whether this browser can train (navigator.gpu, and an adapter: see the end).
let gpuOk = "gpu" in navigator;
let lossChart = null;
let lossesShown = ""; // what renderLosses last drew (see there)
let previewId = 0; // the latest preview request: older answers are dropped
let fileRead = 0; // the latest file read (chosen or demo): older ones are dropped

// Larger files are refused: the tab would hold the text several times over
// (the page, the worker, the parsed rows), and `fedsb join` suits them better.
const MAX_FILE_BYTES = 200 * 1024 * 1024;
// Updates whose whole frame is kept in window.fedsbParticipant.updates.
const UPDATE_FRAMES_KEPT = 32;
const SENT_KEPT = 1000;

// For tests and the curious: the last SENT_KEPT frames this tab sent ({kind,
// bytes}), every update ({round, samples, loss, seconds, samplesPerSecond,
// bytes, frame}; the frame only for the last UPDATE_FRAMES_KEPT, null for
// older ones), the latest status and the last 500 distinct status messages
// (log).
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
  const w = new Worker(new URL("participant-worker.js", import.meta.url), { type: "module" });
  // Messages of a worker this page has let go are of no interest.
  w.onmessage = (ev) => {
    if (worker === w) onWorkerMessage(ev.data);
  };
  // A worker that failed to load (the server is down) or broke is of no
  // further use: back to not joined, a fresh one on the next preview or Join.
  w.onerror = (ev) => {
    if (worker !== w) return;
    w.terminate();
    worker = null;
    if (joined) $("join-phase").textContent = "error";
    joined = false;
    leaveButton.disabled = true;
    setJoinEnabled();
    showError(`participant worker: ${ev.message || "failed to start"}`);
  };
  worker = w;
  return w;
}

// The lines of `text` that are not blank, from the start, one at a time
// (without splitting a large file whole).
function* nonBlankLines(text) {
  let at = 0;
  while (at < text.length) {
    let end = text.indexOf("\n", at);
    if (end < 0) end = text.length;
    const line = text.slice(at, end).replace(/\r$/, "");
    if (line.trim() !== "") yield { line, at };
    at = end + 1;
  }
}

// JSON Lines: keys of the first objects (the reader takes the keys of all).
const JSONL_LINES_SCANNED = 1000;

// Header columns of a CSV/TSV/JSONL text, for the column selectors, as the
// reader (fedsb-engine's data module) takes them: CSV with RFC 4180 quotes
// (a quoted name may hold commas, "" is a quote), TSV with quotes as
// ordinary characters, each name trimmed (and a leading BOM dropped).
function headerColumns(text, fileName) {
  const lower = fileName.toLowerCase();
  const clean = (c) => c.replace(/^\uFEFF/, "").trim();
  if (/\.(jsonl|ndjson|json)$/.test(lower)) {
    const keys = new Set();
    let n = 0;
    for (const { line } of nonBlankLines(text)) {
      try {
        const row = JSON.parse(line);
        if (row && typeof row === "object" && !Array.isArray(row)) for (const k of Object.keys(row)) keys.add(k);
      } catch {
        break; // the preview names the line
      }
      if (++n >= JSONL_LINES_SCANNED) break;
    }
    return [...keys];
  }
  const first = nonBlankLines(text).next().value;
  if (!first) return [];
  if (/\.(tsv|tab)$/.test(lower)) return first.line.split("\t").map(clean);
  // CSV: one record from the first non-blank line (a quoted name may go on
  // over a line break).
  const names = [];
  let cell = "";
  let quoted = false;
  let fresh = true; // at the start of a field
  for (let i = first.at + (text[first.at] === "\uFEFF" ? 1 : 0); i < text.length; i++) {
    const ch = text[i];
    if (quoted) {
      if (ch !== '"') cell += ch;
      else if (text[i + 1] === '"') {
        cell += '"';
        i += 1;
      } else quoted = false;
    } else if (ch === '"' && fresh) {
      quoted = true;
    } else if (ch === ",") {
      names.push(cell);
      cell = "";
      fresh = true;
      continue;
    } else if (ch === "\n" || ch === "\r") {
      break;
    } else {
      cell += ch;
    }
    fresh = false;
  }
  names.push(cell);
  return names.map(clean);
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
  previewId += 1;
  ensureWorker().postMessage({
    type: "preview",
    id: previewId,
    text: file.text,
    fileName: file.fileName,
    columns: columns(),
  });
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
  const skipped = p.skipped_rows
    ? `; ${p.skipped_rows} rows without a label skipped (first at line ${p.first_skipped_line})`
    : "";
  summary.textContent = `${p.rows} rows (${counts}); columns: ${cols.join(", ")}${skipped}`;
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
  // Most statuses (downloads, messages) bring the same losses: draw once.
  const last = losses[losses.length - 1];
  const shown = last ? `${losses.length} ${last.round} ${last.loss}` : "";
  if (shown === lossesShown) return;
  lossesShown = shown;
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
    if (m.id !== previewId) return; // a newer preview is on its way
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
    const sent = window.fedsbParticipant.sent;
    sent.push({ kind: m.kind, bytes: m.bytes });
    if (sent.length > SENT_KEPT) sent.splice(0, sent.length - SENT_KEPT);
    return;
  }
  if (m.type === "update") {
    const updates = window.fedsbParticipant.updates;
    updates.push(m);
    if (updates.length > UPDATE_FRAMES_KEPT) updates[updates.length - 1 - UPDATE_FRAMES_KEPT].frame = null;
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
  const read = ++fileRead;
  file = null;
  $("join-preview").replaceChildren();
  if (!f) return setJoinEnabled();
  if (f.size > MAX_FILE_BYTES) {
    showError(
      `${f.name} is ${(f.size / 1048576).toFixed(0)} MiB: this page reads files of up to ` +
        `${MAX_FILE_BYTES / 1048576} MiB. Use a part of it, or \`fedsb join\` for the whole file.`,
    );
    return setJoinEnabled();
  }
  const text = await f.text();
  if (read !== fileRead) return; // another file was chosen meanwhile
  file = { text, fileName: f.name };
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
  const read = ++fileRead;
  try {
    const r = await fetch("/api/demo-shard", { cache: "no-store" });
    if (!r.ok) throw new Error(`GET /api/demo-shard: HTTP ${r.status}`);
    const name = /filename="([^"]+)"/.exec(r.headers.get("content-disposition") || "");
    const text = await r.text();
    if (read !== fileRead) return; // a file was chosen meanwhile
    fileInput.value = "";
    file = { text, fileName: name ? name[1] : "demo-shard.tsv" };
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
} else {
  // navigator.gpu is there, but a blocklisted GPU (or WebGPU turned off for
  // it) gives no adapter: say so now rather than after a download. The same
  // request as the worker's wgpu (which checks again before it connects, so
  // a Join pressed before this answer fails at once, without a download).
  navigator.gpu
    .requestAdapter({ powerPreference: "high-performance" })
    .catch(() => null)
    .then((adapter) => {
      if (!adapter && gpuOk) {
        gpuOk = false;
        gpuNote.textContent =
          "This browser exposes WebGPU but has no usable adapter for it (navigator.gpu.requestAdapter() found none: " +
          "the GPU may be blocklisted, or WebGPU turned off for it), so this tab cannot train. Enable hardware " +
          "acceleration or WebGPU for this GPU (chrome://gpu says why it is off), use another browser, or `fedsb join`.";
        gpuNote.hidden = false;
        setJoinEnabled();
      }
    });
}
setJoinEnabled();
