// The browser participant's Web Worker (a module worker): speaks the fedsb
// protocol over the aggregator's WebSocket and trains on WebGPU with one
// WasmParticipant (fedsb-wasm-client: the same procedure as `fedsb join`).
// The local data's text comes from the page and never leaves this worker;
// only the encoded Update frames (the r×r R matrices and the head) are sent.
//
// Messages in:
//   {type: "preview", id, text, fileName, columns: {text, textPair, label}}
//    (id: the page's number for the request, echoed in the answer)
//   {type: "join", text, fileName, columns, seed (the seed of the batch
//    shuffle and of the federated initialization's draw, as `fedsb join
//    --seed`: a decimal string, or null for a random shuffle and seed 0)}
//   {type: "leave"} (also while the join is still starting: no WebSocket opens)
// Messages out:
//   {type: "preview", id, preview} | {type: "preview", id, error}
//   {type: "status", phase, round, adapter, adapterFallback (true when the
//    WebGPU adapter is a software fallback: training runs on the CPU),
//    wgpuAdapter (the adapter as the engine's wgpu sees it: its device type
//    picks the kernels), task,
//    participant (the id the
//    aggregator gave this participant key, a decimal string), bytesDownloaded
//    (posted at most every PROGRESS_MS while a file downloads),
//    bytesTotal, filesCached, cacheWarning, losses: [{round, loss, samples, seconds,
//    samplesPerSecond, epsilonSpent, epsilonBudget}] (the last LOSSES_KEPT
//    rounds), samplesPerSecond,
//    privacy: null | {epsilon_spent, epsilon_budget, delta, noise_multiplier,
//    sample_rate, clip_norm, steps_taken, planned_steps}, message, error
//    (a loss entry gets counted: true once the aggregator accepted its
//    update, or counted: false and notCounted: why, e.g. "stale_round")
//    (an aggregator's rejection stays until a round's training starts or an
//    update is accepted)}
//     phase: connecting | downloading | initializing | loading | waiting |
//            training | uploading | reconnecting | finished | left |
//            disconnected | error
//    reconnects: how often this join has reconnected (Welcome again)
//   {type: "sent", kind, bytes}   (every frame sent on the WebSocket)
//   {type: "update", round, samples, loss, seconds, samplesPerSecond, bytes,
//    frame}   (each Update sent: the page may inspect what left the tab)
//
// Files are cached by hash in the Cache API ("fedsb-files", key
// /files/<sha256>) and checked with SHA-256 before use, so a reload
// downloads nothing. Where the Cache API is missing, refused or full, the
// files are downloaded on every join and status.cacheWarning says why.
//
// Tasks with `[adapter] init = "federated"` (no adapter file in the
// Welcome): on InitRequest the worker computes the initialization gradients
// of its first init_samples examples (federatedInitFrames), sends one
// InitGradient frame per module and InitDone, waits for AdapterReady,
// fetches that adapter file by hash and then creates the trainer. A task
// that centres its initial head (`[adapter] centre_head`) then sends
// CentreRequest: the worker answers with the per-class sums of the initial
// model's logits over the same examples (CentreLogits), and round 0 follows.
//
// Reconnecting: when the WebSocket closes after this tab got its Welcome
// (while it downloads, initializes, loads or trains), the worker opens a new
// one with the same participant key after 1 s, doubling the pause up to
// 30 s, for up to 10 minutes (phase "reconnecting"); a Welcome for another
// task, or for this task with other files than those this join loaded (the
// aggregator restarted with another model or adapter, see taskFiles), ends
// the join. Updates not answered before the loss are kept (see
// unacked), so no round is trained, or spends privacy budget, twice. The
// federated initialization's gradient frames are kept with the request they
// answer (initAnswer): an aggregator that restarted and asks again gets the
// same frames without a second computation; one that accepted them answers
// InitAccepted; one that finished the initialization meanwhile lists the
// adapter file in its Welcome.
//
// Participant key: the Hello carries a random key (16 bytes from
// crypto.getRandomValues, as 32 hex digits) kept in IndexedDB (store
// "participant-keys") under the same "<task id>/<sha256 hex>" as the ledger,
// so this data joining again (a reload, or after the aggregator restarted) is
// the same participant to the aggregator: same id, same privacy entry, and an
// update it accepted before is announced with UpdateAccepted before RoundOpen
// and not trained again. The same data in a second tab at the same time is
// refused (already_connected).
//
// DP tasks: the privacy ledger (the DP-SGD steps this tab has taken) is kept
// in IndexedDB ("fedsb-participant", store "privacy-ledgers", key
// "<task id>/<sha256 hex>", see ledgerKeyFor) after every round, and
// restored after setData, so a reload does not reset the budget. The hash
// covers the chosen columns and the data's content (its text as the page
// read it, UTF-8 encoded), not the file name: a renamed file keeps its spent
// budget, and two different files with the same name do not share one. A
// ledger saved under the former key "<task id>/<data file name>" is adopted
// when none is saved under the new one (counting steps another file spent
// is safe; forgetting this file's is not) and stays where it is. A round
// that would exceed the budget is not trained: the worker sends Leave and
// stops.

