// The "Join" section: this tab as a participant. The chosen file is read
// here and handed to participant-worker.js, which parses it with the task's
// classes (preview), trains on WebGPU and sends only the updates; the file's
// text never leaves the tab.

import { gpuAdapterInfo } from "./gpu-adapter.js";

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

const FALLBACK_NOTE =
  "This browser runs WebGPU on a software fallback adapter, that is on the CPU: the tab trains, " +
  "but many times slower than on a GPU. Enable hardware acceleration or use a browser that " +
  "exposes the GPU to WebGPU to train faster.";

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

// The error and status lines are live regions: each is written only when
// its text changes, or a screen reader would announce it again on every
// status message (four a second while downloading).
function showError(message) {
  if (errorEl.textContent !== (message || "")) errorEl.textContent = message || "";
  errorEl.hidden = !message;
}

function setJoinEnabled() {
  joinButton.disabled = !gpuOk || !file || joined || !$("join-preview").dataset.ok;
  $("join-hint").hidden = !gpuOk || Boolean(file) || joined;
  // The data of a join cannot change while it trains; a browser that
  // cannot train takes no demo shard.
  fileInput.disabled = joined;
  $("join-demo").disabled = joined || !gpuOk;
  for (const id of ["join-text-col", "join-pair-col", "join-label-col"]) $(id).disabled = joined;
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
// Lines end with \n or \r\n, or, in a text without any \n, a bare \r (old
// Mac files), as the reader takes them.
function* nonBlankLines(text) {
  const ends = text.includes("\n") ? /\r?\n/g : /\r/g;
  let at = 0;
  while (at < text.length) {
    ends.lastIndex = at;
    const m = ends.exec(text);
    const end = m ? m.index : text.length;
    const line = text.slice(at, end);
    if (line.trim() !== "") yield { line, at };
    at = m ? m.index + m[0].length : text.length;
  }
}

// The text of a chosen file, which must be UTF-8 (as `fedsb join` reads
// it): a file in another encoding (Latin-1, Windows-1252, UTF-16) is
// refused naming its first bad byte, instead of being read with
// replacement characters and trained on garbled.
async function readUtf8(f) {
  const bytes = new Uint8Array(await f.arrayBuffer());
  if (bytes.length >= 2 && ((bytes[0] === 0xff && bytes[1] === 0xfe) || (bytes[0] === 0xfe && bytes[1] === 0xff))) {
    throw new Error(`${f.name}: the file is UTF-16; save it as UTF-8`);
  }
  try {
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    const bad = firstInvalidUtf8(bytes);
    let line = 1;
    for (let i = 0; i < bad; i++) if (bytes[i] === 0x0a) line++;
    const hex = bytes[bad].toString(16).padStart(2, "0");
    throw new Error(`${f.name}:${line}: not valid UTF-8 (byte 0x${hex} at offset ${bad}); save the file as UTF-8`);
  }
}

// The offset of the first byte that does not belong to a valid UTF-8
// sequence (bytes.length if all do).
function firstInvalidUtf8(bytes) {
  let i = 0;
  while (i < bytes.length) {
    const b = bytes[i];
    let n; // continuation bytes
    let min; // smallest code point of this length (no overlong forms)
    if (b < 0x80) n = 0;
    else if (b >= 0xc2 && b <= 0xdf) [n, min] = [1, 0x80];
    else if (b >= 0xe0 && b <= 0xef) [n, min] = [2, 0x800];
    else if (b >= 0xf0 && b <= 0xf4) [n, min] = [3, 0x10000];
    else return i;
    let cp = n === 0 ? b : b & (0x3f >> n);
    for (let k = 1; k <= n; k++) {
      const c = bytes[i + k];
      if (c === undefined || (c & 0xc0) !== 0x80) return i;
      cp = (cp << 6) | (c & 0x3f);
    }
    if (n > 0 && (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))) return i;
    i += n + 1;
  }
  return bytes.length;
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
  // A name the header has twice is one choice (the reader takes the first).
  for (const n of new Set(names)) select.add(new Option(n, n));
  if (names.includes(keep)) select.value = keep;
}

// No preview, and none that counts (dataset.ok marks a good one).
function clearPreview() {
  $("join-preview").replaceChildren();
  $("join-preview").dataset.ok = "";
  $("join-summary").textContent = "";
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
  // A live region outside the preview: a screen reader hears what was read.
  const summary = $("join-summary");
  const skipped = p.skipped_rows
    ? `; ${p.skipped_rows} rows without a label skipped (first at line ${p.first_skipped_line})`
    : "";
  // A column name with a comma in it is quoted, so the list reads right.
  const named = cols.map((c) => (c.includes(",") ? JSON.stringify(c) : c));
  summary.textContent = `${p.rows} rows (${counts}); columns: ${named.join(", ")}${skipped}`;
  // Labels given as class ids: which id is which class.
  const ids = document.createElement("p");
  ids.id = "join-class-ids";
  ids.className = "note";
  ids.textContent = p.class_ids_note ? `Note: ${p.class_ids_note}.` : "";
  ids.hidden = !p.class_ids_note;
  const table = document.createElement("table");
  const head = document.createElement("tr");
  for (const h of [p.text_column, p.text_pair_column ?? "", p.label_column ?? ""]) {
    const th = document.createElement("th");
    th.textContent = h;
    head.append(th);
  }
  table.append(head, ...rows);
  el.append(ids, table);
  el.dataset.ok = "1";
}