import init, {
  WasmParticipant,
  federatedInitFrames,
  previewData,
  encodeHello,
  encodeLeave,
  decodeServerMessage,
  protocolVersion,
} from "./pkg/fedsb_wasm_client.js";
import { gpuAdapterInfo } from "./gpu-adapter.js";

const MODEL_FILES = ["config.json", "model.safetensors", "tokenizer.json", "adapter.safetensors"];
// The rounds whose losses the status carries (the page lists and charts them).
const LOSSES_KEPT = 200;
// Least time between two posts of a download's progress.
const PROGRESS_MS = 250;

const ready = init();

// The WebGPU device is created inside the wasm (wgpu), which does not tell
// when it is lost (the GPU process crashed, the driver was reset): nothing
// fails until the next round uses it, and a tab waiting for a round would
// never notice. So every device this worker gets is watched here, and its
// loss ends this tab's part with an error the page recognizes ("device was
// lost"), closing the WebSocket so that the aggregator stops waiting for it.
//
// The adapter the device came from is kept too, for the page's name of it
// and whether it is a software fallback (gpu-adapter.js).
let adapterInfo = null; // {name, fallback}
if (self.GPUAdapter) {
  const requestDevice = GPUAdapter.prototype.requestDevice;
  GPUAdapter.prototype.requestDevice = async function (...args) {
    adapterInfo = gpuAdapterInfo(this);
    const device = await requestDevice.apply(this, args);
    device.lost.then((info) => {
      if (info.reason === "destroyed" || ended) return;
      fail(`the WebGPU device was lost (${info.reason || "unknown"}): ${info.message}`);
    });
    return device;
  };
}
const status = {
  type: "status",
  phase: "idle",
  round: null,
  adapter: null,
  adapterFallback: null,
  wgpuAdapter: null,
  task: null,
  participant: null,
  reconnects: 0,
  bytesDownloaded: 0,
  bytesTotal: 0,
  filesCached: 0,
  cacheWarning: null,
  losses: [],
  samplesPerSecond: null,
  privacy: null,
  message: "",
  error: null,
};
let ws = null;
let participant = null;
let queue = Promise.resolve();
let latestGlobal = null;
let latestRound = null;
let pendingOpen = null; // a RoundOpen that came before any GlobalModel
const submitted = new Set(); // rounds this tab trained or was told are in
// Updates sent and not answered yet: round -> {frame, conn} (conn: the
// connection it was sent on, null if none was open). After a reconnect, an
// update the aggregator has is announced with update_accepted; one it lacks
// is sent again at its round_open, without training again.
const unacked = new Map();
let connId = 0; // WebSockets this join has opened
let wsUrl = null;
let participantKey = null;
let taskId = null;
let reconnect = null; // {since, delay, timer} while reconnecting
let reconnects = 0;
const RECONNECT_FOR_MS = 10 * 60 * 1000;
let local = null; // {text, fileName, columns, seed}
let ended = false;
let pendingInit = null; // federated init: {welcome, bytes} until AdapterReady
let initLeftOut = false; // the initialization turned our gradients away (round_full)
// Federated init: {request, frames} once computed: the InitRequest frame and
// the gradient frames that answer it, sent again if the same request comes
// again (after a reconnect).
let initAnswer = null;
// Centring the initial head: {request, frame}: the CentreRequest frame and
// the CentreLogits frame that answers it, sent again if asked again.
let centreAnswer = null;
let welcomed = false; // the first Welcome was handled (reconnect from then on)
// The files this join loaded: name -> sha256 (the first Welcome's, and the
// adapter file of a federated initialization); a reconnect's Welcome must
// announce the same.
let taskFiles = null;
let ledgerKey = null; // DP tasks: "<task id>/<sha256 of columns and data>"

const LEDGER_DB = "fedsb-participant";
const LEDGER_STORE = "privacy-ledgers";
const KEY_STORE = "participant-keys";

// Version 1 had the ledgers only; version 2 added the participant keys.
function openParticipantDb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(LEDGER_DB, 2);
    req.onupgradeneeded = () => {
      for (const name of [LEDGER_STORE, KEY_STORE]) {
        if (!req.result.objectStoreNames.contains(name)) req.result.createObjectStore(name);
      }
    };
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(new Error(`IndexedDB ${LEDGER_DB}: ${req.error}`));
  });
}

async function dbOp(storeName, mode, op) {
  const db = await openParticipantDb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(storeName, mode);
      const req = op(tx.objectStore(storeName));
      tx.oncomplete = () => resolve(req.result);
      tx.onerror = () => reject(new Error(`IndexedDB ${storeName}: ${tx.error}`));
      // A transaction that cannot commit (the storage quota is full) aborts
      // without an error event.
      tx.onabort = () => reject(new Error(`IndexedDB ${storeName}: ${tx.error || "the transaction was aborted"}`));
    });
  } finally {
    db.close();
  }
}

function ledgerOp(mode, op) {
  return dbOp(LEDGER_STORE, mode, op);
}

// This tab's participant key for the task and its data (see the top of this
// file): read from IndexedDB, or made from 16 random bytes and saved there.
// Without IndexedDB the key lasts as long as this join.
async function participantKeyFor(taskId, data) {
  const id = await ledgerKeyFor(taskId, data);
  const fresh = () => {
    const b = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  };
  try {
    const saved = await dbOp(KEY_STORE, "readonly", (store) => store.get(id));
    if (typeof saved === "string") return saved;
    const key = fresh();
    // add(), not put(): of two tabs racing, the second fails and reads the first's.
    try {
      await dbOp(KEY_STORE, "readwrite", (store) => store.add(key, id));
      return key;
    } catch (e) {
      const again = await dbOp(KEY_STORE, "readonly", (store) => store.get(id));
      if (typeof again === "string") return again;
      throw e;
    }
  } catch (e) {
    console.warn(`fedsb: no participant key saved (${errorText(e)}); this join is a new participant`);
    return fresh();
  }
}

// Saves what this tab has spent (a failed save is an error: the budget must
// not silently reset on the next reload).
async function saveLedger() {
  if (!participant || !ledgerKey) return;
  const json = participant.ledgerJson();
  if (json == null) return;
  await ledgerOp("readwrite", (store) => store.put(json, ledgerKey));
  post({ privacy: participant.privacy() });
}

function post(update) {
  Object.assign(status, update);
  postMessage({ ...status, losses: status.losses.slice() });
}

function fail(message) {
  ended = true;
  post({ phase: "error", error: message, message });
  if (ws && ws.readyState <= 1) ws.close(1000, "error");
}

function errorText(e) {
  return String(e && e.message ? e.message : e);
}

function send(frame, kind) {
  ws.send(frame);
  postMessage({ type: "sent", kind, bytes: frame.byteLength });
}

// Sends an update if a connection is open, and keeps it until it is
// answered (a connection lost meanwhile sends it again, see onRoundOpen).
function sendUpdate(round, frame) {
  const entry = { frame, conn: null };
  unacked.set(round, entry);
  if (ws && ws.readyState === 1) {
    send(frame, "update");
    entry.conn = connId;
  }
}

async function sha256Hex(bytes) {
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  return Array.from(d, (b) => b.toString(16).padStart(2, "0")).join("");
}

// The IndexedDB key of the privacy ledger for this task and local data:
// "<task id>/" and the SHA-256 of one JSON line naming the chosen columns
// ([text, textPair, label], null for "not chosen") followed by the data's
// content (UTF-8). The JSON line has no raw newline, so the two parts cannot
// be confused.
async function ledgerKeyFor(taskId, { text, columns }) {
  const utf8 = new TextEncoder();
  const head = utf8.encode(
    JSON.stringify([columns.text || null, columns.textPair || null, columns.label || null]) + "\n",
  );
  const body = utf8.encode(text);
  const bytes = new Uint8Array(head.length + body.length);
  bytes.set(head);
  bytes.set(body, head.length);
  return `${taskId}/${await sha256Hex(bytes)}`;
}

// Tries a download gets; the pauses between them double from 1 s.
const DOWNLOAD_ATTEMPTS = 5;
const DOWNLOAD_RETRY_MS = 1000;

// An error that another attempt would not mend.
function fatal(message) {
  const e = new Error(message);
  e.fatal = true;
  return e;
}