function renderLosses(losses) {
  // Most statuses (downloads, messages) bring the same losses: draw once.
  const shown = JSON.stringify(losses.map((l) => [l.round, l.loss, l.counted ?? null]));
  if (shown === lossesShown) return;
  lossesShown = shown;
  const list = $("join-losses");
  list.replaceChildren(
    ...losses.map((l) => {
      const li = document.createElement("li");
      li.textContent =
        `round ${l.round}: loss ${l.loss.toFixed(4)}, ${l.samples} samples in ${l.seconds.toFixed(1)} s (${l.samplesPerSecond.toFixed(1)} samples/s)` +
        (l.epsilonSpent != null ? `, privacy spent ε = ${l.epsilonSpent.toFixed(3)} of ${l.epsilonBudget}` : "") +
        (l.counted === true ? " — counted" : l.counted === false ? ` — not counted (${l.notCounted})` : "");
      if (l.counted === false) li.className = "not-counted";
      return li;
    }),
  );
  if (typeof uPlot === "undefined") return;
  if (losses.length === 0) {
    // A new join: the last one's curve goes.
    if (lossChart) lossChart.destroy();
    lossChart = null;
    return;
  }
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
      clearPreview();
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
  $("join-participant").textContent = m.participant ?? "…";
  $("join-round").textContent = m.round ?? "…";
  $("join-adapter").textContent = m.adapter ?? "…";
  if (m.adapterFallback && gpuNote.hidden) {
    gpuNote.textContent = FALLBACK_NOTE;
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
  // An error is shown once, on the error line.
  const status = (m.error && m.message === m.error ? "" : m.message) || "";
  if (statusEl.textContent !== status) statusEl.textContent = status;
  showError(m.error);
  renderLosses(m.losses);
  if (["finished", "left", "disconnected", "error"].includes(m.phase)) {
    joined = false;
    // Focus on a button being disabled would fall to the page's start.
    if (document.activeElement === leaveButton) statusEl.focus();
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

// Shows which data the preview and a Join use (the file input is cleared
// after each read, so that choosing the same file again, mended, reads it
// again).
function showSource(text) {
  $("join-source").textContent = text || "";
  $("join-source").hidden = !text;
}

// Forgets the chosen data (after a file that cannot be used).
function clearData(message) {
  file = null;
  clearPreview();
  showSource("");
  for (const id of ["join-text-col", "join-pair-col", "join-label-col"]) fillSelect($(id), []);
  showError(message);
  setJoinEnabled();
}

fileInput.addEventListener("change", async () => {
  const f = fileInput.files[0];
  const read = ++fileRead;
  if (!f) return;
  fileInput.value = "";
  file = null;
  clearPreview();
  setJoinEnabled();
  if (f.size > MAX_FILE_BYTES) {
    return clearData(
      `${f.name} is ${(f.size / 1048576).toFixed(0)} MiB: this page reads files of up to ` +
        `${MAX_FILE_BYTES / 1048576} MiB. Use a part of it, or \`fedsb join\` for the whole file.`,
    );
  }
  let text;
  try {
    text = await readUtf8(f);
  } catch (e) {
    if (read !== fileRead) return;
    // Not UTF-8, or not readable (removed, a folder, no permission).
    return clearData(e.name === "NotFoundError" || e.name === "NotReadableError"
      ? `${f.name} cannot be read (${e.name}: ${e.message})`
      : e.message);
  }
  if (read !== fileRead) return; // another file was chosen meanwhile
  file = { text, fileName: f.name };
  const size = f.size < 1048576 ? `${(f.size / 1024).toFixed(1)} KiB` : `${(f.size / 1048576).toFixed(1)} MiB`;
  showSource(`Data: ${f.name} (${size}), read in this tab`);
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
    $("join-demo-note").hidden = false;
  })
  .catch(() => {});
demoButton.addEventListener("click", async () => {
  // Each click takes a shard from the aggregator's rotation.
  if (joined || !gpuOk) return;
  const read = ++fileRead;
  try {
    const r = await fetch("/api/demo-shard", { cache: "no-store" });
    if (!r.ok) throw new Error(`GET /api/demo-shard: HTTP ${r.status}`);
    const name = /filename="([^"]+)"/.exec(r.headers.get("content-disposition") || "");
    const text = await r.text();
    if (read !== fileRead) return; // a file was chosen meanwhile
    fileInput.value = "";
    file = { text, fileName: name ? name[1] : "demo-shard.tsv" };
    showSource(`Data: the aggregator's demo shard ${file.fileName} (public example data)`);
    clearPreview();
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
  // Join is disabled now: keyboard focus moves to Leave, not to the page.
  leaveButton.focus();
  showError("");
  // Handing a large file to the worker takes a moment: say so at once.
  $("join-phase").textContent = "starting";
  ensureWorker().postMessage({ type: "join", text: file.text, fileName: file.fileName, columns: columns(), seed });
});

leaveButton.addEventListener("click", () => {
  if (worker) worker.postMessage({ type: "leave" });
  statusEl.focus();
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
      if (adapter && gpuOk && gpuAdapterInfo(adapter).fallback && gpuNote.hidden) {
        // Said before Join, not after the download.
        gpuNote.textContent = FALLBACK_NOTE;
        gpuNote.hidden = false;
      }
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