// Downloads `file` (its `size` bytes) from `url`. A transfer that is cut off
// (a network error, HTTP 502-504) is resumed where it stopped with a Range
// request, up to DOWNLOAD_ATTEMPTS tries; a server that answers with the
// whole file again has it read from the start. `onBytes(n)` counts the bytes
// as they arrive (negative when a restart drops them).
async function download(url, file, onBytes) {
  const size = Number(file.size);
  const chunks = [];
  let have = 0;
  const restart = () => {
    onBytes(-have);
    chunks.length = 0;
    have = 0;
  };
  for (let attempt = 1; ; attempt++) {
    try {
      const r = await fetch(url, have > 0 ? { headers: { Range: `bytes=${have}-` } } : {});
      const resumed =
        have > 0 && r.status === 206 && (r.headers.get("content-range") || "").startsWith(`bytes ${have}-`);
      if (!resumed) {
        if (r.status === 416) {
          restart();
          throw new Error(`GET ${url}: the server cannot resume`);
        }
        if (!r.ok) {
          const text = `GET ${url}: HTTP ${r.status}`;
          throw r.status >= 502 && r.status <= 504 ? new Error(text) : fatal(text);
        }
        if (have > 0) restart();
      }
      if (!r.body) throw fatal(`GET ${url}: no body`);
      const reader = r.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        if (have + value.length > size) {
          throw fatal(`${file.name}: the server sends more than the ${size} bytes it announced`);
        }
        chunks.push(value);
        have += value.length;
        onBytes(value.length);
      }
      const out = new Uint8Array(have);
      let at = 0;
      for (const c of chunks) {
        out.set(c, at);
        at += c.length;
      }
      return out;
    } catch (e) {
      if (e.fatal) throw e;
      if (attempt >= DOWNLOAD_ATTEMPTS) {
        throw new Error(`downloading ${file.name} failed ${DOWNLOAD_ATTEMPTS} times: ${errorText(e)}`);
      }
      const pause = DOWNLOAD_RETRY_MS * 2 ** (attempt - 1);
      post({
        message: `downloading ${file.name} was cut off after ${have} bytes (${errorText(e)}); resuming in ${pause / 1000} s`,
      });
      await new Promise((done) => setTimeout(done, pause));
    }
  }
}

// A storage error with its kind ("QuotaExceededError: Quota exceeded.").
function storageErrorText(e) {
  return e && e.name && e.message ? `${e.name}: ${e.message}` : errorText(e);
}

// Says (once) why files are not cached, and goes on without the cache.
function noteCacheProblem(text) {
  if (!status.cacheWarning) post({ cacheWarning: text });
}

// The Cache API's "fedsb-files", or null where this browser offers none or
// refuses it (some private modes, disabled site storage).
async function openCache() {
  if (!self.caches) {
    noteCacheProblem("this browser offers no Cache API here: files are downloaded on every join");
    return null;
  }
  try {
    return await self.caches.open("fedsb-files");
  } catch (e) {
    noteCacheProblem(`the Cache API is not usable (${storageErrorText(e)}): files are downloaded on every join`);
    return null;
  }
}

// One task file by hash: from the cache when it is there and intact,
// otherwise downloaded, verified and cached. Caching is best effort: a full
// or refused cache costs a download next time, never the join.
async function fetchFile(file) {
  const url = new URL(`/files/${file.sha256}`, self.location.origin).href;
  const cache = await openCache();
  if (cache) {
    try {
      const hit = await cache.match(url);
      if (hit) {
        const bytes = new Uint8Array(await hit.arrayBuffer());
        if ((await sha256Hex(bytes)) === file.sha256) {
          post({ filesCached: status.filesCached + 1, bytesTotal: status.bytesTotal + bytes.length });
          return bytes;
        }
        await cache.delete(url);
      }
    } catch (e) {
      noteCacheProblem(`reading the cache failed (${storageErrorText(e)}): downloading instead`);
    }
  }
  post({ bytesTotal: status.bytesTotal + Number(file.size) });
  let shown = Date.now();
  const bytes = await download(url, file, (n) => {
    status.bytesDownloaded += n;
    if (Date.now() - shown < PROGRESS_MS) return;
    shown = Date.now();
    post({});
  });
  post({ bytesDownloaded: status.bytesDownloaded });
  const got = await sha256Hex(bytes);
  if (got !== file.sha256) {
    throw new Error(`${file.name}: downloaded ${bytes.length} bytes hash to ${got}, expected ${file.sha256}`);
  }
  if (cache) {
    try {
      await cache.put(url, new Response(bytes));
    } catch (e) {
      noteCacheProblem(`${file.name} (${bytes.length} bytes) was not cached (${storageErrorText(e)}): it is downloaded again on the next join`);
    }
  }
  return bytes;
}

// The rounds a finished task committed (from /api/status), or null while
// it runs or when the status cannot be read (the join goes on; a finished
// task then says so itself).
async function finishedRounds() {
  try {
    const r = await fetch(new URL("/api/status", self.location.origin).href, { cache: "no-store" });
    if (!r.ok) return null;
    const s = await r.json();
    return s.state === "finished" ? Number(s.last_committed_round) : null;
  } catch (e) {
    return null;
  }
}

// Whether every file this task's join would fetch is in the Cache API.
async function allCached(task) {
  const cache = await openCache();
  if (!cache) return false;
  try {
    for (const f of task.files) {
      if (!MODEL_FILES.includes(f.name)) continue;
      if (!(await cache.match(new URL(`/files/${f.sha256}`, self.location.origin).href))) return false;
    }
    return true;
  } catch (e) {
    return false;
  }
}

async function onWelcome(frame, msg) {
  const task = msg.task;
  welcomed = true;
  taskFiles = new Map(task.files.map((f) => [f.name, f.sha256]));
  post({
    task: task.task_id,
    participant: String(msg.participant),
    message: `task ${task.task_id} (${task.model_id})`,
  });
  // A finished task says so after the Welcome: ask first, so that nothing
  // is downloaded for it (the model is 90 MB), as `fedsb join` does. A tab
  // that has every file cached loads them (no download) and shows what it
  // spent, until the task's own TaskFinished ends the join.
  const finished = await finishedRounds();
  if (finished !== null && !(await allCached(task))) {
    ended = true;
    post({ phase: "finished", message: `the task has finished after ${finished} rounds; nothing to train` });
    ws.close(1000, "finished");
    return;
  }
  post({ phase: "downloading" });
  const federated = !task.files.some((x) => x.name === "adapter.safetensors");
  const bytes = {};
  for (const name of MODEL_FILES) {
    if (federated && name === "adapter.safetensors") continue;
    const f = task.files.find((x) => x.name === name);
    if (!f) throw new Error(`task ${task.task_id} lists no ${name}`);
    bytes[name] = await fetchFile(f);
  }
  if (federated) {
    // The adapter file comes after the federated initialization.
    pendingInit = { welcome: frame, bytes };
    post({ phase: "initializing", message: "waiting for the federated initialization request" });
    return;
  }
  await createParticipant(frame, bytes);
}

async function createParticipant(frame, bytes) {
  const task = status.task;
  post({ phase: "loading", message: "loading the model on WebGPU" });
  participant = await WasmParticipant.create(
    frame,
    bytes["config.json"],
    bytes["model.safetensors"],
    bytes["tokenizer.json"],
    bytes["adapter.safetensors"],
  );
  if (local.seed !== null) participant.setSeed(BigInt(local.seed));
  const preview = participant.setData(
    local.text,
    local.fileName,
    local.columns.text || null,
    local.columns.textPair || null,
    local.columns.label || null,
  );
  if (participant.privacy() !== null) {
    ledgerKey = await ledgerKeyFor(task, local);
    let saved = await ledgerOp("readonly", (store) => store.get(ledgerKey));
    let adopted = false;
    if (saved == null) {
      // Saved by an earlier version, keyed by the file name.
      saved = await ledgerOp("readonly", (store) => store.get(`${task}/${local.fileName}`));
      adopted = saved != null;
    }
    if (saved != null) participant.restoreLedger(saved);
    if (adopted) await saveLedger();
    post({ privacy: participant.privacy() });
  }
  const wgpuAdapter = participant.adapterName();
  post({
    phase: "waiting",
    adapter: describeAdapter(wgpuAdapter),
    adapterFallback: adapterInfo?.fallback ?? null,
    wgpuAdapter,
    message: `${preview.rows} local examples; waiting for a round`,
  });
}

// The adapter as the page shows it: the browser's name for it (wgpu's when
// the browser gives none) and, for a software fallback, that it is the CPU.
function describeAdapter(wgpuName) {
  const name = adapterInfo?.name || wgpuName;
  return adapterInfo?.fallback ? `${name} (software fallback adapter: WebGPU on the CPU)` : name;
}

async function onRoundOpen(frame, msg) {
  const round = Number(msg.round);
  latestRound = round;
  for (const [r, e] of [...unacked]) {
    if (r >= round) continue;
    if (e.conn === connId) {
      // Sent on this connection and not answered: it reached the round
      // after its quorum had committed it; the aggregator's refusal
      // (stale_round) is on its way and answers this entry.
      if (!e.late) post({ message: `round ${r} closed before our update arrived (other participants were faster): it does not count` });
      e.late = true;
      continue;
    }
    unacked.delete(r);
    markCounted(r, false, "lost with the connection");
    post({ message: `our update of round ${r} was lost with the connection; round ${r} closed without it` });
  }
  const pending = unacked.get(round);
  if (pending) {
    // Not answered on this connection: the aggregator does not have it.
    if (pending.conn !== connId) {
      post({ message: `the aggregator does not have our update of round ${round}; sending it again` });
      sendUpdate(round, pending.frame);
    }
    return;
  }
  if (submitted.has(round)) return; // extended; our update is in
  if (!participant) throw new Error("a round opened before the task was loaded");
  if (!latestGlobal) {
    pendingOpen = { frame, msg };
    post({ message: `round ${round} opened before any global state; waiting` });
    return;
  }
  const lr = Number(msg.learning_rate);
  // A task with a head rate of its own trains the head at this multiple of
  // the round's rate (the scale is 1 otherwise).
  const headScale = participant.headLearningRateScale;
  const head = headScale === 1 ? "" : ` (head ${(lr * headScale).toPrecision(3)})`;
  post({
    phase: "training",
    round,
    error: null,
    message: `training round ${round} at learning rate ${lr.toPrecision(3)}${head}`,
  });
  let r;
  try {
    r = await participant.trainRound(latestGlobal, frame);
  } catch (e) {
    const text = errorText(e);
    if (text.startsWith("privacy budget exhausted")) {
      // Nothing was trained; tell the aggregator this tab is done.
      send(encodeLeave("privacy budget exhausted"), "leave");
      ended = true;
      ws.close(1000, "privacy budget exhausted");
      post({ phase: "left", privacy: participant.privacy(), message: text });
      return;
    }
    // Steps taken before a failure are spent: keep them.
    await saveLedger();
    throw e;
  }
  await saveLedger();
  if (ended) return;
  post({ phase: "uploading", message: `sending the update of round ${round}` });
  const update = r.frame;
  sendUpdate(round, update);
  submitted.add(round);
  const entry = {
    round,
    loss: r.meanLoss,
    samples: r.samples,
    seconds: r.seconds,
    samplesPerSecond: r.samplesPerSecond,
    epsilonSpent: r.epsilonSpent,
    epsilonBudget: r.epsilonBudget,
  };
  postMessage({ type: "update", ...entry, bytes: update.byteLength, frame: update });
  post({
    phase: "waiting",
    losses: [...status.losses, entry].slice(-LOSSES_KEPT),
    samplesPerSecond: r.samplesPerSecond,
    message:
      `round ${round}: ${r.samples} samples, loss ${r.meanLoss.toFixed(4)}, ${r.samplesPerSecond.toFixed(1)} samples/s` +
      (r.epsilonSpent != null ? `, privacy spent ε = ${r.epsilonSpent.toFixed(3)} of ${r.epsilonBudget}` : ""),
  });
  r.free();
}

// Records in the loss list whether the aggregator counted this round's
// update (`why`: the reason it did not).
function markCounted(round, counted, why) {
  const i = status.losses.findIndex((l) => l.round === round);
  if (i < 0) return;
  const losses = status.losses.slice();
  losses[i] = { ...losses[i], counted, notCounted: counted ? null : why };
  post({ losses });
}

function sameBytes(a, b) {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}

async function onInitRequest(frame, msg) {
  if (!pendingInit) throw new Error("an initialization request for a task that has its adapter file");
  const { welcome, bytes } = pendingInit;
  const conn = connId;
  let frames;
  if (initAnswer && sameBytes(initAnswer.request, frame)) {
    post({
      phase: "initializing",
      message: "the aggregator asks for the initialization gradients again; sending the same ones",
    });
    frames = initAnswer.frames;
  } else {
    post({
      phase: "initializing",
      message: `computing the initialization gradients of up to ${msg.init_samples} local examples`,
    });
    frames = await federatedInitFrames(
      welcome,
      frame,
      bytes["config.json"],
      bytes["model.safetensors"],
      bytes["tokenizer.json"],
      local.text,
      local.fileName,
      local.columns.text || null,
      local.columns.textPair || null,
      local.columns.label || null,
      local.seed === null ? undefined : BigInt(local.seed),
    );
    initAnswer = { request: frame, frames };
  }
  if (ended) return;
  // The connection that asked was lost meanwhile: the next one asks again.
  if (conn !== connId || !ws || ws.readyState !== 1) return;
  frames.forEach((f, i) => send(f, i === frames.length - 1 ? "init_done" : "init_gradient"));
  post({ message: `sent the initialization gradients of ${frames.length - 1} modules` });
}

// The task centres its initial head: send the per-class sums of the initial
// model's logits over the examples the initialization used.
async function onCentreRequest(frame) {
  if (!participant) throw new Error("a centring request before the model is loaded");
  const conn = connId;
  let answer;
  if (centreAnswer && sameBytes(centreAnswer.request, frame)) {
    answer = centreAnswer.frame;
  } else {
    post({ phase: "initializing", message: "computing the initial model's logits to centre its head" });
    answer = await participant.centreFrame(frame);
    centreAnswer = { request: frame, frame: answer };
  }
  if (ended) return;
  if (conn !== connId || !ws || ws.readyState !== 1) return;
  send(answer, "centre_logits");
  post({ phase: "waiting", message: "sent the logit sums for centring the initial head; waiting for round 0" });
}

async function handle(frame) {
  if (ended) return;
  const msg = decodeServerMessage(frame);
  switch (msg.type) {
    case "global_model": {
      latestGlobal = frame;
      post({ round: Number(msg.round), message: `global state of round ${msg.round}` });
      // A round that opened before any global state can train now.
      const pending = pendingOpen;
      pendingOpen = null;
      if (pending) return onRoundOpen(pending.frame, pending.msg);
      return;
    }
    case "welcome":
      if (welcomed) {
        // A reconnect: the files (and the trainer, or the federated
        // initialization's state) are here already.
        if (msg.task.task_id !== taskId) {
          return fail(`after reconnecting, the aggregator serves task ${msg.task.task_id}, not ${taskId}`);
        }
        const changed = msg.task.files
          .filter((f) => taskFiles.has(f.name) && taskFiles.get(f.name) !== f.sha256)
          .map((f) => f.name);
        if (changed.length > 0) {
          return fail(`the task's files changed on the server (${changed.join(", ")}): reload the page to join again`);
        }
        reconnect = null;
        reconnects += 1;
        post({
          phase: participant ? "waiting" : "initializing",
          participant: String(msg.participant),
          reconnects,
          error: null,
          message: "reconnected",
        });
        const adapter = msg.task.files.find((x) => x.name === "adapter.safetensors");
        if (pendingInit && adapter) {
          // The initialization finished while this tab was away.
          return adapterReady(adapter);
        }
        return;
      }
      return onWelcome(frame, msg);
    case "round_open":
      return onRoundOpen(frame, msg);
    case "update_accepted": {
      const round = Number(msg.round);
      unacked.delete(round);
      markCounted(round, true);
      if (submitted.has(round)) {
        post({ error: null, message: `update of round ${round} accepted` });
      } else {
        // Sent before this connection (a reload, or the aggregator
        // restarted): it counts, and the round is not trained again.
        submitted.add(round);
        post({
          error: null,
          message: `our update of round ${round} was accepted before this connection; not training it again`,
        });
      }
      return;
    }
    case "error": {
      const text = `the aggregator rejected a message (${JSON.stringify(msg.code)}): ${msg.message}`;
      if (msg.code === "version_mismatch") return fail(text);
      if (pendingInit && (msg.code === "round_full" || (msg.code === "not_initializing" && initLeftOut))) {
        // The initialization has as many participants as it takes
        // (max_participants): our gradients (and then our InitDone) are
        // turned away, and the tab waits for its adapter file.
        if (!initLeftOut) {
          initLeftOut = true;
          post({
            phase: "initializing",
            message: "the initialization has as many participants as it takes; waiting for it, then training in the rounds",
          });
        }
        return;
      }
      if (msg.code === "already_connected") {
        // While reconnecting: the aggregator has not noticed yet that the
        // lost connection is gone; the close below schedules another try.
        if (reconnect) return ws.close(1000, "already connected");
        return fail(`this data has joined already from another tab or window (${msg.message})`);
      }
      // Errors answer our messages in order: this one is about the oldest
      // update sent on this connection that is not answered yet, if any.
      let answered = null;
      for (const [r, e] of unacked) {
        if (e.conn === connId) {
          unacked.delete(r);
          answered = { round: r, late: e.late };
          break;
        }
      }
      if (answered) markCounted(answered.round, false, msg.code);
      if (answered?.late && msg.code === "stale_round") {
        // Said already at the next round's opening: not an error.
        post({ message: `the aggregator did not count our update of round ${answered.round}: ${msg.message}` });
        return;
      }
      if (msg.code === "invalid_privacy_report") {
        // Our DP training does not fit the task (the aggregator accounts
        // more privacy spent under this tab's key than the budget allows,
        // or another policy): every later update would be refused too, and
        // would spend privacy for nothing.
        send(encodeLeave("privacy report refused"), "leave");
        return fail(`the aggregator refused this tab's privacy report, so it stops: ${msg.message}`);
      }
      post({ error: text, message: text });
      return;
    }
    case "task_finished":
      ended = true;
      post({ phase: "finished", message: `task finished after ${msg.rounds_committed} rounds` });
      ws.close(1000, "finished");
      return;
    case "init_request":
      return onInitRequest(frame, msg);
    case "centre_request":
      return onCentreRequest(frame);
    case "centre_accepted":
      post({ message: `logit sums of ${msg.num_samples} examples accepted; waiting for round 0` });
      return;
    case "init_accepted":
      post({ message: `initialization gradients of ${msg.num_samples} examples accepted; waiting for the adapter` });
      return;
    case "adapter_ready":
      if (!pendingInit) throw new Error("AdapterReady without a federated initialization");
      return adapterReady(msg.file);
    default:
      post({ message: `ignoring a ${msg.type} message` });
  }
}

// The federated initialization is done: fetch its adapter file and load.
async function adapterReady(file) {
  const { welcome, bytes } = pendingInit;
  pendingInit = null;
  initAnswer = null;
  taskFiles.set(file.name, file.sha256);
  post({ phase: "downloading", message: "the initialization is done; fetching the adapter file" });
  bytes["adapter.safetensors"] = await fetchFile(file);
  return createParticipant(welcome, bytes);
}

// Leave can come while join() waits (for the bundle, /api/task, the key):
// it ends the join before any WebSocket opens (see `ended` after each await).
async function join(data) {
  await ready;
  if (ended) return;
  if (ws) throw new Error("already joined");
  if (!("gpu" in navigator)) throw new Error("this browser exposes no WebGPU (navigator.gpu) to workers");
  // The same request as wgpu's: a browser that exposes WebGPU may still
  // offer no adapter (a blocklisted GPU), and then nothing can train.
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (ended) return;
  if (!adapter) {
    throw new Error(
      "WebGPU has no usable adapter here (navigator.gpu.requestAdapter() found none: the GPU may be blocklisted " +
        "or WebGPU turned off for it), so this tab cannot train",
    );
  }
  local = { text: data.text, fileName: data.fileName, columns: data.columns || {}, seed: data.seed ?? null };
  const taskResponse = await fetch(new URL("/api/task", self.location.origin));
  if (ended) return;
  if (!taskResponse.ok) throw new Error(`GET /api/task: HTTP ${taskResponse.status}`);
  taskId = (await taskResponse.json()).task_id;
  if (ended) return;
  participantKey = await participantKeyFor(taskId, local);
  if (ended) return;
  const url = new URL("/ws", self.location.origin);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  wsUrl = url.href;
  post({ phase: "connecting", message: `connecting to ${url}`, error: null });
  connect();
}

// Opens a WebSocket and sends Hello; events of a socket that is no longer
// the current one are ignored.
function connect() {
  if (ended) return;
  connId += 1;
  const socket = new WebSocket(wsUrl);
  ws = socket;
  socket.binaryType = "arraybuffer";
  socket.onopen = () => {
    if (ws === socket) send(encodeHello(`fedsb-browser (protocol ${protocolVersion()})`, participantKey), "hello");
  };
  socket.onmessage = (ev) => {
    if (ws !== socket) return;
    const frame = new Uint8Array(ev.data);
    queue = queue.then(() => handle(frame)).catch((e) => fail(errorText(e)));
  };
  socket.onclose = (ev) => {
    if (ws !== socket || ended) return;
    connectionLost(`the connection closed (${ev.code}${ev.reason ? ": " + ev.reason : ""})`);
  };
  socket.onerror = () => {
    // A close event follows.
  };
}

// A tab that got its Welcome reconnects (messages of the new connection wait
// in the queue until the download, initialization or loading going on is
// done); one that lost the connection before stops, and Join starts it again.
function connectionLost(why) {
  if (!welcomed) {
    ended = true;
    post({ phase: "disconnected", message: why });
    return;
  }
  const now = Date.now();
  if (!reconnect) reconnect = { since: now, delay: 1000, timer: null };
  if (now - reconnect.since > RECONNECT_FOR_MS) {
    ended = true;
    post({ phase: "disconnected", message: `${why}; gave up reconnecting after ${RECONNECT_FOR_MS / 60000} minutes` });
    return;
  }
  const delay = reconnect.delay;
  reconnect.delay = Math.min(delay * 2, 30000);
  post({ phase: "reconnecting", message: `${why}; reconnecting in ${delay / 1000} s` });
  reconnect.timer = setTimeout(() => {
    if (!ended) connect();
  }, delay);
}

function leave() {
  if (ended) return;
  if (!ws) {
    // join() has not connected yet: it stops at its next step.
    ended = true;
    post({ phase: "left", message: "left the task" });
    return;
  }
  if (reconnect && reconnect.timer) clearTimeout(reconnect.timer);
  if (ws.readyState === 1) send(encodeLeave("left from the page"), "leave");
  ended = true;
  ws.close(1000, "left");
  post({ phase: "left", message: "left the task" });
}

async function preview({ text, fileName, columns }) {
  await ready;
  const r = await fetch(new URL("/api/task", self.location.origin));
  if (!r.ok) throw new Error(`GET /api/task: HTTP ${r.status}`);
  const task = await r.json();
  const c = columns || {};
  return previewData(text, fileName, c.text || null, c.textPair || null, c.label || null, task.labels);
}

onmessage = async (event) => {
  const data = event.data;
  try {
    if (data.type === "preview") {
      postMessage({ type: "preview", id: data.id, preview: await preview(data) });
    } else if (data.type === "join") {
      await join(data);
    } else if (data.type === "leave") {
      leave();
    } else {
      throw new Error(`unknown message type ${JSON.stringify(data.type)}`);
    }
  } catch (e) {
    if (data.type === "preview") postMessage({ type: "preview", id: data.id, error: errorText(e) });
    else if (!ended) fail(errorText(e));
  }
};
